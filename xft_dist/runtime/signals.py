"""SIGTERM / SIGUSR1 ask a run for a checkpoint and a clean stop at the end of the current step.

Installed by the entry point (``launch/pretrain.py``), never by library code; the previous handlers
come back when the ``with`` block ends, so a notebook or a test harness keeps its own.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """``with StopSignals() as stop: ... if stop.requested: ...`` (the signal's name, or None)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
