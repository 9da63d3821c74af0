#!/usr/bin/env python
"""Consolidate a tensor-parallel checkpoint into one file a single process can load, or convert it
to DeepSpeed's universal format for a resume at another TP x DP layout.

    python tools/convert_ckpt.py runs/gpt-125m                         # the run's newest complete checkpoint
    python tools/convert_ckpt.py runs/x/checkpoints/step-00001000 --out model.pt
    python tools/convert_ckpt.py runs/gpt-125m --to universal         # -> <checkpoint>/universal

Load a consolidated file with ``xft_dist.ckpt.convert.load_consolidated("model.pt")`` (a TP=1 model).
A run with ``checkpoint.reshard: auto`` makes the universal conversion by itself when it needs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from xft_dist.ckpt import CheckpointManager
from xft_dist.ckpt.convert import at_tp1, consolidate, read_checkpoint_config
from xft_dist.runtime import DistEnv
from xft_dist.train.setup import VocabFacts, build_run


def reference_model(ckpt: Path) -> torch.nn.Module:
    """The TP=1 model of the checkpoint's config, on the meta device, built as the trainer builds it."""
    cfg, shared = read_checkpoint_config(ckpt)
    cfg = at_tp1(cfg)
    vocab = VocabFacts(num_tokens=shared["num_tokens"], pad_id=shared["pad_id"], tokenizer_vocab=shared["num_tokens"],
                       num_sentinels=0)
    return build_run(cfg, DistEnv.single(), upto="model", vocab=vocab, device="meta").model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint directory, a checkpoints/ directory or a run directory")
    p.add_argument("--out", help="output file (default: <checkpoint>/consolidated.pt)")
    p.add_argument("--to", choices=["consolidated", "universal"], default="consolidated")
    a = p.parse_args(argv)
    path = Path(a.path)
    if not (path / "COMPLETE").exists():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = CheckpointManager(root).latest()
        if path is None:
            print(f"convert_ckpt: no complete checkpoint under {a.path}", file=sys.stderr)
            return 2
    try:
        if a.to == "universal":
            from xft_dist.ckpt.universal import to_universal

            read_checkpoint_config(path)  # complete and verified
            print(f"wrote {to_universal(path)}")
            return 0
        data = consolidate(path, reference=reference_model(path))
    except ValueError as e:
        print(f"convert_ckpt: {e}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else path / "consolidated.pt"
    torch.save(data, out)
    n = sum(t.numel() for t in data["model"].values())
    print(f"wrote {out}: step {data['step']}, {len(data['model'])} tensors, {n:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
