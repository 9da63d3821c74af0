#!/usr/bin/env python
"""Validation loss of a run's newest complete checkpoint (any TP size, ZeRO 0-2), in one process.

    python tools/evaluate.py runs/tiny                       # the run's data.valid.shards
    python tools/evaluate.py runs/tiny --shards data/other/valid --batches 8

Prints loss, perplexity, (byte tokenizer) bits per byte and (masked LM) the masked-token accuracy
over the same fixed validation batches the trainer evaluates on (``data.valid``), so the numbers
match its ``valid/*`` metrics. A masked LM's loss is over the masked tokens only.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xft_dist.ckpt.convert import load_checkpoint_model
from xft_dist.config import ConfigError
from xft_dist.data import DataError, Manifest
from xft_dist.parallel import ParallelGroups
from xft_dist.train.evaluate import evaluate, valid_manifest, validation_batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, its checkpoints/ directory or one checkpoint")
    p.add_argument("--shards", help="validation shards (default: the run's data.valid.shards)")
    p.add_argument("--batches", type=int, help="validation batches (default: the run's data.valid.batches)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    a = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    try:
        model, cfg, shared, ckpt = load_checkpoint_model(a.run, device=device)
        if a.batches is not None:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
                update={"valid": cfg.data.valid.model_copy(update={"batches": a.batches})})})
        tokenizer = shared.get("tokenizer")
        train = Manifest.load(cfg.data.primary_shards) if tokenizer is None else None
        reference = train or _TokenizerOnly(tokenizer)
        manifest = valid_manifest(cfg, reference, a.shards)
        if manifest is None:
            raise ConfigError(f"{ckpt}: the run has no data.valid.shards; pass --shards")
        manifest.check_vocab(shared["num_tokens"])
        batches = validation_batches(cfg, manifest, shared["num_tokens"])
    except (ValueError, ConfigError, DataError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    metrics = evaluate(model, model, batches, groups=ParallelGroups.single(), micro_batch=cfg.train.micro_batch,
                       device=device, byte_tokenizer=manifest.tokenizer.get("kind") == "byte")
    bpb = f", {metrics['valid/bpb']:.4f} bits/byte" if "valid/bpb" in metrics else ""
    acc = f", masked-token accuracy {metrics['valid/mlm_acc']:.4f}" if "valid/mlm_acc" in metrics else ""
    what = "masked tokens" if "valid/mlm_acc" in metrics else "tokens"
    print(f"{ckpt} (step {shared['step']}): validation loss {metrics['valid/loss']:.4f}, perplexity "
          f"{metrics['valid/ppl']:.2f}{bpb}{acc} over {int(metrics['valid/tokens'])} {what} of {manifest.path}")
    return 0


class _TokenizerOnly:
    """What ``valid_manifest`` compares: the tokenizer the checkpoint was trained with."""

    def __init__(self, tokenizer: dict):
        self.tokenizer = tokenizer


if __name__ == "__main__":
    sys.exit(main())
