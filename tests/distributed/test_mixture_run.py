"""A pretraining run on a mixture of two corpora (data.sources), through the deepspeed launcher on
2 CPU ranks with W&B offline: per-source token counts and epochs land in metrics.jsonl and in the
W&B run, the counts add up to the documents drawn, and a run stopped and resumed at DP 1 continues
with the losses and per-source counts of the uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, make_corpus
from ..wandb_file import history

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent
STEPS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixrun")
    make_corpus(root / "json", num_docs=300, shard_tokens=1500, seed=1)  # byte tokenizer, short documents
    make_corpus(root / "email", num_docs=300, shard_tokens=1500, seed=2)
    cfg = {
        "model": {"dim": 32, "depth": 1, "heads": 2},
        "data": {"sources": [{"shards": str(root / "json"), "weight": 0.3, "name": "js"},
                             {"shards": str(root / "email"), "weight": 0.7}],
                 "seq_len": 64, "num_streams": 2, "shuffle_buffer": 4},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "seed": 1},
        "optim": {"lr": 3e-3},
        "checkpoint": {"every": 6, "keep": 3},
        "logging": {"every": 3, "wandb": "offline", "progress_bar": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _train(work, name, nproc, *overrides):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / "launch" / "pretrain.py"), "--config", str(work / "cfg.yaml"), f"run.name={name}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=cpu_rank_env(), cwd=REPO, timeout=600)
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def _data(rows):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("data/")} for r in rows if "data/js/tokens" in r}


def test_per_source_counts_are_logged_and_a_resumed_mixture_continues_exactly(work):
    rows = _train(work, "full", 2)
    data = _data(rows)
    assert sorted(data) == [1, 3, 6, 9, 12]
    last = data[STEPS]
    assert set(last) == {"data/js/tokens", "data/js/epoch", "data/email/tokens", "data/email/epoch"}
    share = last["data/js/tokens"] / (last["data/js/tokens"] + last["data/email/tokens"])
    assert share == pytest.approx(0.3, abs=0.02)  # weights 0.3 / 0.7
    counts = [d["data/js/tokens"] + d["data/email/tokens"] for _, d in sorted(data.items())]
    # every input token of the rows is a document token or an EOS (one per document of <= 40 tokens)
    assert counts == sorted(counts) and STEPS * 8 * 64 * 0.9 <= counts[-1] <= STEPS * 8 * 64
    wandb_file = next((work / "runs" / "full" / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = [r for r in history(wandb_file) if "data/js/tokens" in r]
    assert [r["data/email/tokens"] for r in logged] == [d["data/email/tokens"] for _, d in sorted(data.items())]

    # stop at step 6 (its checkpoint), resume at DP 1: the same losses and per-source counts
    _train(work, "split", 2, "train.stop_after=6")
    rows2 = _train(work, "split", 1)
    losses = [r["loss"] for r in rows if "loss" in r]
    losses2 = [r["loss"] for r in rows2 if "loss" in r]
    assert losses2 == pytest.approx(losses, rel=1e-5)
    assert _data(rows2)[STEPS] == last


def test_long_documents_hold_their_weights_after_100_steps_on_2_ranks(tmp_path):
    """Three sources of documents up to 30k tokens at 0.5 / 0.3 / 0.2, the tiny config's data shape
    (seq 128, 8 rows, 4 streams) on 2 ranks: the logged shares are within one row per stream of the
    weights at every logged step, 0.02 at step 100."""
    import numpy as np

    from xft_dist.data.shards import ShardWriter
    from xft_dist.data.tokenizer import ByteTokenizer

    names, weights = ("a", "b", "c"), (0.5, 0.3, 0.2)
    for i, n in enumerate(names):
        rng = np.random.default_rng(i)
        with ShardWriter(tmp_path / n, ByteTokenizer().identity(), shard_tokens=30_000) as w:
            for _ in range(8):
                w.write(rng.integers(3, 259, int(rng.integers(15_000, 30_000))))
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "model": {"dim": 32, "depth": 1, "heads": 2},
        "data": {"sources": [{"shards": str(tmp_path / n), "weight": w} for n, w in zip(names, weights)],
                 "seq_len": 128, "num_streams": 4},
        "train": {"steps": 100, "global_batch": 8, "micro_batch": 4},
        "checkpoint": {"every": 1000}, "logging": {"every": 10, "wandb": "disabled", "progress_bar": False},
        "run": {"out_dir": str(tmp_path / "runs")}}))
    rows = _train(tmp_path, "long", 2)
    logged = {r["step"]: [r[f"data/{n}/tokens"] for n in names] for r in rows if "data/a/tokens" in r}
    assert sorted(logged) == [1, *range(10, 101, 10)]
    for step, tokens in logged.items():
        assert sum(tokens) == step * 8 * 128  # the tokens of the rows trained on, nothing read ahead
        worst = max(abs(t / sum(tokens) - w) for t, w in zip(tokens, weights))
        assert worst <= 4 * 128 / sum(tokens) + 1e-9, (step, tokens)
    assert max(abs(t / sum(logged[100]) - w) for t, w in zip(logged[100], weights)) <= 0.02
