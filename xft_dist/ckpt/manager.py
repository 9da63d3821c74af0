"""Atomic, verified checkpoints around DeepSpeed's engine state.

Layout: ``<dir>/step-00000100/`` holds DeepSpeed's files, ``xft_rank00000.pt`` per rank (RNG of
every stream), ``xft_state.json`` (step, merged loader state, W&B run id, vocabulary, tokenizer),
``config.yaml`` and ``files.json`` (every file's size and sha256). Commit: every rank writes and
fsyncs its files and hashes its share of them; rank 0 writes ``files.json``, fsyncs the directory,
and renames the marker ``COMPLETE`` into place last. A checkpoint without it does not exist for
resume. ``<dir>/latest`` names the newest complete one (also by rename).

Asynchronous saves (``save(..., background=True)``): the loop blocks only while the state is staged
in host memory (``staging.py``); each rank's ``BackgroundWriter`` writes, fsyncs and hashes its
files, and the commit (``files.json``, ``COMPLETE``, ``latest``) happens in ``commit_pending``, a
collective that every rank calls at the same point: after a step whose numbers say no writer is
busy, at the next save, or at the end of the run. At most one save is in flight.

Resume takes the newest complete checkpoint whose files match ``files.json`` (checked in parallel
over ranks and threads). One that does not is reported file by file, marked
``FAILED_VERIFICATION`` and skipped for the previous one; it is never deleted (a later save at its
step moves it aside to ``step-…​.failed-N``). The last ``keep`` good checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel.comm import all_gather_object, barrier
from . import integrity, staging
from .integrity import FAILED, FILES, MARKER
from .staging import BackgroundWriter, WriteFailed, stage, staging_engine, text_file

log = logging.getLogger("xft_dist.ckpt")
_TAG = re.compile(r"^step-(\d{8})$")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    integrity.fsync_dir(path.parent)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Pending:
    """An asynchronous save between staging and commit."""

    step: int
    path: Path
    writer: BackgroundWriter
    started: float        # time.monotonic() when the save began


@dataclass
class SaveTimes:
    """``blocking_s``: what the loop waited for (staging; a previous save still writing included);
    ``waited_s``: of which for the previous save; ``committed``: a save committed meanwhile, with
    its ``save_s`` (start of the save to its commit)."""

    path: Path
    blocking_s: float
    waited_s: float = 0.0
    committed: tuple[int, float] | None = None


class CheckpointManager:
    def __init__(self, root: str | Path, *, keep: int = 2):
        if keep < 2:
            raise ValueError(f"checkpoint.keep={keep}: keep at least 2 (the newest may be mid-write)")
        self.root, self.keep = Path(root), keep
        self.pending: Pending | None = None

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints not marked as failed, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if _TAG.match(p.name) and (p / MARKER).exists() and not (p / FAILED).exists()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (unverified: see ``latest_verified``)."""
        done = self.complete()
        return done[-1] if done else None

    # ------------------------------------------------------------------------------ verification
    def verify(self, path: Path, *, progress: bool = False) -> list[str]:
        """Problems of ``path`` against its ``files.json`` (empty: good). Collective when a process
        group exists: each rank checks its share of the files, every rank gets the whole list."""
        rank, world = _rank_world()
        try:
            expected = integrity.read_manifest(path)
        except (ValueError, json.JSONDecodeError) as e:
            return [f"{FILES}: {e}"]
        if expected is None:
            return []  # written before manifests existed: nothing to check against
        names = sorted(expected)[rank::world]
        mine = integrity.check(path, expected, names, progress="verify" if progress and rank == 0 else None)
        if world == 1:
            return mine
        return [p for part in all_gather_object(mine) for p in part]

    def latest_verified(self) -> Path | None:
        """Collective: the newest complete checkpoint whose files match its manifest."""
        rank, _ = _rank_world()
        for path in reversed(self.complete()):
            problems = self.verify(path, progress=True)
            if not problems:
                if rank == 0 and (path / FILES).exists():
                    log.info("verified %s (%d files)", path, len(integrity.read_manifest(path)))
                return path
            if rank == 0:
                log.error("checkpoint %s failed verification, skipping it for the previous one (nothing is "
                          "deleted): %s", path, "; ".join(problems))
                _write_atomic(path / FAILED, "\n".join(problems) + "\n")
            barrier()
        return None

    # ------------------------------------------------------------------------------------- save
    def _clear(self, path: Path) -> None:
        """Make room for a checkpoint at ``path``: a crash leftover goes, a failed one moves aside."""
        if not path.exists():
            return
        if (path / FAILED).exists():
            n = 1
            while path.with_name(f"{path.name}.failed-{n}").exists():
                n += 1
            path.rename(path.with_name(f"{path.name}.failed-{n}"))
        else:
            shutil.rmtree(path)  # a leftover from a crash at this very step (no COMPLETE, or superseded)

    def save(self, engine, step: int, *, rank_state: dict, shared: dict, config_text: str,
             client_state: dict | None = None, background: bool = False) -> SaveTimes:
        """Collective: every rank calls it. ``client_state`` goes into DeepSpeed's files (e.g. the
        universal checkpoint info). ``background``: stage and return; the files are written by a
        background thread and committed by ``commit_pending`` (a previous save still in flight is
        waited for and committed first)."""
        t0 = time.monotonic()
        committed, waited = None, 0.0
        if self.pending is not None:
            waited = self.pending.writer.wait()
            committed = self.commit_pending()
        rank, world = _rank_world()
        tag = self.tag(step)
        path = self.root / tag
        if rank == 0:
            self._clear(path)
        barrier()
        client_state = {"step": step, **(client_state or {})}
        if background:
            self._stage(engine, step, path, rank_state=rank_state, shared=shared, config_text=config_text,
                        client_state=client_state, started=t0)
            return SaveTimes(path, time.monotonic() - t0, waited, committed)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, path / f"xft_rank{rank:05d}.pt")
        if rank == 0:
            _write_atomic(path / "xft_state.json", json.dumps({"step": step, **shared}))
            _write_atomic(path / "config.yaml", config_text)
        barrier()  # every rank has written everything
        names = integrity.listing(path)
        mine = integrity.describe(path, names[rank::world])  # fsynced and hashed, split over ranks
        self._commit(path, step, all_gather_object(mine) if world > 1 else [mine])
        return SaveTimes(path, time.monotonic() - t0, waited, committed)

    def _stage(self, engine, step: int, path: Path, *, rank_state, shared, config_text, client_state,
               started: float) -> None:
        """Everything this rank's files will hold, copied to host memory; the writer started."""
        rank, _ = _rank_world()
        staged = staging_engine(pin=engine.device.type == "cuda")
        original, engine.checkpoint_engine = engine.checkpoint_engine, staged
        try:
            engine.save_checkpoint(str(self.root), tag=path.name, client_state=client_state, save_latest=False)
        finally:
            engine.checkpoint_engine = original
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # the pinned copies have landed before training moves on
        jobs = [(Path(p), staging.torch_save(obj)) for p, obj in staged.files]
        jobs.append((path / f"xft_rank{rank:05d}.pt", staging.torch_save(stage(rank_state))))
        if rank == 0:
            jobs += [(path / "xft_state.json", text_file(json.dumps({"step": step, **shared}))),
                     (path / "config.yaml", text_file(config_text))]
        self.pending = Pending(step, path, BackgroundWriter(path, jobs, step=step), started)

    def writer_state(self) -> tuple[int, int]:
        """This rank's background writer: ``(busy, failed)`` as 0 / 1 (what the step's flags carry)."""
        p = self.pending
        if p is None:
            return 0, 0
        return int(not p.writer.done), int(p.writer.done and p.writer.error is not None)

    def commit_pending(self) -> tuple[int, float] | None:
        """Collective: wait for this rank's writer, then commit the in-flight save on rank 0 once
        every rank's files are written; ``(step, save_s)``. A writer that failed on any rank raises
        ``WriteFailed`` on every rank, naming each failure; the save is not committed (the previous
        complete checkpoint stays the newest). None when no save is in flight."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        p.writer.wait()
        parts = all_gather_object((p.writer.manifest, p.writer.error))
        errors = [f"rank {i}: {err}" for i, (_, err) in enumerate(parts) if err is not None]
        if errors:
            raise WriteFailed(f"the checkpoint of step {p.step} was not committed: " + "; ".join(errors)
                              + f" (the newest complete checkpoint is {self.latest()})")
        self._commit(p.path, p.step, [m for m, _ in parts])
        return p.step, time.monotonic() - p.started

    def _commit(self, path: Path, step: int, parts: list[dict]) -> None:
        """Rank 0 writes the manifest of every rank's files (and of any file not yet listed, such as
        DeepSpeed's copied recovery script), the marker and ``latest``; every rank waits for it."""
        rank, _ = _rank_world()
        if rank == 0:
            files = {k: v for part in parts for k, v in part.items()}
            rest = [n for n in integrity.listing(path) if n not in files]
            files.update(integrity.describe(path, rest))
            _write_atomic(path / FILES, json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
            _write_atomic(path / MARKER, f"{step}\n")
            _write_atomic(self.root / "latest", path.name + "\n")
            self._prune()
        barrier()

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        newest = done[-1].name if done else ""
        for p in self.root.iterdir():
            if _TAG.match(p.name) and not (p / MARKER).exists() and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------------------- load
    def load(self, engine, path: Path, *, universal: bool = False) -> tuple[dict | None, dict]:
        """Restore the engine from ``path``; return (this rank's state, the shared state).

        ``universal``: from ``path``'s universal conversion (another layout; the engine was built
        with ``checkpoint.load_universal``); rank states do not apply then (None)."""
        rank, _ = _rank_world()
        if universal:
            from .universal import UNIVERSAL_DIR, prepare_zero3_universal_load, restore_param_group_hyperparameters

            zero3 = engine.zero_optimization_stage() == 3
            groups = prepare_zero3_universal_load(engine) if zero3 else None
            engine.load_checkpoint(str(path), tag=UNIVERSAL_DIR, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            if zero3:
                restore_param_group_hyperparameters(engine, groups)
            return None, json.loads((path / "xft_state.json").read_text())
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        rank_file = path / f"xft_rank{rank:05d}.pt"
        if not rank_file.exists():
            raise RuntimeError(f"{path} has no state for rank {rank}: it was written by a run "
                               "with fewer ranks (resuming at another world size needs the same DP x TP layout)")
        rank_state = torch.load(rank_file, weights_only=True)
        shared = json.loads((path / "xft_state.json").read_text())
        return rank_state, shared
