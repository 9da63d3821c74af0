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
