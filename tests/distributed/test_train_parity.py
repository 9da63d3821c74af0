"""Training parity matrix: (TP1, DP1), (TP2, DP1), (TP1, DP2), (TP2, DP2) x ZeRO 1 and 2 (and 3 at
TP2 x DP2) x accumulation (one micro-batch per rank vs four), for the decoder LM and the
encoder-decoder, and the encoder-only masked LM on packed rows (one micro-batch per rank): the loss of
each of 5 steps equals the (TP1, DP1) run within 1e-5 relative.
Sequence parallelism at TP2 x DP1 (ZeRO 1 and 2; full and selective recomputation) and TP2 x DP2
(ZeRO 1, 2 and 3) is held to the same reference; with dropout (whose masks differ between TP=1 and
TP=2) SP is held to the TP=2 run without it.

Everything runs the real step (``xft_dist.train.step``) on real DeepSpeed engines fed by the real
loader, with the same seed and global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .harness import CheckSet

pytestmark = pytest.mark.slow
STEPS, GLOBAL = 5, 8
KINDS = ("decoder", "encoder_decoder", "encoder")


def _config(kind: str, tp: int, zero: int, micro: int, *, sp: bool = False, model_extra: dict | None = None):
    from xft_dist.config.load import validate

    model = {"kind": kind, "dim": 32, "depth": 2, "heads": 4, "dim_head": 8, **(model_extra or {})}
    data = {"shards": os.environ["XFT_PARITY_CORPUS"], "seq_len": 16, "num_streams": 4}
    if kind == "encoder_decoder":
        model.update(depth=1, enc_depth=1, enc_dim=48)
        data.update(mode="span", enc_len=32)
    if kind == "encoder":  # packed rows of several documents: the varlen path, bidirectional
        data.update(mode="mlm", seq_len=32, mlm_probability=0.3)
    return validate({"model": model, "data": data, "parallel": {"tp": tp, "zero_stage": zero, "sequence_parallel": sp},
                     "train": {"steps": 100, "global_batch": GLOBAL, "micro_batch": micro, "seed": 0},
                     "optim": {"lr": 3e-3, "grad_clip": 0.5}, "schedule": {"warmup_steps": 2},
                     "run": {"out_dir": os.environ["XFT_PARITY_DIR"],
                             "name": f"{kind}-tp{tp}-z{zero}-m{micro}-sp{int(sp)}"},
                     "checkpoint": {"resume": False}, "logging": {"wandb": "disabled", "progress_bar": False}})


def _losses(kind: str, tp: int, zero: int, accumulate: bool, *, sp: bool = False,
            model_extra: dict | None = None) -> list[float]:
    import torch.distributed as dist

    from xft_dist.train.setup import build_run
    from xft_dist.train.step import train_step

    dp = dist.get_world_size() // tp
    micro = GLOBAL // dp // (4 if accumulate else 1)
    cfg = _config(kind, tp, zero, micro, sp=sp, model_extra=model_extra)
    run = build_run(cfg)  # the trainer's own wiring, in this launched world
    if sp:  # the trainer's batches really run split: every norm sees 1/tp of the sequence
        seen = []
        for name, mod in run.engine.module.named_modules():
            if name.endswith("layers.0.ff_norm"):
                mod.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    batches = iter(run.loader)
    out = [train_step(run.engine, next(batches), groups=run.groups, micro_batch=micro, step=i).loss
           for i in range(STEPS)]
    run.sinks.finish()
    run.engine.destroy()
    if sp:
        full = {cfg.data.seq_len, cfg.data.enc_len} if kind == "encoder_decoder" else {cfg.data.seq_len}
        assert seen and set(seen) <= {n // tp for n in full}, f"SP did not split: norm inputs {set(seen)}, {full}"
    return out


def _record_or_compare(tp: int, zeros=(1, 2), *, sp: bool = False, accumulate=(False, True),
                       checkpointing=(0,)):
    import torch.distributed as dist

    path = Path(os.environ["XFT_PARITY_DIR"]) / "reference.json"
    results = {f"{kind}/zero{z}/accum{int(a)}/ckpt{c}": _losses(kind, tp, z, a, sp=sp,
                                                                model_extra={"activation_checkpointing": c})
               for kind in KINDS for z in zeros for a in accumulate for c in checkpointing
               if kind != "encoder" or not a}  # the masked LM: one micro-batch per rank
    if not path.exists():  # the (TP1, DP1) launch: its first run is the reference
        if dist.get_rank() == 0:
            path.write_text(json.dumps({kind: results[f"{kind}/zero1/accum0/ckpt0"] for kind in KINDS}))
        dist.barrier()
    reference = json.loads(path.read_text())
    layout = f"TP{tp} x DP{dist.get_world_size() // tp}" + (" SP" if sp else "")
    for key, losses in results.items():
        want = reference[key.split("/")[0]]
        torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{layout} {key}: {losses} vs {want}\n{m}")
        # training moves the loss (5 steps on small varied batches: not every step is below the first)
        assert min(losses[1:]) < losses[0], f"{layout} {key}: loss did not fall {losses}"


ONE, TWO, FOUR = CheckSet(world_size=1, timeout_s=400), CheckSet(world_size=2, timeout_s=500), \
    CheckSet(world_size=4, timeout_s=600)


@ONE.check
def tp1_dp1_reference_and_its_variants():
    _record_or_compare(tp=1)


@TWO.check
def tp2_dp1_matches_reference():
    _record_or_compare(tp=2)


@TWO.check
def tp1_dp2_matches_reference():
    _record_or_compare(tp=1)


@FOUR.check
def tp2_dp2_matches_reference_zero_1_2_3():
    _record_or_compare(tp=2, zeros=(1, 2, 3))


@TWO.check
def tp2_dp1_sequence_parallel_matches_reference():
    _record_or_compare(tp=2, sp=True, accumulate=(False,), checkpointing=(0, "full", "selective"))


@TWO.check
def tp2_dp1_sequence_parallel_with_dropout_equals_tp2():
    drop = {"attn_dropout": 0.1, "ff_dropout": 0.1}
    for kind in KINDS[:2]:  # the causal and span objectives
        want = _losses(kind, 2, 1, False, model_extra=drop)
        for ckpt in (0, "full"):
            got = _losses(kind, 2, 1, False, sp=True, model_extra={**drop, "activation_checkpointing": ckpt})
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-5, atol=0, msg=lambda m: f"{kind} ckpt={ckpt}: SP {got} vs {want}\n{m}")


@FOUR.check
def tp2_dp2_sequence_parallel_matches_reference_zero_1_2_3():
    _record_or_compare(tp=2, zeros=(1, 2, 3), sp=True, accumulate=(False,))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    from ..helpers import make_corpus

    root = tmp_path_factory.mktemp("parity")
    make_corpus(root / "corpus", num_docs=200, shard_tokens=500, max_len=60)
    os.environ["XFT_PARITY_CORPUS"] = str(root / "corpus")
    os.environ["XFT_PARITY_DIR"] = str(root)
    try:
        return {name: rep for cs in (ONE, TWO, FOUR) for rep in [cs.run()] for name in cs.names()}
    finally:
        os.environ.pop("XFT_PARITY_CORPUS")
        os.environ.pop("XFT_PARITY_DIR")


@pytest.mark.parametrize("name", ONE.names() + TWO.names() + FOUR.names())
def test_parity(reports, name):
    reports[name].assert_passed(name)
