"""bf16 end to end on CPU ranks: the tiny decoder LM and the tiny encoder-decoder train 20 steps
under DeepSpeed's bf16 mode at TP=2 x DP=1 and TP=1 x DP=2 (fused loss, varlen attention, the real
loader); every loss is finite and the step-20 loss is within 3 % of the same run in fp32."""

from __future__ import annotations

import math
import os

import pytest

from .harness import CheckSet

pytestmark = pytest.mark.slow  # 4 launches of 20 bf16 steps each (minutes)

BF16 = CheckSet(world_size=2, timeout_s=600)
STEPS = 20


def _losses(kind: str, tp: int, precision: str) -> list[float]:
    from xft_dist.config.load import validate
    from xft_dist.train.setup import build_run
    from xft_dist.train.step import train_step

    root = os.environ["XFT_BF16_DIR"]
    model = {"kind": kind, "dim": 64, "depth": 2, "heads": 4, "dim_head": 16}
    data = {"shards": f"{root}/corpus", "seq_len": 32, "num_streams": 2}
    if kind == "encoder_decoder":
        model.update(enc_depth=2, enc_dim=64)
        data.update(mode="span", enc_len=48)
    cfg = validate({"model": model, "data": data, "parallel": {"tp": tp, "zero_stage": 1},
                    "train": {"global_batch": 8, "micro_batch": 2, "precision": precision, "seed": 3},
                    "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 3},
                    "run": {"out_dir": f"{root}/runs", "name": f"{kind}-{tp}-{precision}"},
                    "checkpoint": {"resume": False}, "logging": {"wandb": "disabled", "progress_bar": False}})
    run = build_run(cfg)
    batches = iter(run.loader)
    out = [train_step(run.engine, next(batches), groups=run.groups, micro_batch=2, step=i + 1).loss
           for i in range(STEPS)]
    run.engine.destroy()
    return out


def _bf16_close_to_fp32(kind: str, tp: int) -> None:
    fp32, bf16 = _losses(kind, tp, "fp32"), _losses(kind, tp, "bf16")
    assert all(math.isfinite(x) for x in bf16), bf16
    assert bf16[-1] < bf16[0], f"bf16 loss did not fall: {bf16}"
    assert abs(bf16[-1] / fp32[-1] - 1) < 0.03, f"step {STEPS}: bf16 {bf16[-1]:.4f} vs fp32 {fp32[-1]:.4f}"


@BF16.check
def decoder_tp2_dp1():
    _bf16_close_to_fp32("decoder", 2)


@BF16.check
def decoder_tp1_dp2():
    _bf16_close_to_fp32("decoder", 1)


@BF16.check
def encoder_decoder_tp2_dp1():
    _bf16_close_to_fp32("encoder_decoder", 2)


@BF16.check
def encoder_decoder_tp1_dp2():
    _bf16_close_to_fp32("encoder_decoder", 1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from ..helpers import stdlib_shards

    root = tmp_path_factory.mktemp("bf16")
    stdlib_shards(root / "corpus", "json", shard_tokens=20000)
    os.environ["XFT_BF16_DIR"] = str(root)
    try:
        return BF16.run()
    finally:
        os.environ.pop("XFT_BF16_DIR")


@pytest.mark.parametrize("name", BF16.names())
def test_bf16(report, name):
    report.assert_passed(name)
