"""Pipeline parallelism (``parallel.pp``) against the single process: the decoder LM at PP=2,
PP=2 x DP=2 and PP=2 x TP=2 (sequence parallel and full recomputation inside the stages), tied and
untied head; the encoder-decoder at PP=2 (one stage per tower; also with a wider encoder) and PP=4
(two stages per tower, the encoder output passed through a decoder stage).

Each run takes 6 real steps (``train_step`` on DeepSpeed's pipeline engine, fed by the real
loader) and must give the single process's loss and gradient norm at every step within 1e-5
relative, its validation loss (``evaluate`` through the pipeline) on two held-out global batches,
and its weights after the last step (each stage's, sliced for TP), which an error in any gradient
(the tied embedding's sum over the stages that hold it included) would move. The whole model
gathered from the stages (what samples are drawn from) holds those weights too. A PP=2 x TP=2
checkpoint and an encoder-decoder PP=2 one, saved by the trainer, consolidate (what every export
reads) to the single process's weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .harness import CheckSet

pytestmark = pytest.mark.slow
STEPS, GLOBAL = 6, 8


def _config(name: str, *, tp: int = 1, pp: int = 1, micro: int = 2, tie: bool = True, enc_dim: int | None = None,
            **parallel):
    from xft_dist.config.load import validate

    model = {"dim": 32, "depth": 4, "heads": 4, "dim_head": 8, "tie_embedding": tie,
             "activation_checkpointing": parallel.pop("checkpointing", 0)}
    data = {"shards": os.environ["XFT_PP_CORPUS"], "seq_len": 16, "num_streams": 4}
    if enc_dim is not None:  # the encoder-decoder: 2 encoder layers (width enc_dim), 2 decoder layers
        model.update(kind="encoder_decoder", depth=2, enc_depth=2, enc_dim=enc_dim)
        data.update(mode="span", enc_len=32)
    return validate({"model": model, "data": data,
                     "parallel": {"tp": tp, "pp": pp, "zero_stage": 1, **parallel},
                     "train": {"steps": 100, "global_batch": GLOBAL, "micro_batch": micro, "seed": 0},
                     "optim": {"lr": 3e-3, "grad_clip": 0.5}, "schedule": {"warmup_steps": 2},
                     "run": {"out_dir": os.environ["XFT_PP_DIR"], "name": name},
                     "checkpoint": {"resume": False}, "logging": {"wandb": "disabled", "progress_bar": False}})


def _train(cfg, *, save: bool = False):
    from xft_dist.train.loop import save as save_checkpoint
    from xft_dist.train.setup import build_run
    from xft_dist.train.step import train_step

    run = build_run(cfg)
    batches = iter(run.loader)
    steps = [train_step(run.engine, next(batches), groups=run.groups, micro_batch=cfg.train.micro_batch, step=i)
             for i in range(STEPS)]
    if save:  # the trainer's own save (collective), committed like every checkpoint
        save_checkpoint(run, STEPS)
    from xft_dist.train.evaluate import evaluate  # validation through the pipeline (inference schedule)

    held_out = [_held_out(cfg, seed) for seed in (1, 2)]  # whole global batches, the same on every rank
    valid = evaluate(run.engine, run.model, held_out, groups=run.groups, micro_batch=cfg.train.micro_batch,
                     device=run.device, byte_tokenizer=False)["valid/loss"]
    # the parameters themselves (their TP split marks), by their names in the whole model
    names = run.engine.module.model_names() if run.groups.pp_size > 1 else {}
    weights = {names.get(n, n): p for n, p in run.engine.module.named_parameters()}
    whole = {}
    if run.groups.pp_size > 1:  # every stage's weights gathered into the whole model (samples use it)
        from xft_dist.models.pipeline import whole_model

        with whole_model(run.engine.module, run.model, run.groups, run.device) as model:
            whole = {n: (p.detach().clone(), p) for n, p in model.named_parameters()}
    run.sinks.finish()
    run.engine.destroy()
    return [s.loss for s in steps] + [valid], [s.grad_norm for s in steps], weights, run.groups, whole


def _held_out(cfg, seed: int):
    """A global batch of random tokens in the run's mode (packed rows of two documents, or spans)."""
    from xft_dist.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    n, vocab = cfg.data.seq_len, 200
    ids = torch.randint(1, vocab, (GLOBAL, n + 1), generator=g)
    if cfg.data.mode == "span":
        src = torch.randint(1, vocab, (GLOBAL, cfg.data.enc_len), generator=g)
        return Batch.of("span", ids[:, :-1], ids[:, 1:], src=src, src_mask=torch.ones_like(src, dtype=torch.bool))
    doc_ids = (torch.arange(n) >= n // 3).long().expand(GLOBAL, n).contiguous()
    return Batch.of("packed", ids[:, :-1], ids[:, 1:], doc_ids=doc_ids)


def _reference_path(tie: bool, enc_dim: int | None) -> Path:
    return Path(os.environ["XFT_PP_DIR"]) / f"reference-tie{int(tie)}-enc{enc_dim}.pt"


def _compare(name: str, *, tie: bool = True, enc_dim: int | None = None, export: bool = False, **kw):
    import torch.distributed as dist

    from .common import tp_shard

    cfg = _config(name, tie=tie, enc_dim=enc_dim, **kw)
    losses, norms, weights, groups, whole = _train(cfg, save=export)
    ref = torch.load(_reference_path(tie, enc_dim))
    if export and dist.get_rank() == 0:  # the checkpoint consolidates to the single process's weights
        from xft_dist.ckpt.convert import consolidate, resolve_checkpoint

        full = consolidate(resolve_checkpoint(Path(os.environ["XFT_PP_DIR"]) / name))["model"]
        assert set(ref["weights"]) <= set(full), set(ref["weights"]) - set(full)  # (+ a shared one's aliases)
        for key, want in ref["weights"].items():
            torch.testing.assert_close(full[key], want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: exported {key}\n{m}")
    what = f"{name} (stage {groups.pp_rank}, tp {groups.tp_rank}, dp {groups.dp_rank})"
    for key, got, want in (("loss", losses, ref["losses"]), ("grad norm", norms, ref["norms"])):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{what} {key}: {got} vs {want}\n{m}")
    assert weights, f"{what}: no parameters on this stage"
    assert set(whole) == set(ref["weights"]), f"{what}: the whole model's parameters"
    for name, (w, param) in whole.items():
        torch.testing.assert_close(w, tp_shard(ref["weights"][name], param, groups), rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{what}: the whole model's {name} after {STEPS} steps\n{m}")
    for name, w in weights.items():
        torch.testing.assert_close(w.detach(), tp_shard(ref["weights"][name], w, groups), rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{what}: weight {name} after {STEPS} steps\n{m}")
    assert min(losses[1:STEPS]) < losses[0], f"{what}: loss did not fall {losses}"


ONE, TWO, FOUR = CheckSet(world_size=1, timeout_s=300), CheckSet(world_size=2, timeout_s=400), \
    CheckSet(world_size=4, timeout_s=500)


@ONE.check
def single_process_reference():
    for tie, enc_dim in ((True, None), (False, None), (True, 32), (True, 48)):
        losses, norms, weights, _, _ = _train(_config(f"ref-tie{int(tie)}-enc{enc_dim}", tie=tie, enc_dim=enc_dim,
                                                      micro=GLOBAL))
        path = _reference_path(tie, enc_dim)
        torch.save({"losses": losses, "norms": norms, "weights": {n: w.detach() for n, w in weights.items()}}, path)
        json.dumps(losses)


@TWO.check
def pp2_tied_and_untied_match_the_single_process():
    _compare("pp2-tied", pp=2)
    _compare("pp2-untied", pp=2, tie=False)


@TWO.check
def encoder_decoder_pp2_matches_the_single_process_also_with_a_wider_encoder():
    _compare("encdec-pp2", pp=2, enc_dim=32)
    _compare("encdec-pp2-wide", pp=2, enc_dim=48, export=True)


@FOUR.check
def encoder_decoder_pp4_two_stages_per_tower_matches_the_single_process():
    _compare("encdec-pp4-wide", pp=4, enc_dim=48)


@FOUR.check
def pp2_dp2_matches_the_single_process():
    _compare("pp2-dp2-tied", pp=2, micro=1)


@FOUR.check
def pp2_tp2_sequence_parallel_recomputed_matches_the_single_process():
    _compare("pp2-tp2-sp", pp=2, tp=2, sequence_parallel=True, checkpointing="full", export=True)
    _compare("pp2-tp2-untied", pp=2, tp=2, tie=False)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    from ..helpers import make_corpus

    root = tmp_path_factory.mktemp("pipeline")
    make_corpus(root / "corpus", num_docs=200, shard_tokens=500, max_len=60)
    os.environ["XFT_PP_CORPUS"] = str(root / "corpus")
    os.environ["XFT_PP_DIR"] = str(root)
    try:
        return {name: rep for cs in (ONE, TWO, FOUR) for rep in [cs.run()] for name in cs.names()}
    finally:
        os.environ.pop("XFT_PP_CORPUS")
        os.environ.pop("XFT_PP_DIR")


@pytest.mark.parametrize("name", ONE.names() + TWO.names() + FOUR.names())
def test_pipeline_parity(reports, name):
    reports[name].assert_passed(name)
