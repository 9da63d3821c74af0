"""Atomic checkpoints around DeepSpeed's engine state.

Layout: ``<dir>/step-00000100/`` holds DeepSpeed's files, ``xft_rank00000.pt`` per rank (RNG of
every stream), ``xft_state.json`` (step, merged loader state, W&B run id) and ``config.yaml``.
The marker ``COMPLETE`` is written last, by rank 0, after every rank has finished writing (a
barrier), by rename: a checkpoint without it does not exist for resume. ``<dir>/latest`` names the
newest complete one (also by rename). The last ``keep`` complete checkpoints are kept; incomplete
ones left by a crash are removed at the next commit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel.comm import barrier

MARKER = "COMPLETE"
_TAG = re.compile(r"^step-(\d{8})$")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str | Path, *, keep: int = 2):
        if keep < 2:
            raise ValueError(f"checkpoint.keep={keep}: keep at least 2 (the newest may be mid-write)")
        self.root, self.keep = Path(root), keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _TAG.match(p.name) and (p / MARKER).exists()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, step: int, *, rank_state: dict, shared: dict, config_text: str) -> Path:
        """Collective: every rank calls it."""
        tag = self.tag(step)
        path = self.root / tag
        if dist.get_rank() == 0 and path.exists():
            shutil.rmtree(path)  # a leftover from a crash at this very step
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, path / f"xft_rank{dist.get_rank():05d}.pt")
        if dist.get_rank() == 0:
            _write_atomic(path / "xft_state.json", json.dumps({"step": step, **shared}))
            _write_atomic(path / "config.yaml", config_text)
        barrier()  # every rank has written everything
        if dist.get_rank() == 0:
            _write_atomic(path / MARKER, f"{step}\n")
            _write_atomic(self.root / "latest", tag + "\n")
            self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        newest = done[-1].name if done else ""
        for p in self.root.iterdir():
            if _TAG.match(p.name) and not (p / MARKER).exists() and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path) -> tuple[dict, dict]:
        """Restore the engine from ``path``; return (this rank's state, the shared state)."""
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        rank_file = path / f"xft_rank{dist.get_rank():05d}.pt"
        if not rank_file.exists():
            raise RuntimeError(f"{path} has no state for rank {dist.get_rank()}: it was written by a run "
                               "with fewer ranks (resuming at another world size needs the same DP x TP layout)")
        rank_state = torch.load(rank_file, weights_only=False)
        shared = json.loads((path / "xft_state.json").read_text())
        return rank_state, shared
