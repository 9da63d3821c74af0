"""Rank-0 metric sinks: a JSONL file in the run directory and a W&B run (online / offline / disabled).

The W&B run id is kept in checkpoints, so a resumed job continues the same run. Every W&B row
carries the training step as the metric ``step``, which every chart is plotted against
(``define_metric``); W&B's own ``_step`` only counts rows. So a step logged again (the steps after a
rollback) is recorded again, where W&B would drop values for a ``step=`` it has passed.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class MetricSinks:
    def __init__(self, run_dir: Path, *, mode: str, project: str, name: str, run_id: str | None,
                 config: dict, enabled: bool):
        self.enabled = enabled
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.run = None
        self.run_id = run_id
        self.mode = wandb_mode(mode)
        if not enabled:
            return
        self._jsonl = open(self.jsonl_path, "a")
        if self.mode != "disabled":
            import wandb

            self.run_id = run_id or secrets.token_hex(4)  # W&B run ids: short, lowercase
            self.run = wandb.init(project=project, name=name, id=self.run_id, resume="allow", mode=self.mode,
                                  dir=str(run_dir), config=config, settings=wandb.Settings(console="off"))
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")

    @property
    def wandb_dir(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log({"step": step, **metrics})

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        """A table: one JSON line per row in metrics.jsonl (under ``key``), a ``wandb.Table`` in W&B."""
        if not self.enabled:
            return
        for row in rows:
            self._jsonl.write(json.dumps({"step": step, key: dict(zip(columns, row))}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            import wandb

            self.run.log({"step": step, key: wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.run is not None:
            self.run.finish()
