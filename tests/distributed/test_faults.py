"""No hangs: two network-namespace hosts train over a veth link; cutting the link makes both exit
non-zero within the collective timeout (+ margin) saying what was lost; killing one rank makes the
other exit promptly naming the lost host and rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .. import netns
from ..helpers import REPO, cpu_rank_env, free_port, kill_groups, stdlib_shards, wait_for_training

REASON = netns.available()
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(600),
              pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")]
TIMEOUT_S, MARGIN_S = 6, 25


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    stdlib_shards(root / "shards", "json")
    cfg = {"model": {"dim": 32, "depth": 1, "heads": 2}, "data": {"shards": str(root / "shards"), "seq_len": 32,
           "num_streams": 2}, "train": {"steps": 100000, "global_batch": 4, "micro_batch": 2},
           "parallel": {"timeout_s": TIMEOUT_S}, "checkpoint": {"every": 100000},
           "logging": {"wandb": "disabled", "progress_bar": False}, "run": {"out_dir": str(root / "runs")}}
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _start(config, hosts, name):
    port = free_port()
    procs = []
    for rank, host in enumerate(hosts):
        env = cpu_rank_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR=hosts[0][2], MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=host[1])
        argv = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(config / "cfg.yaml"),
                f"run.name={name}"]
        procs.append(subprocess.Popen(netns.on_host(host, argv), env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    wait_for_training(procs, config / "runs" / name / "metrics.jsonl")
    return procs



def _wait_all(procs, limit):
    t0, outs = time.monotonic(), []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, limit - (time.monotonic() - t0)))[0])
    except subprocess.TimeoutExpired:
        kill_groups(procs)
        pytest.fail(f"a rank was still running {limit}s after the fault: it hung")
    return time.monotonic() - t0, outs


def test_cut_link_makes_both_hosts_exit_within_timeout(config):
    with netns.two_hosts(subnet=1) as hosts:
        procs = _start(config, hosts, "cut")
        netns.cut_link(hosts[0])
        elapsed, outs = _wait_all(procs, TIMEOUT_S + MARGIN_S)
    assert all(p.returncode not in (0, None) for p in procs), [p.returncode for p in procs]
    assert elapsed < TIMEOUT_S + MARGIN_S
    for out in outs:
        assert "pretrain: rank" in out, out[-2000:]
        assert "no answer within parallel.timeout_s=6s" in out or "lost contact" in out, out[-2000:]


def test_killed_rank_makes_the_other_exit_promptly_naming_it(config):
    with netns.two_hosts(subnet=2) as hosts:
        procs = _start(config, hosts, "kill")
        os.killpg(procs[1].pid, signal.SIGKILL)
        elapsed, outs = _wait_all(procs[:1], 20)
    assert procs[0].returncode == 3, outs[0][-2000:]
    assert elapsed < 20
    want = ("pretrain: rank 0 on hosta (10.231.2.1): lost contact with host hostb (10.231.2.2), "
            "ranks [1 (stage 0, tp 0, dp 1)]")
    assert want in outs[0], outs[0][-2000:]
