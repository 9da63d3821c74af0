"""Asynchronous checkpoints (``checkpoint.async_save``) through the deepspeed launcher on 2 CPU ranks:
the losses of synchronous saves, every checkpoint complete, verified and consolidating to the same
weights, a stopped and resumed run bit-identical; kill -9 during a background write leaves the
previous complete checkpoint the newest; SIGTERM waits for the save in flight; a writer that meets
a full disk stops every rank naming the file, and the checkpoints left are sound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from xft_dist.ckpt import CheckpointManager
from xft_dist.ckpt.convert import consolidate

from ..helpers import REPO, cpu_rank_env, free_port, stdlib_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent
ASYNC = "checkpoint.async_save=true"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_ckpt")
    stdlib_shards(root / "shards", "json", shard_tokens=20000)
    cfg = {
        "model": {"dim": 64, "depth": 2, "heads": 4},
        "data": {"shards": str(root / "shards"), "seq_len": 64, "num_streams": 2},
        "train": {"steps": 12, "global_batch": 4, "micro_batch": 2, "seed": 2},
        "optim": {"lr": 3e-3},
        "checkpoint": {"every": 4, "keep": 2},
        "logging": {"every": 4, "wandb": "disabled", "progress_bar": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _cmd(work, launcher, *overrides):
    head = ([str(BIN / "deepspeed"), "--num_gpus", "2"] if launcher == "deepspeed"
            else [str(BIN / "torchrun"), "--nproc_per_node", "2"])
    entry = REPO / "tests" / "distributed" / "inject.py"  # launch/pretrain.py with XFT_TEST_FAULT installed
    return [*head, "--master_port", str(free_port()), str(entry), "--config", str(work / "cfg.yaml"), *overrides]


def _run(work, *overrides, launcher="deepspeed", fault="", expect=0):
    res = subprocess.run(_cmd(work, launcher, *overrides), capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=cpu_rank_env(XFT_TEST_FAULT=fault))
    assert (res.returncode == 0) == (expect == 0), f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _rows(work, name):
    return [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def _losses(work, name):
    return [(r["step"], r["loss"]) for r in _rows(work, name) if "loss" in r]


def _sound(ckpts: Path) -> list[Path]:
    """The complete checkpoints under ``ckpts``, each verified against its manifest."""
    mgr = CheckpointManager(ckpts)
    done = mgr.complete()
    for p in done:
        assert mgr.verify(p) == [], p
    return done


def test_async_saves_give_the_synchronous_run_and_resume_bit_identically(work):
    _run(work, "run.name=sync")
    _run(work, "run.name=async", ASYNC, "train.stop_after=6")
    assert (work / "runs" / "async" / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    _run(work, "run.name=async", ASYNC, launcher="torchrun")  # resumes from the asynchronous save of step 6
    assert _losses(work, "async") == _losses(work, "sync")  # bit-identical
    sync, done = work / "runs" / "sync" / "checkpoints", _sound(work / "runs" / "async" / "checkpoints")
    assert [p.name for p in done] == ["step-00000008", "step-00000012"]
    for path in done:  # consolidated (what every export reads): the synchronous run's weights exactly
        a, b = consolidate(path)["model"], consolidate(sync / path.name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    rows = _rows(work, "async")
    blocking = [r["step"] for r in rows if "checkpoint/blocking_s" in r]
    committed = [r for r in rows if "checkpoint/save_s" in r]
    assert blocking == [4, 6, 8, 12] and len(committed) == 4, rows  # 6: the stop's save; 12: the end's
    assert all(r["checkpoint/save_s"] > 0 for r in committed)
    assert [r["step"] for r in _rows(work, "sync") if "checkpoint/save_s" in r] == [4, 8, 12]


def _start(work, name, *overrides, fault=""):
    return subprocess.Popen(_cmd(work, "deepspeed", f"run.name={name}", *overrides), cwd=REPO, text=True,
                            env=cpu_rank_env(XFT_TEST_FAULT=fault), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(proc, what, condition, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def test_kill_9_during_a_background_write_leaves_the_previous_checkpoint_newest(work):
    """Rank 0's writer takes 1 s more a file: the save of step 8 is still being written when the
    whole job is killed; step 4 stays the newest complete checkpoint, intact."""
    ckpts = work / "runs" / "killed" / "checkpoints"
    proc = _start(work, "killed", ASYNC, "train.steps=400", fault="slow_write:0:1")
    try:
        _wait_for(proc, "the save of step 8 in flight",
                  lambda: (ckpts / "step-00000004" / "COMPLETE").exists() and (ckpts / "step-00000008").exists())
        time.sleep(1.0)  # well inside the background write (about 5 s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (ckpts / "step-00000008" / "COMPLETE").exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert [p.name for p in _sound(ckpts)] == ["step-00000004"]
    assert CheckpointManager(ckpts).latest() == ckpts / "step-00000004"


def test_sigterm_waits_for_the_save_in_flight_and_commits_its_own(work):
    ckpts = work / "runs" / "term" / "checkpoints"
    proc = _start(work, "term", ASYNC, "train.steps=400", fault="slow_write:0:1")
    try:
        _wait_for(proc, "the save of step 4 in flight", lambda: (ckpts / "step-00000004").exists())
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if any(a.startswith("--local_rank") for a in p.cmdline())]
        assert len(ranks) == 2
        for rank in ranks:  # as SLURM's scancel does: every task of the step gets SIGTERM
            rank.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    done = _sound(ckpts)
    latest = (ckpts / "latest").read_text().strip()
    step = max(r["step"] for r in _rows(work, "term"))
    assert latest == f"step-{step:08d}" and done[-1].name == latest, (latest, done)
    rows = _rows(work, "term")  # every save staged was committed, the one in flight at the signal too
    assert len([r for r in rows if "checkpoint/save_s" in r]) == len([r for r in rows if "checkpoint/blocking_s" in r])
    assert "stopped: signal" in out
    # the stop's save waited for the one in flight: saves that overlap are named, with the numbers
    assert "checkpoint.async_save: the save of step 4 was still being written when step" in out, out[-4000:]
    assert "raise checkpoint.every" in out


def test_a_full_disk_in_a_background_writer_stops_every_rank_naming_the_file(work):
    res = _run(work, "run.name=full", ASYNC, fault="full_disk:1:8", expect=5)
    ckpts = work / "runs" / "full" / "checkpoints"
    out = res.stdout + res.stderr
    assert "a background checkpoint write failed" in out and "No space left on device" in out, out[-4000:]
    assert "rank 1: " in out and str(ckpts / "step-00000008") in out, out[-4000:]
    assert not (ckpts / "step-00000008" / "COMPLETE").exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert [p.name for p in _sound(ckpts)] == ["step-00000004"]
    status = json.loads((work / "runs" / "full" / "status.json").read_text())
    assert status["state"] == "checkpoint_failed" and status["checkpoint"].endswith("step-00000004"), status
    steps = [s for s, _ in _losses(work, "full")]
    assert 9 <= steps[-1] < 12, steps  # reported on a step after the save, the run stopped there
