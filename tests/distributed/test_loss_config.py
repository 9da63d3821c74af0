"""``loss.label_smoothing`` and ``loss.z_loss`` from YAML reach the trainer's loss: at TP=2, the loss
of a real training step equals the reference formula on the full (gathered) logits:

    mean over loss tokens of  F.cross_entropy(logits, labels, label_smoothing=eps) + z * logsumexp(logits)**2

And the fused, chunked head + loss at TP=2 equals the unfused single-process path (values and the
gradients of hidden states and the vocab-sharded weight).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from .harness import CheckSet

LOSS = CheckSet(world_size=2, timeout_s=400)


def _step_loss_vs_reference(kind: str, smoothing: float, z_loss: float) -> None:
    from xft_dist.config import load_config
    from xft_dist.data import IGNORE_INDEX
    from xft_dist.train.setup import build_run
    from xft_dist.train.step import train_step

    root = os.environ["XFT_LOSS_DIR"]
    overrides = [f"data.shards={root}/corpus", f"run.out_dir={root}/runs", f"run.name={kind}-{smoothing}",
                 f"loss.label_smoothing={smoothing}", f"loss.z_loss={z_loss}", f"model.kind={kind}"]
    if kind == "encoder_decoder":
        overrides += ["data.mode=span", "data.enc_len=32", "model.enc_depth=1", "model.enc_dim=48"]
    cfg = load_config(f"{root}/cfg.yaml", overrides)
    run = build_run(cfg)
    batch = next(iter(run.loader))
    model = run.engine.module
    with torch.no_grad():
        if kind == "decoder":
            logits = model.net(batch.input_ids, mask=batch.mask, doc_ids=batch.doc_ids, positions=batch.positions,
                               gather_logits=True)
        else:
            enc = model.encode(batch.src, batch.src_mask)
            logits = model.decoder.net(batch.input_ids, mask=batch.mask, context=enc, context_mask=batch.src_mask,
                                       gather_logits=True)
        labels = batch.labels.clamp(min=0)  # the ignored targets weigh 0
        weight = (batch.labels != IGNORE_INDEX).float()
    flat = logits.flatten(0, 1).double()
    ce = F.cross_entropy(flat, labels.flatten(), label_smoothing=smoothing, reduction="none")
    per_token = ce + z_loss * torch.logsumexp(flat, dim=-1) ** 2
    want = (per_token * weight.flatten()).sum() / weight.sum()
    got = train_step(run.engine, batch, groups=run.groups, micro_batch=cfg.train.micro_batch).loss
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-5, atol=0)
    run.sinks.finish()
    run.engine.destroy()


@LOSS.check
def decoder_label_smoothing_0_1():
    _step_loss_vs_reference("decoder", 0.1, 0.0)


@LOSS.check
def decoder_label_smoothing_and_z_loss():
    _step_loss_vs_reference("decoder", 0.1, 1e-3)


@LOSS.check
def encoder_decoder_label_smoothing_0_1():
    _step_loss_vs_reference("encoder_decoder", 0.1, 0.0)


@LOSS.check
def fused_head_loss_tp2_matches_unfused_tp1():
    import torch.distributed as dist

    from xft_dist.nn import fused_head_cross_entropy, masked_loss_sum, vocab_parallel_cross_entropy
    from xft_dist.parallel import ParallelGroups

    from .common import assert_close

    g = ParallelGroups.build(tp_size=2)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 11, 8, generator=gen)
    weight = torch.randn(21, 8, generator=gen)  # vocab 21, padded to 22 at TP=2
    target = torch.randint(0, 21, (3, 11), generator=gen)
    target[0, :4] = -100
    weights = torch.rand(3, 11, generator=gen)
    for kw in ({"label_smoothing": 0.1, "z_loss": 1e-3}, {}):
        for loss_mask in (None, weights):  # uniform upstream gradient (precomputed) and not (recomputed)
            h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            losses = vocab_parallel_cross_entropy(F.linear(h_ref, w_ref), target, vocab_size=21, **kw)
            total, count = masked_loss_sum(losses, target, loss_mask=loss_mask)
            (total / count).backward()
            h_tp = hidden.clone().requires_grad_(True)
            w_tp = torch.cat([weight, weight.new_zeros(1, 8)]).chunk(2)[dist.get_rank()].clone().requires_grad_(True)
            fused = fused_head_cross_entropy(h_tp, w_tp, target, group=g.tp_group, vocab_size=21, chunk_tokens=4,
                                             **kw)
            total_tp, count_tp = masked_loss_sum(fused, target, loss_mask=loss_mask)
            (total_tp / count_tp).backward()
            what = f"{kw} mask={loss_mask is not None}"
            assert_close(fused, losses.detach(), f"{what}: losses")
            assert_close(h_tp.grad, h_ref.grad, f"{what}: hidden grad")
            w_grad = torch.cat([w_ref.grad, w_ref.grad.new_zeros(1, 8)]).chunk(2)[dist.get_rank()]
            assert_close(w_tp.grad, w_grad, f"{what}: weight grad")
    with pytest.raises(ValueError, match="pass this rank's shard, not the full vocabulary"):
        fused_head_cross_entropy(hidden, weight, target, group=g.tp_group, vocab_size=21)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import json

    from ..helpers import make_corpus

    root = tmp_path_factory.mktemp("loss")
    make_corpus(root / "corpus", num_docs=120, shard_tokens=500, max_len=60)
    (root / "cfg.yaml").write_text(json.dumps({
        "model": {"dim": 32, "depth": 1, "heads": 4, "dim_head": 8},
        "data": {"seq_len": 16, "num_streams": 2},
        "parallel": {"tp": 2},
        "train": {"global_batch": 4, "micro_batch": 2},
        "checkpoint": {"resume": False}, "logging": {"wandb": "disabled", "progress_bar": False}}))
    os.environ["XFT_LOSS_DIR"] = str(root)
    try:
        return LOSS.run()
    finally:
        os.environ.pop("XFT_LOSS_DIR")


@pytest.mark.parametrize("name", LOSS.names())
def test_loss_options_reach_the_loss(report, name):
    report.assert_passed(name)
