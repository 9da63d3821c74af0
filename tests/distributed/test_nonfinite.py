"""Non-finite losses across 2 processes (deepspeed launcher, CPU ranks): a NaN injected into one
rank's loss only makes every rank take the same decision at the same step: stop (exit status 5,
status.json says nonfinite, nothing of that step applied) or skip the micro-batch (counted, and
training goes on)."""

from __future__ import annotations

import json

import pytest

from ..helpers import make_corpus
from .inject import launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    make_corpus(root / "shards", num_docs=200, shard_tokens=800)
    cfg = {"model": {"dim": 32, "depth": 2, "heads": 2},  # 2 layers: the pipeline case cuts them in two stages
           "data": {"shards": str(root / "shards"), "seq_len": 32, "num_streams": 2},
           "train": {"steps": 6, "global_batch": 8, "micro_batch": 2},
           "checkpoint": {"every": 2},
           "logging": {"every": 1, "wandb": "disabled", "progress_bar": False},
           "run": {"out_dir": str(root / "runs")}}
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _run(work, name, fault, *overrides):
    res = launch(work / "cfg.yaml", name, *overrides, fault=fault)
    rows = [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return res, rows


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(work):
    res, rows = _run(work, "stop", "nan:1:3")
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert "pretrain: NonFiniteLoss: step 3: non-finite loss on at least one rank" in log, log[-3000:]
    assert log.count("step 3: non-finite loss on at least one rank (train.nonfinite=stop): stopping") >= 4  # 2 ranks
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    status = json.loads((work / "runs" / "stop" / "status.json").read_text())
    assert status["state"] == "nonfinite" and status["step"] == 2 and status["checkpoint"].endswith("step-00000002")


def test_a_nan_on_one_rank_is_skipped_by_every_rank_in_the_same_micro_batch(work):
    res, rows = _run(work, "skip", "nan:1:3", "train.nonfinite=skip")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert log.count("step 3 micro-batch 0: non-finite loss on at least one rank: skipping") == 2, log[-3000:]
    skipped = {r["step"]: r["skipped_micro_batches"] for r in rows if "loss" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0}
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN reached the logged losses


def test_a_nan_on_the_last_stage_stops_every_stage_before_the_update(work):
    """PP=2: the loss lives on the last stage (rank 1); the first stage learns of it in the step's
    one collective, before DeepSpeed reduces or applies anything."""
    res, rows = _run(work, "stop-pp2", "nan:1:3", "parallel.pp=2")
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert log.count("step 3: non-finite loss on at least one rank (train.nonfinite=stop): stopping") >= 4, log[-3000:]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    status = json.loads((work / "runs" / "stop-pp2" / "status.json").read_text())
    assert status["state"] == "nonfinite" and status["step"] == 2 and status["checkpoint"].endswith("step-00000002")
