"""``<run dir>/status.json``: where a run stands (finished / stopped, step, newest checkpoint),
written atomically so a reader never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_status(run_dir: str | Path, *, state: str, step: int, steps: int, checkpoint: str | None,
                 **extra) -> Path:
    """``extra``: more fields (e.g. a stalled rank and phase). Several processes may write at once:
    each through its own temporary file."""
    path = Path(run_dir) / "status.json"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"state": state, "step": step, "steps": steps, "checkpoint": checkpoint, **extra}))
    os.replace(tmp, path)
    return path
