"""A stalled rank is detected, explained and ended, so that the job exits and can be requeued.

Every rank runs a ``Watchdog``; the trainer calls ``beat(where)`` at each phase of a step (data,
step, validation, checkpoint, ...). When no beat comes for ``parallel.stall_timeout_s`` (a data
worker that hangs, a filesystem read that never returns, a peer stuck outside a collective, which
leaves this rank waiting inside one), the watchdog thread:

1. prints one line saying which rank stalled, for how long and after which phase, then the Python
   stacks of every thread of this rank (``faulthandler``) to stderr, i.e. the rank's log;
2. calls ``on_stall`` (the trainer writes ``status.json`` with state ``stalled``);
3. waits a moment (two polls: a launcher kills the other ranks as soon as one exits, and a peer
   whose timer is about to expire, the stalled rank itself among them, should dump its stacks
   first), then ends the process with exit status ``EXIT_STALLED`` (``os._exit``: no teardown that
   could wait on the stalled peer).

The peers of a stalled rank stop beating too (they wait for it in the next collective), so every
rank exits within the timeout and a few seconds. As a backstop for a thread that cannot get the
GIL (a C call that never returns while holding it), ``faulthandler.dump_traceback_later`` is armed
for ``timeout + 20 s`` at every beat: it dumps the stacks and exits from C.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_STALLED = 4
BACKSTOP_S = 20.0


class Watchdog:
    def __init__(self, timeout_s: float, *, rank: int, on_stall=None, poll_s: float | None = None):
        if timeout_s <= 0:
            raise ValueError(f"stall timeout {timeout_s}: expected > 0 (0 disables the watchdog: do not build one)")
        self.timeout_s, self.rank, self.on_stall = timeout_s, rank, on_stall
        self.poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 10)
        self._last, self._where = time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xft-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.beat("start")
        self._thread.start()
        return self

    def beat(self, where: str) -> None:
        """Progress: ``where`` names the phase that starts now (reported if it never ends)."""
        self._last, self._where = time.monotonic(), where
        faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, repeat=False, file=_stderr(), exit=True)

    def idle(self) -> float:
        """Seconds since the last beat."""
        return time.monotonic() - self._last

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        print(f"\nwatchdog: rank {self.rank} made no progress for {idle:.0f} s (parallel.stall_timeout_s="
              f"{self.timeout_s:g}) in phase {self._where!r}; exiting with status {EXIT_STALLED}. "
              f"Python stacks of rank {self.rank}:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=_stderr(), all_threads=True)
        sys.stderr.flush()
        try:
            if self.on_stall is not None:
                self.on_stall(self._where, idle)
        finally:
            time.sleep(2 * self.poll_s + 0.5)
            os._exit(EXIT_STALLED)


def _stderr():
    """A stream with a file descriptor for faulthandler (``sys.stderr`` may be replaced by one without)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__
