#!/usr/bin/env python
"""Training curves of one or more runs on one figure, from their ``metrics.jsonl``.

    python tools/plot.py runs/tiny runs/again --x tokens --out curves.png

Each RUN is a run directory (holding metrics.jsonl) or a metrics.jsonl file. Training loss per step
(raw and smoothed), validation loss at its points, learning rate on a second axis. A rollback's
repeated steps: the last record of a step counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis")
    p.add_argument("--out", required=True, help="output image (PNG, SVG, PDF: by its suffix)")
    a = p.parse_args(argv)
    from xft_dist.obs.plot import curves, plot, read_rows

    runs = []
    for r in a.runs:
        path = Path(r) / "metrics.jsonl" if Path(r).is_dir() else Path(r)
        if not path.is_file():
            print(f"plot: {r}: no metrics.jsonl there", file=sys.stderr)
            return 2
        label = path.parent.name if path.name == "metrics.jsonl" else path.stem
        runs.append(curves(read_rows(path), label=label, x=a.x))
    plot(runs, a.out, x=a.x)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
