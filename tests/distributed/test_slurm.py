"""Multi-node for real: a local SLURM cluster (munged, slurmctld, two slurmd as nodes n1 and n2)
runs the real launch/slurm/pretrain.sbatch. A 2-node job trains and commits a checkpoint; a job
signalled for preemption checkpoints, requeues itself, resumes, and its losses equal the
uninterrupted run's. The test starts and stops every daemon it needs."""

from __future__ import annotations

import json
import sys
import time

import pytest

from .. import slurm_cluster
from ..helpers import REPO, stdlib_shards

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(900)]
STEPS = 100


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.ensure_installed()
    if reason:
        pytest.skip(f"local SLURM cluster: {reason}")
    with slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurmjob")
    stdlib_shards(root / "shards", "json")
    cfg = {"model": {"dim": 32, "depth": 2, "heads": 2}, "data": {"shards": str(root / "shards"), "seq_len": 32,
           "num_streams": 2}, "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2, "seed": 3},
           "optim": {"lr": 3e-3}, "checkpoint": {"every": 1000},
           "logging": {"wandb": "disabled", "progress_bar": False}, "run": {"out_dir": str(root / "runs")}}
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _submit(cluster, work, name):
    out = work / f"{name}.out"
    job = cluster.sbatch(REPO / "launch" / "slurm" / "pretrain.sbatch", "--nodes=2", "--ntasks-per-node=1",
                         f"--output={out}", f"--export=ALL,CONFIG={work / 'cfg.yaml'},XFT_OVERRIDES=run.name={name},"
                         f"PYTHON={sys.executable},DS_ACCELERATOR=cpu", cwd=REPO)
    return job, out


def _losses(work, name):
    return [json.loads(line)["loss"] for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(cluster, work):
    job, out = _submit(cluster, work, "straight")
    state = cluster.wait(job, timeout=400)
    assert state == "COMPLETED", f"{state}\n{out.read_text() if out.exists() else ''}\n{cluster.logs()}"
    return out


def test_two_node_job_trains_and_commits_a_checkpoint(work, straight):
    log = straight.read_text()
    assert "2 nodes (n[1-2]), 2 ranks, master n1:" in log, log
    assert "run state: finished" in log, log
    losses = _losses(work, "straight")
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0]
    ckpt = work / "runs" / "straight" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert tag == f"step-{STEPS:08d}" and (ckpt / tag / "COMPLETE").exists()
    assert len(list((ckpt / tag).glob("xft_rank*.pt"))) == 2  # one per rank, across both nodes


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, work, straight):
    job, out = _submit(cluster, work, "preempt")
    metrics = work / "runs" / "preempt" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
        assert time.monotonic() < deadline and cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"{cluster.state(job)}\n{out.read_text() if out.exists() else ''}"
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", str(job)])  # what SLURM sends before preemption / time limit
    state = cluster.wait(job, timeout=500)
    log = out.read_text()
    assert state == "COMPLETED", f"{state}\n{log}\n{cluster.logs()}"
    assert "requeueing job" in log and "restart 1:" in log, log
    assert cluster.restarts(job) >= 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "steps repeated or skipped across the requeue"
    assert [r["loss"] for r in rows] == _losses(work, "straight"), \
        "the resumed job's losses differ from the uninterrupted run"
