"""The loss-spike guard through the deepspeed launcher on 2 CPU ranks, with a spike injected into
one rank's loss at step 7 (its loss and gradients times 50): ``log`` logs it and trains on;
``rollback`` reloads the step-4 checkpoint, skips the 3 global batches after it, and its later
losses equal those of a run that never saw those batches (``train.skip_data``)."""

from __future__ import annotations

import json

import pytest

from ..helpers import make_corpus
from ..wandb_file import history
from .inject import launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("spike")
    make_corpus(root / "shards", num_docs=400, shard_tokens=800)
    cfg = {"model": {"dim": 32, "depth": 2, "heads": 2},  # 2 layers: the pipeline case cuts them in two stages
           "data": {"shards": str(root / "shards"), "seq_len": 32, "num_streams": 2},
           "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2,
                     "spike": {"warmup": 3, "window": 20, "zscore": 6.0, "skip_batches": 3}},
           "optim": {"lr": 1e-3},
           "checkpoint": {"every": 4, "keep": 3},
           "logging": {"every": 1, "wandb": "disabled", "progress_bar": False},
           "run": {"out_dir": str(root / "runs")}}
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _run(work, name, *overrides, fault=""):
    res = launch(work / "cfg.yaml", name, *overrides, fault=fault)
    assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
    rows = [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return res.stdout + res.stderr, rows


def _last_losses(rows):
    """step -> loss, the last time each step was logged (a rollback logs steps again)."""
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def logged(work):
    return _run(work, "log", fault="spike:1:7:50")


def test_log_action_logs_the_injected_spike_and_trains_on(logged):
    log, rows = logged
    assert log.count("step 7: loss spike: loss") == 1, log[-3000:]  # rank 0 logs it
    spikes = [r["step"] for r in rows if r.get("spike")]
    assert spikes == [7] and max(r["step"] for r in rows) == STEPS


def test_rollback_skips_the_batches_and_continues_like_a_run_that_never_saw_them(work, logged):
    log, rows = _run(work, "rollback", "train.spike.action=rollback", "logging.wandb=offline", fault="spike:1:7:50")
    assert "rolled back from step 7 to" in log and "step-00000004" in log, log[-3000:]
    assert "skipped 3 global batches of data (rollback after the spike at step 7)" in log
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, *range(5, STEPS + 1)]  # steps 5-7 again, on later data
    _, clean = _run(work, "clean", "train.skip_data=[[4, 3]]")
    got, want = _last_losses(rows), _last_losses(clean)
    for step in range(5, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)
    before = _last_losses(logged[1])  # steps 1-6 of the log run: no spike yet, no skip
    assert got[5] != pytest.approx(before[5], rel=1e-3)  # the skip changed the data
    # W&B has every logged row, the repeated steps 5-7 included, each with its step
    wandb_file = next((work / "runs" / "rollback" / "wandb").glob("offline-run-*/run-*.wandb"))
    logged_wandb = [(r["step"], r["loss"]) for r in history(wandb_file) if "loss" in r]
    assert logged_wandb == [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def skipped(work):
    return _run(work, "skip", "train.spike.action=skip", fault="spike:1:7:50")


def test_skip_action_discards_the_update_like_a_run_that_never_saw_the_batch(work, logged, skipped):
    log, rows = skipped
    assert "step 7: loss spike: loss" in log and "update skipped" in log, log[-3000:]
    assert [r["step"] for r in rows if r.get("spike")] == [7]
    assert next(r for r in rows if r["step"] == 7)["spike/skipped"] == 1
    got = _last_losses(rows)
    # the same 6 steps as the log run (no spike yet); step 7's loss is the spiked one
    before = _last_losses(logged[1])
    assert [got[s] for s in range(1, 7)] == pytest.approx([before[s] for s in range(1, 7)], rel=1e-6)
    # After the skipped step the weights, optimizer and schedule are those after step 6 and the data
    # moved one batch on: the run that skips that batch's data is one step ahead.
    _, clean = _run(work, "clean_skip1", "train.skip_data=[[6, 1]]")
    want = _last_losses(clean)
    for step in range(8, STEPS + 1):
        assert got[step] == pytest.approx(want[step - 1], rel=1e-6), (step, got, want)


def test_skip_action_at_two_pipeline_stages_discards_the_update_as_data_parallel_does(work, skipped):
    """The spike injected on the last stage's rank: every stage drops the update (NaN gradients into
    DeepSpeed's overflow check), and the run continues as the same run at PP=1 (DP=2) does."""
    log, rows = _run(work, "skip-pp2", "train.spike.action=skip", "parallel.pp=2", fault="spike:1:7:50")
    assert "step 7: loss spike: loss" in log and "update skipped" in log, log[-3000:]
    assert [r["step"] for r in rows if r.get("spike")] == [7]
    got, want = _last_losses(rows), _last_losses(skipped[1])
    # step 7's spiked loss differs: at PP=2 rank 1 holds the whole batch's loss, at DP=2 half of it
    steps = [s for s in sorted(want) if s != 7]
    assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-5)
    assert sorted(got) == sorted(want) and got[7] > 10 * got[6]
