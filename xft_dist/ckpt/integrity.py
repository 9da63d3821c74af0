"""Checkpoint integrity: a manifest of every file (size, sha256), made before the ``COMPLETE``
marker, and its verification before a resume.

Hashing and checking are split over the ranks (file ``i`` to rank ``i % world``) and over threads
within a rank; a progress bar shows on rank 0 for checkpoints over 1 GiB.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FILES = "files.json"          # the manifest
MARKER = "COMPLETE"
FAILED = "FAILED_VERIFICATION"
_NOT_LISTED = {FILES, MARKER, FAILED}
_CHUNK = 16 << 20


def listing(path: Path) -> list[str]:
    """Every data file under a checkpoint directory (relative names, sorted)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.name not in _NOT_LISTED and not p.name.endswith(".tmp")
                  and p.relative_to(path).parts[0] != "universal")  # a conversion made later, with its marker


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _map(fn, items: list, *, progress: str | None = None, total_bytes: int = 0):
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    bar = None
    if progress and total_bytes > (1 << 30):
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=progress, unit="file")
    with ThreadPoolExecutor(workers) as pool:
        out = []
        for result in pool.map(fn, items):
            out.append(result)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return out


def describe(path: Path, names: list[str], *, progress: str | None = None) -> dict:
    """``{name: {"size", "sha256"}}`` of ``names`` (fsynced first: on disk before they are listed)."""
    def one(name):
        f = path / name
        fsync_file(f)
        return name, {"size": f.stat().st_size, "sha256": sha256(f)}

    total = sum((path / n).stat().st_size for n in names)
    return dict(_map(one, names, progress=progress, total_bytes=total))


def check(path: Path, expected: dict, names: list[str], *, progress: str | None = None) -> list[str]:
    """Problems with ``names`` against the manifest entries ``expected`` (empty: all good)."""
    def one(name):
        f, want = path / name, expected[name]
        if not f.is_file():
            return f"{name}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name}: {size} bytes, the manifest says {want['size']}"
        if sha256(f) != want["sha256"]:
            return f"{name}: sha256 differs from the manifest"
        return None

    total = sum(v["size"] for k, v in expected.items() if k in names)
    return [p for p in _map(one, names, progress=progress, total_bytes=total) if p]


def read_manifest(path: Path) -> dict | None:
    f = path / FILES
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    if data.get("format") != 1 or not isinstance(data.get("files"), dict):
        raise ValueError(f"{f}: not a checkpoint file manifest (format 1)")
    return data["files"]
