#!/usr/bin/env python
"""Continue a prompt with a run's newest complete checkpoint (any TP size, ZeRO 0-2), in one process.

    python tools/generate.py runs/tiny --prompt "def "
    python tools/generate.py runs/tiny --prompt "import " --tokens 200 --temperature 0.8 --top-p 0.95 --seed 1
    python tools/generate.py runs/tiny --prompt "def " --temperature 0          # greedy

Text is encoded and decoded with the run's tokenizer (the byte tokenizer by itself; another one
from ``--tokenizer FILE``, checked against the one the run was trained with). Decoder LMs only.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xft_dist.ckpt.convert import load_checkpoint_model
from xft_dist.data import DataError, Manifest
from xft_dist.data.tokenizer import tokenizer_from_identity
from xft_dist.train.samples import decode_row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, its checkpoints/ directory or one checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="the run's tokenizer file (not needed for the byte tokenizer)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    a = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    try:
        model, cfg, shared, ckpt = load_checkpoint_model(a.run, device=device)
        if cfg.data.mode == "span":
            raise ValueError(f"{ckpt}: an encoder-decoder (data.mode=span); generate.py continues decoder LMs")
        identity = shared.get("tokenizer") or Manifest.load(cfg.data.primary_shards).tokenizer
        tok = tokenizer_from_identity(identity, a.tokenizer)
        prompts = []
        for text in a.prompt:
            ids = tok.encode(text)
            if not ids:
                raise ValueError(f"prompt {text!r} encodes to no tokens")
            prompts.append(torch.tensor(ids, dtype=torch.long, device=device))
        out = model.generate(prompts, a.tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                             min_p=a.min_p, eos_token=tok.eos_id, seed=a.seed)
    except (ValueError, DataError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    print(f"# {ckpt} (step {shared['step']})", file=sys.stderr)
    for text, row in zip(a.prompt, out.tolist()):
        print(text + decode_row(tok, row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
