"""`make pretrain`, the README's promise, as a user runs it (into a temporary run directory)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ..helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_make_pretrain_trains_the_default_and_says_where_everything_is(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    res = subprocess.run(["make", "-s", "pretrain", f"ARGS=run.out_dir={tmp_path} train.steps=40 "
                          "logging.progress_bar=false"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for line in ("run tiny: 40 steps", "checkpoint: ", "metrics: ", "W&B (offline): ", "validation loss ",
                 "sample: 'def ' -> ", f"curves:     {tmp_path}/tiny/curves.png"):
        assert line in res.stdout, res.stdout[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    assert (tmp_path / "tiny" / "checkpoints" / "step-00000040" / "COMPLETE").exists()
    valid = [r["valid/loss"] for r in rows if "valid/loss" in r]
    assert len(valid) == 1  # at the end (every 200 steps otherwise)
    assert (tmp_path / "tiny" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # the README's tools work on the checkpoint it leaves
    py = str(REPO / ".venv" / "bin" / "python")
    ev = subprocess.run([py, "tools/evaluate.py", str(tmp_path / "tiny")], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0 and f"validation loss {valid[0]:.4f}" in ev.stdout, ev.stdout + ev.stderr
    gen = subprocess.run([py, "tools/generate.py", str(tmp_path / "tiny"), "--prompt", "def ", "--tokens", "20"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.startswith("def "), gen.stdout + gen.stderr
