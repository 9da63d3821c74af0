"""``launch/pretrain.py`` with a fault installed first, for tests that launch it through the real
launchers: ``XFT_TEST_FAULT`` picks the fault, on one rank (``RANK``) only.

    stall_data:RANK:BATCH    that rank's data loader sleeps for an hour before handing out BATCH (0-based)
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _stall_data(at: int) -> None:
    from xft_dist.data import loader

    original = loader.StreamingLoader.__iter__

    def stalling(self):
        for i, batch in enumerate(original(self)):
            if i == at:
                time.sleep(3600)  # a data worker that hangs
            yield batch

    loader.StreamingLoader.__iter__ = stalling


def install(fault: str, rank: int) -> None:
    kind, target, *args = fault.split(":")
    if int(target) != rank:
        return
    if kind == "stall_data":
        _stall_data(int(args[0]))
    else:
        raise ValueError(f"XFT_TEST_FAULT={fault!r}: unknown fault {kind!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if os.environ.get("XFT_TEST_FAULT"):
        install(os.environ["XFT_TEST_FAULT"], int(os.environ.get("RANK", "0")))
    sys.argv = [str(REPO / "launch" / "pretrain.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
