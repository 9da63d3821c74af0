"""Asynchronous saves: the state staged in host memory, written in the background.

``staging_engine()`` is a DeepSpeed ``CheckpointEngine``: while ``engine.save_checkpoint`` runs, every
state dict DeepSpeed hands it (module, optimizer partitions, ZeRO shards, pipeline layers) is copied
to host memory (pinned on GPUs, copied without blocking, one synchronisation at the end) and kept
with the file it goes to; nothing is written. ``BackgroundWriter`` then writes those files and our
own (rank state, shared state, config), fsyncs and hashes them in one thread per rank, and reports
the files' manifest entries, or the first error with the file it happened on.

DeepSpeed 0.19.8's own engines were considered: ``DecoupledCheckpointEngine`` (``checkpoint.writer:
{decoupled: true}``) hands the *live* tensors to a writer process and waits for it before the next
optimizer step, so a save overlaps one forward and backward at most, and its ``FastCheckpointEngine``
writer needs the async-io op; ``DataStatesCheckpointEngine`` needs the separate datastates package.
Neither stages, so neither lets training run on while a large checkpoint is written; the
``CheckpointEngine`` interface they share is what this module uses.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import integrity


def stage(obj, *, pin: bool = False):
    """``obj`` with every tensor copied to host memory (``pin``: page-locked, copied without
    blocking; the caller synchronises once). Tensors that shared storage are copied once per
    reference; containers are rebuilt, other leaves deep-copied."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        return out.copy_(t, non_blocking=pin)
    if isinstance(obj, dict):
        return type(obj)((k, stage(v, pin=pin)) for k, v in obj.items())
    if isinstance(obj, list):
        return [stage(v, pin=pin) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        items = [stage(v, pin=pin) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


def staging_engine(*, pin: bool):
    """A DeepSpeed ``CheckpointEngine`` that collects ``(path, staged state)`` for every file
    ``save_checkpoint`` would write, and writes nothing. (DeepSpeed is imported here, on first use:
    importing it prints its accelerator banner, which the export and generation tools keep off
    their output.)"""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class StagingEngine(CheckpointEngine):
        def __init__(self):
            super().__init__()
            self.name, self.pin = "xft_dist staging", pin
            self.files: list[tuple[str, object]] = []

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            self.files.append((str(path), stage(state_dict, pin=self.pin)))

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

        def commit(self, info) -> bool:
            return True

        def preserves_storage_sharing(self) -> bool:
            return False  # DeepSpeed need not clone views before ``save``: staging copies every tensor anyway

    return StagingEngine()


class WriteFailed(RuntimeError):
    """A background checkpoint write failed; the message names the file and the error."""


class BackgroundWriter:
    """One thread that writes a staged save's files into ``path``, fsyncs and hashes them.

    ``jobs``: ``(file path, write(path))`` pairs in order. ``done`` once finished; ``error`` names
    the file and the error of a failure; ``manifest`` holds the written files' entries (relative
    names, as ``integrity.describe`` gives them)."""

    def __init__(self, path: Path, jobs: list[tuple[Path, Callable[[Path], None]]], *, step: int):
        self.path, self.jobs, self.step = path, jobs, step
        self.manifest: dict | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"ckpt-writer-{step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        current = self.path
        try:
            names = []
            for target, write in self.jobs:
                current = target
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
                names.append(str(target.relative_to(self.path)))
            current = self.path
            self.manifest = integrity.describe(self.path, names)  # fsynced and hashed
        except BaseException as e:  # noqa: BLE001 - reported to every rank on the next step
            self.error = f"{current}: {type(e).__name__}: {e}"
        finally:
            self.finished = time.monotonic()

    @property
    def done(self) -> bool:
        return self.finished is not None

    def wait(self) -> float:
        """Block until written; the seconds waited."""
        t0 = time.monotonic()
        self._thread.join()
        return time.monotonic() - t0


def torch_save(obj) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


def text_file(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "w") as f:
            f.write(text)
    return write
