#!/usr/bin/env python
"""Export a run's newest complete checkpoint (any TP size, any ZeRO stage) to one file.

    python tools/export.py runs/gpt-125m --to fp32 --out gpt-125m.pt
    python tools/export.py runs/gpt-125m/checkpoints/step-00010000 --to fp32 --dtype bf16 --out small.pt

``--to fp32``: the consolidated state dict (the fp32 master weights of the ZeRO partitions, TP
shards joined, vocabulary padding stripped) in ``--dtype``, with the model config, vocabulary and
tokenizer; ``xft_dist.ckpt.load_exported(FILE)`` rebuilds the single-process model from it. The
checkpoint's files are verified against its manifest first.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xft_dist.ckpt.convert import export_fp32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, its checkpoints/ directory or one checkpoint")
    p.add_argument("--to", choices=["fp32"], required=True, help="fp32: our names, one file, any ZeRO stage")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", required=True, help="output file")
    a = p.parse_args(argv)
    try:
        info = export_fp32(a.run, a.out, dtype=DTYPES[a.dtype])
    except (ValueError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {info['checkpoint']} (step {info['step']}), {a.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
