#!/usr/bin/env python
"""Export a run's newest complete checkpoint (any TP size, any ZeRO stage) to one file.

    python tools/export.py runs/gpt-125m --to fp32 --out gpt-125m.pt
    python tools/export.py runs/gpt-125m/checkpoints/step-00010000 --to fp32 --dtype bf16 --out small.pt
    python tools/export.py runs/gpt-125m --to x-transformers --out gpt-125m-xt.pt   # + gpt-125m-xt.json

``--to fp32``: the consolidated state dict (the fp32 master weights of the ZeRO partitions, TP
shards joined, vocabulary padding stripped) in ``--dtype``, with the model config, vocabulary and
tokenizer; ``xft_dist.ckpt.load_exported(FILE)`` rebuilds the single-process model from it.

``--to x-transformers``: a state dict with x-transformers' parameter names in FILE, and beside it,
as FILE with the suffix ``.json``, the constructor call ``{"class": ..., "kwargs": {...}}`` of the
x-transformers model it loads into with ``strict=True`` (``xft_dist.ckpt.build_xtransformers(JSON)``
builds it). Options x-transformers has no equivalent of are refused by name. When x-transformers is
installed the export is checked: the logits of both models on a probe batch are compared.

The checkpoint's files are verified against its manifest first. Exit status 2: bad input.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xft_dist.ckpt.convert import export_fp32
from xft_dist.ckpt.xtransformers import export_xtransformers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, its checkpoints/ directory or one checkpoint")
    p.add_argument("--to", choices=["fp32", "x-transformers", "hf"], required=True,
                   help="fp32: our names, one file; x-transformers: their names + FILE.json constructor call; "
                        "hf: a transformers save_pretrained directory")
    p.add_argument("--format", choices=["torch", "safetensors"], default="torch",
                   help="--to fp32: a torch.save file (weights and config) or a .safetensors file (weights, the "
                        "config and vocabulary as its metadata)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", required=True, help="output file (--to hf: a directory)")
    a = p.parse_args(argv)
    try:
        if a.to == "fp32":
            info = export_fp32(a.run, a.out, dtype=DTYPES[a.dtype], fmt=a.format)
        elif a.to == "hf":
            from xft_dist.ckpt.hf import export_hf

            info = export_hf(a.run, a.out, dtype=DTYPES[a.dtype])
        else:
            info = export_xtransformers(a.run, a.out, dtype=DTYPES[a.dtype])
    except (ValueError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {info['checkpoint']} (step {info['step']}), {a.dtype}")
    if a.to == "hf":
        print(f"wrote {a.out}/: {info['class']} (config.json, model.safetensors, generation_config.json"
              + "".join(f", {f}" for f in info["tokenizer"]) + ")")
        print(f"check: AutoModelForCausalLM.from_pretrained: max |logit difference| vs ours on a probe batch = "
              f"{info['max_abs_diff']:.3g}; greedy continuations {'equal' if info['greedy_equal'] else 'DIFFER'}")
    if a.to == "x-transformers":
        print(f"wrote {info['json']}: {info['spec']['class']}(...)")
        diff = info["max_abs_diff"]
        print("check: x-transformers not installed, logits not compared" if diff is None
              else f"check: max |logit difference| vs ours on a probe batch = {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
