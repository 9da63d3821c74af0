"""tools/doctor.py: GO for a healthy layout; NO-GO with the reason for a wrong rank mapping, a missing
shard, contradicting launcher variables."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, make_corpus

BIN = Path(sys.executable).parent
DOCTOR = str(REPO / "tools" / "doctor.py")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    make_corpus(root / "shards", num_docs=40, shard_tokens=300)
    path = root / "cfg.yaml"
    path.write_text(json.dumps({"data": {"shards": str(root / "shards"), "num_streams": 2},
                                "train": {"global_batch": 4, "micro_batch": 2},
                                "run": {"out_dir": str(root / "runs")}}))
    return path


def _env(**extra):
    return cpu_rank_env(clean=True, **extra)


def test_healthy_layout_is_go(cfg):
    """Two pipeline stages: the report shows the grid, each rank's stage, TP and DP rank."""
    res = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), DOCTOR,
                          "--config", str(cfg), "parallel.pp=2"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "doctor: GO" in res.stdout
    for check in ("process group", "rank mapping", "all-reduce", "environment", "config", "shards", "disk", "layout"):
        assert f"[ok] {check}" in res.stdout, res.stdout
    assert "[ok] config: pp 2 x tp 1 x dp 1" in res.stdout, res.stdout
    assert "layout: pp 2 x dp 1 x tp 1; stage 0: ranks 0 (tp 0, dp 0); stage 1: ranks 1 (tp 0, dp 0)" in res.stdout


def test_duplicate_local_rank_is_no_go(cfg):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, DOCTOR, "--config", str(cfg), "--timeout", "60"], text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "[FAIL] rank mapping" in outs[0] and "local ranks [0, 0], expected [0, 1]" in outs[0], outs[0]
    assert "doctor: NO-GO" in outs[0]


def test_missing_shard_is_no_go(cfg, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(json.loads(cfg.read_text())["data"]["shards"], shards)
    victim = sorted(shards.glob("shard-*.tar"))[1]
    victim.unlink()
    res = subprocess.run([sys.executable, DOCTOR, "--config", str(cfg), f"data.shards={shards}"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[FAIL] shards" in res.stdout and victim.name in res.stdout, res.stdout


def test_contradicting_launcher_variables_are_no_go(cfg):
    res = subprocess.run([sys.executable, DOCTOR, "--config", str(cfg)], capture_output=True, text=True, timeout=300,
                         env=_env(RANK="0", WORLD_SIZE="1", SLURM_PROCID="1", SLURM_NTASKS="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(free_port())))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "RANK=0 but SLURM_PROCID=1" in res.stdout, res.stdout
