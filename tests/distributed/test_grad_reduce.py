"""Under bf16 the gradients of a step accumulate over micro-batches and are reduced over DP in fp32
by default (``parallel.grad_reduce_dtype``): 16 micro-batches at DP=4 of a bf16 model give a
gradient closer to the fp32 reference than the same step accumulated and reduced in bf16, at every
ZeRO stage that supports it (1-3)."""

from __future__ import annotations

import pytest
import torch

from .harness import CheckSet

DP4 = CheckSet(world_size=4, timeout_s=600)
VOCAB, SEQ, ROWS, MICRO = 128, 32, 64, 1   # 64 rows / (4 ranks x 1 row) = 16 micro-batches a rank


def _batch():
    from xft_dist.data import Batch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (ROWS, SEQ + 1), generator=gen)
    doc_ids = torch.zeros(ROWS, SEQ, dtype=torch.long)
    return Batch.of("packed", ids[:, :-1], ids[:, 1:], doc_ids=doc_ids, positions=torch.zeros_like(doc_ids))


def accumulated_grads(zero: int, precision: str, reduce_dtype: str | None = None) -> torch.Tensor:
    """The step's full gradient (every parameter, flattened, fp32) after the last micro-batch's
    backward, before the update; the weights are the bf16 values of the seeded init in every run."""
    from deepspeed.utils import safe_get_full_grad

    from xft_dist.config.load import validate
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import VocabFacts, build_run
    from xft_dist.train.step import split_micro_batches

    parallel = {"tp": 1, "zero_stage": zero, **({"grad_reduce_dtype": reduce_dtype} if reduce_dtype else {})}
    cfg = validate({"model": {"dim": 64, "depth": 2, "heads": 4, "init_std": 0.2},
                    "data": {"shards": "unused", "seq_len": SEQ, "num_streams": 4}, "parallel": parallel,
                    "train": {"global_batch": ROWS, "micro_batch": MICRO, "precision": precision, "seed": 5,
                              "nonfinite": "stop"},
                    "optim": {"grad_clip": 0.0}})
    run = build_run(cfg, DistEnv.from_environ(), upto="engine",
                    vocab=VocabFacts(num_tokens=VOCAB, pad_id=0, tokenizer_vocab=VOCAB, num_sentinels=0))
    engine, g = run.engine, run.groups
    if precision == "fp32":  # the reference starts from the bf16 run's weights
        with torch.no_grad():
            for p in engine.module.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    batch = _batch().shard(g.dp_rank, g.dp_size)
    micro = split_micro_batches(batch, MICRO, engine.device)
    total = float(_batch().counts()[2])
    for i, mb in enumerate(micro):
        s, _ = engine(mb)
        engine.backward(s * (g.dp_size * len(micro) / total))
        if i < len(micro) - 1:
            engine.step()
    grads = [safe_get_full_grad(p) for p in engine.module.parameters()]
    out = torch.cat([gr.float().flatten() for gr in grads])
    engine.destroy()
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@DP4.check
def fp32_reduction_is_closer_to_the_fp32_reference_at_every_zero_stage():
    ref = accumulated_grads(1, "fp32")
    found = {}
    for zero in (1, 2, 3):
        found[zero] = (_rel(accumulated_grads(zero, "bf16"), ref),
                       _rel(accumulated_grads(zero, "bf16", "bf16"), ref))
    if torch.distributed.get_rank() == 0:
        print("relative error of the accumulated gradient, default (fp32) vs bf16:", found)
    for zero, (fp32_err, bf16_err) in found.items():
        assert fp32_err < 0.8 * bf16_err, f"ZeRO-{zero}: fp32 reduction {fp32_err:.2e}, bf16 {bf16_err:.2e}"


@pytest.fixture(scope="module")
def report():
    return DP4.run()


@pytest.mark.parametrize("name", DP4.names())
def test_grad_reduce(report, name):
    report.assert_passed(name)
