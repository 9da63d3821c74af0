"""Test markers, declared once (``--strict-markers`` rejects any other):

    slow   multi-process runs through the real launchers, SLURM jobs, the parity matrix (minutes)
    root   needs root: a local SLURM cluster or network namespaces started by the test itself
    gpu    needs a CUDA device (skipped without one)

A fast loop: ``make test PYTEST_ARGS="-m 'not slow'"``. Shared helpers live in ``tests/helpers.py``.
"""

from __future__ import annotations

MARKERS = {
    "slow": "multi-process runs through real launchers, SLURM jobs, the parity matrix (minutes)",
    "root": "needs root: a local SLURM cluster or network namespaces started by the test",
    "gpu": "needs a CUDA device (skipped without one)",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
