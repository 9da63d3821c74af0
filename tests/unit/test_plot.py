"""tools/plot.py: two runs on one figure from their metrics.jsonl (one with a rollback's repeated
steps, one without validation); the plotted series, read back from the figure's lines, are the
file's (the last record of a repeated step counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xft_dist.obs.plot import curves, plot, read_rows

from ..helpers import REPO


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def runs(tmp_path):
    a = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3 * s, "tokens": 100} for s in range(1, 9)]
    a.insert(5, {"step": 5, "valid/loss": 4.6})
    # a rollback at step 8 back to the checkpoint of step 6: steps 7 and 8 are logged again
    a += [{"step": 7, "loss": 4.0, "lr": 7e-3, "tokens": 100}, {"step": 8, "loss": 3.9, "lr": 8e-3, "tokens": 100},
          {"step": 8, "valid/loss": 3.95}]
    b = [{"step": s, "loss": 6.0 - 0.2 * s, "lr": 2e-3, "tokens_per_s": 50.0, "step_time_s": 2.0}
         for s in range(1, 6)]  # no validation, no "tokens" key (older files)
    return _write(tmp_path / "a" / "metrics.jsonl", a), _write(tmp_path / "b" / "metrics.jsonl", b)


def _lines(fig):
    return {line.get_label(): line.get_xydata() for ax in fig.axes for line in ax.get_lines()}


def test_plotted_series_are_the_files(runs, tmp_path):
    a, b = runs
    out = tmp_path / "both.png"
    fig = plot([curves(read_rows(a), label="a"), curves(read_rows(b), label="b")], out)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _lines(fig)
    expected_a = [(s, 5.0 - 0.1 * s) for s in range(1, 7)] + [(7, 4.0), (8, 3.9)]  # rolled-back steps replaced
    assert np.allclose(lines["a train"], expected_a)
    assert np.allclose(lines["a valid"], [(5, 4.6), (8, 3.95)])
    assert np.allclose(lines["a lr"][:, 1], [1e-3 * s for s in range(1, 7)] + [7e-3, 8e-3])
    assert np.allclose(lines["b train"], [(s, 6.0 - 0.2 * s) for s in range(1, 6)])
    assert "b valid" not in lines  # a run without validation draws none
    assert len(lines["a train (smoothed)"]) == 8


def test_x_in_tokens_and_the_command_line(runs, tmp_path):
    a, b = runs
    c = curves(read_rows(b), label="b", x="tokens")
    assert np.allclose(c.train[0], [100, 200, 300, 400, 500])  # tokens_per_s x step_time_s when "tokens" is absent
    ca = curves(read_rows(a), label="a", x="tokens")
    assert np.allclose(ca.valid[0], [500, 800])
    import subprocess
    import sys

    out = tmp_path / "cli.png"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "plot.py"), str(a.parent), str(b), "--x", "tokens",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and out.exists(), res.stderr
    res = subprocess.run([sys.executable, str(REPO / "tools" / "plot.py"), str(tmp_path / "none"), "--out",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no metrics.jsonl" in res.stderr
