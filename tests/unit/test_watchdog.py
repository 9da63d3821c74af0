"""The watchdog in one process: beats keep it quiet; without them it prints the phase and this
process's stacks, calls on_stall, and exits with status 4 within the timeout and a few polls."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from xft_dist.runtime import EXIT_STALLED, Watchdog

CHILD = """
import sys, time
from xft_dist.runtime import Watchdog

def stalled(where, idle):
    print(f"on_stall {where} {idle:.1f}", flush=True)

dog = Watchdog(1.0, rank=3, on_stall=stalled).start()
for i in range(int(sys.argv[1])):
    dog.beat(f"beat {i}")
    time.sleep(0.3)
dog.beat("the last phase")
def waiting_forever():
    time.sleep(60)
waiting_forever()
"""


def test_without_beats_it_dumps_the_stack_calls_on_stall_and_exits_4():
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", CHILD, "10"], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == EXIT_STALLED, res.stderr
    assert "watchdog: rank 3 made no progress" in res.stderr and "'the last phase'" in res.stderr
    assert "in waiting_forever" in res.stderr  # the stack of the stalled thread
    assert "on_stall the last phase" in res.stdout
    assert 3.0 + 1.0 <= elapsed < 3.0 + 1.0 + 10, elapsed  # ten beats 0.3 s apart kept it quiet


def test_a_zero_timeout_is_refused():
    with pytest.raises(ValueError, match="0 disables"):
        Watchdog(0, rank=0)
