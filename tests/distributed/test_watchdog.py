"""The stall watchdog, through the deepspeed launcher on 2 CPU ranks: rank 1's data loader sleeps
(a hung worker); every rank exits non-zero within parallel.stall_timeout_s + 30 s, the log holds
rank 1's Python stack (inside the loader) and status.json says stalled."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, make_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent
STALL_S = 8


def test_a_rank_stalled_in_the_data_loader_ends_the_job_with_its_stack_and_status(tmp_path):
    make_corpus(tmp_path / "shards", num_docs=200, shard_tokens=800)
    cfg = {"model": {"dim": 32, "depth": 1, "heads": 2},
           "data": {"shards": str(tmp_path / "shards"), "seq_len": 32, "num_streams": 2},
           "train": {"steps": 1000, "global_batch": 4, "micro_batch": 2},
           "parallel": {"stall_timeout_s": STALL_S},
           "checkpoint": {"every": 2},
           "logging": {"wandb": "disabled", "progress_bar": False},
           "run": {"out_dir": str(tmp_path / "runs"), "name": "stall"}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "distributed" / "inject.py"), "--config", str(tmp_path / "cfg.yaml")]
    env = {**cpu_rank_env(), "XFT_TEST_FAULT": "stall_data:1:5"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    status = tmp_path / "runs" / "stall" / "status.json"
    started = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if started is None and (tmp_path / "runs" / "stall" / "checkpoints" / "step-00000004" / "COMPLETE").exists():
            started = time.monotonic()  # step 4 is done: the stall (batch 5, the 6th) comes next
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert started is not None, err[-3000:]
    assert proc.returncode != 0, err[-3000:]
    assert time.monotonic() - started <= STALL_S + 30, "the job took longer than the stall timeout + 30 s to end"
    log = out + err
    assert "watchdog: rank 1 made no progress" in log and "data for step 6" in log, log[-4000:]
    assert "in stalling" in log and "inject.py" in log, log[-4000:]  # rank 1's stack: asleep in the loader
    state = json.loads(status.read_text())
    assert state["state"] == "stalled" and state["step"] == 5, state
