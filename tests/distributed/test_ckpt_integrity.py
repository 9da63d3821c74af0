"""A damaged newest checkpoint, through the deepspeed launcher on 2 CPU ranks: the next start names
the file, resumes from the previous complete checkpoint with the losses of an uninterrupted run
from there, and keeps the damaged one (moved aside when its step is saved again)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, stdlib_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    stdlib_shards(root / "shards", "json", shard_tokens=20000)
    cfg = {
        "model": {"dim": 32, "depth": 2, "heads": 4, "ff_dropout": 0.1},
        "data": {"shards": str(root / "shards"), "seq_len": 32, "num_streams": 2},
        "train": {"steps": 12, "global_batch": 4, "micro_batch": 2, "seed": 3},
        "optim": {"lr": 3e-3},
        "checkpoint": {"every": 4, "keep": 3},
        "logging": {"every": 4, "wandb": "disabled", "progress_bar": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _train(work, name):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "pretrain.py"), "--config", str(work / "cfg.yaml"), f"run.name={name}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=cpu_rank_env(), cwd=REPO, timeout=600)
    assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return res, [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def base(work):
    return _train(work, "base")[1]


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize("damage, name", [(_flip, "mp_rank_00_model_states.pt"), (_truncate, "xft_rank00001.pt")])
def test_a_damaged_checkpoint_is_named_skipped_and_kept(work, base, damage, name):
    run = f"{damage.__name__[1:]}-{name.split('.')[0]}"
    shutil.copytree(work / "runs" / "base", work / "runs" / run)
    ckpts = work / "runs" / run / "checkpoints"
    damage(ckpts / "step-00000012" / name)
    res, rows = _train(work, run)
    log = res.stdout + res.stderr
    assert "step-00000012 failed verification" in log and name in log, log[-3000:]
    assert "resumed from" in log and "step-00000008" in log
    assert rows[:12] == base and rows[12:] == base[8:]  # steps 9-12 again, exactly as uninterrupted
    aside = ckpts / "step-00000012.failed-1"
    assert (aside / name).exists() and (aside / "FAILED_VERIFICATION").read_text().startswith(name)
    fresh = ckpts / "step-00000012"
    assert (fresh / "COMPLETE").exists() and not (fresh / "FAILED_VERIFICATION").exists()
