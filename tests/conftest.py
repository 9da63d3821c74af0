"""Test markers, declared once (``--strict-markers`` rejects any other):

    slow   multi-process runs through the real launchers, SLURM jobs, the parity matrix (minutes)
    root   needs root: a local SLURM cluster or network namespaces started by the test itself
    gpu    needs a CUDA device (skipped without one)

A fast loop: ``make test PYTEST_ARGS="-m 'not slow'"``. Shared helpers live in ``tests/helpers.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

MARKERS = {
    "slow": "multi-process runs through real launchers, SLURM jobs, the parity matrix (minutes)",
    "root": "needs root: a local SLURM cluster or network namespaces started by the test",
    "gpu": "needs a CUDA device (skipped without one)",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


SHM = Path("/dev/shm")
DS_SHM_BUFFER = "deepspeed_allreduce_buffer_*"


def _mtime(f: Path) -> float:
    try:
        return f.stat().st_mtime
    except OSError:  # removed meanwhile
        return float("inf")


def _mapped_shm_buffers() -> set[str]:
    """Names of DeepSpeed CPU all-reduce buffers some live process still maps."""
    live = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
        live.update(line.rsplit("/", 1)[-1] for line in text.splitlines() if "deepspeed_allreduce_buffer_" in line)
    return live


@pytest.fixture(autouse=True)
def _release_deepspeed_shm_buffers():
    """DeepSpeed's CPU communication op leaves a 66 MB buffer per rank in /dev/shm when its processes
    exit; a suite of many launches would fill the tmpfs (and memory). Remove the unmapped ones that
    are a few minutes old: a rank that has just created its buffer maps it a moment later (a younger
    one may belong to a launch of another test session running beside this one)."""
    yield
    if not SHM.is_dir():
        return
    now = time.time()
    stale = [f for f in SHM.glob(DS_SHM_BUFFER) if now - _mtime(f) > 300]
    if stale:
        live = _mapped_shm_buffers()
        for f in stale:
            if f.name not in live:
                f.unlink(missing_ok=True)
