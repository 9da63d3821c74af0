"""Weight decay reaches matrices only, through the parameter groups handed to DeepSpeed's optimizer
(TP=2, ZeRO 1 and 3). With zero gradients AdamW's update is exactly the decay, so after a few steps
a decayed parameter has shrunk and an undecayed one is bit-identical to its start."""

from __future__ import annotations

import pytest
import torch

from .harness import CheckSet

WD = CheckSet(world_size=2, timeout_s=400)


def _decayed_names(zero: int, **optim) -> tuple[set[str], set[str]]:
    from xft_dist.config.load import validate
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import VocabFacts, build_run

    cfg = validate({"model": {"dim": 32, "depth": 1, "heads": 2, "tie_embedding": False},
                    "data": {"shards": "unused", "seq_len": 16}, "parallel": {"tp": 2, "zero_stage": zero},
                    "train": {"global_batch": 1, "micro_batch": 1},
                    "optim": {"lr": 0.1, "weight_decay": 0.5, **optim}, "schedule": {"warmup_steps": 1}})
    run = build_run(cfg, DistEnv.from_environ(), upto="engine",
                    vocab=VocabFacts(num_tokens=64, pad_id=0, tokenizer_vocab=64, num_sentinels=0))
    engine = run.engine

    def snapshot():
        import deepspeed

        out = {}
        for name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=zero == 3):
                out[name] = p.detach().clone()
        return out

    before = snapshot()
    seq = torch.arange(1, 18)[None]
    for _ in range(3):
        engine.backward(engine(seq) * 0.0)  # a real forward (ZeRO-3 gathers in it); gradients exactly 0
        engine.step()
    after = snapshot()
    before = {n: t for n, t in before.items() if t.any()}  # decay cannot show on an all-zero tensor
    shrunk = {n for n in before if after[n].norm() < before[n].norm() * (1 - 1e-4)}
    same = {n for n in before if torch.equal(after[n], before[n])}
    assert shrunk | same == set(before), f"neither shrunk nor unchanged: {set(before) - shrunk - same}"
    engine.destroy()
    return shrunk, same


def _kinds(names: set[str]) -> set[str]:
    kinds = set()
    for n in names:
        if "token_emb" in n:
            kinds.add("embedding")
        elif "to_logits" in n:
            kinds.add("head")
        elif n.endswith("bias") or "norm" in n:
            kinds.add("norm/bias")
        else:
            kinds.add("matrix")
    return kinds


@WD.check
def matrices_only_by_default_zero1():
    shrunk, same = _decayed_names(1)
    assert _kinds(shrunk) == {"matrix", "head"}, shrunk
    assert _kinds(same) == {"embedding", "norm/bias"}, same


@WD.check
def matrices_only_by_default_zero3():
    shrunk, same = _decayed_names(3)
    assert _kinds(shrunk) == {"matrix", "head"}, shrunk
    assert _kinds(same) == {"embedding", "norm/bias"}, same


@WD.check
def norms_biases_and_embeddings_when_asked():
    shrunk, same = _decayed_names(1, decay_norms_and_biases=True, decay_embeddings=True)
    assert _kinds(shrunk) == {"matrix", "head", "embedding", "norm/bias"}, shrunk
    assert not same, same


@pytest.fixture(scope="module")
def report():
    return WD.run()


@pytest.mark.parametrize("name", WD.names())
def test_weight_decay_groups(report, name):
    report.assert_passed(name)
