"""``<run dir>/status.json``: where a run stands (finished / stopped, step, newest checkpoint),
written atomically so a reader never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_status(run_dir: str | Path, *, state: str, step: int, steps: int, checkpoint: str | None) -> Path:
    path = Path(run_dir) / "status.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"state": state, "step": step, "steps": steps, "checkpoint": checkpoint}))
    os.replace(tmp, path)
    return path
