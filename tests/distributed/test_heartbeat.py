"""A frozen peer (SIGSTOP: what a hung node looks like, and what NCCL hides behind a device sync)
ends the run on the surviving rank with exit status 3 and a line naming the lost rank and host,
within ``parallel.heartbeat_lost_s`` and long before the collective timeout (``parallel.timeout_s``
300 s here): by the heartbeat on the rendezvous store, not by the collective. Both ways round: the
frozen rank is a plain peer (rank 1), or rank 0, whose process serves the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, kill_groups, stdlib_shards, wait_for_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LOST_S = 6


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("heartbeat")
    stdlib_shards(root / "shards", "json")
    cfg = {"model": {"dim": 32, "depth": 1, "heads": 2}, "data": {"shards": str(root / "shards"), "seq_len": 32,
           "num_streams": 2}, "train": {"steps": 100000, "global_batch": 4, "micro_batch": 2},
           "parallel": {"timeout_s": 300, "heartbeat_s": 1, "heartbeat_lost_s": LOST_S},
           "checkpoint": {"every": 100000}, "logging": {"wandb": "disabled", "progress_bar": False},
           "run": {"out_dir": str(root / "runs")}}
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _start(config, name):
    port, procs = free_port(), []
    for rank in range(2):
        env = cpu_rank_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        argv = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(config / "cfg.yaml"),
                f"run.name={name}"]
        procs.append(subprocess.Popen(argv, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    wait_for_training(procs, config / "runs" / name / "metrics.jsonl", limit_s=180)
    return procs



@pytest.mark.parametrize("frozen", [1, 0])
def test_a_frozen_peer_ends_the_survivor_with_status_3_naming_it(config, frozen):
    name = f"frozen-{frozen}"
    procs = _start(config, name)
    survivor = procs[1 - frozen]
    os.killpg(procs[frozen].pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out = survivor.communicate(timeout=LOST_S + 60)[0]
    except subprocess.TimeoutExpired:
        kill_groups(procs)
        pytest.fail(f"rank {1 - frozen} was still running {LOST_S + 60} s after rank {frozen} froze")
    finally:
        kill_groups(procs)
    elapsed = time.monotonic() - t0
    assert survivor.returncode == 3, out[-3000:]
    assert "lost contact with host" in out and "no heartbeat" in out, out[-3000:]
    assert f"ranks [{frozen} (stage 0, tp 0, dp {frozen})]" in out, out[-3000:]
    assert elapsed < LOST_S + 30, elapsed
    status = json.loads((config / "runs" / name / "status.json").read_text())
    assert status["state"] == "lost_peer" and status["rank"] == 1 - frozen, status
