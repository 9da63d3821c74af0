#!/usr/bin/env python
"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny.yaml [key.path=value ...]
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/tiny.yaml model.depth=4

A configuration error exits with status 2 and a message naming the key, the value and what was
expected; a non-finite loss under ``train.nonfinite=stop``, or a loss spike after
``train.spike.max_rollbacks`` rollbacks, with status 5 (every rank, the same step);
a lost peer with 3; a stalled rank (``parallel.stall_timeout_s``) with 4.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (may list defaults: presets)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=4 train.steps=100")
    args = p.parse_args(argv)

    from xft_dist.config import ConfigError, dump_config, load_config
    from xft_dist.data import DataError
    from xft_dist.runtime import LaunchError, StopSignals

    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            print(dump_config(cfg))
            return 0
        from xft_dist.train.loop import run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with StopSignals() as stop:  # SIGTERM / SIGUSR1: checkpoint and stop at the end of the step
            run(cfg, local_rank=args.local_rank, stop=stop)
    except (ConfigError, DataError, LaunchError) as e:
        print(f"pretrain: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only the trainer's TrainingHalted is turned into a status here
        from xft_dist.train.step import TrainingHalted

        if not isinstance(e, TrainingHalted):
            raise
        print(f"pretrain: {type(e).__name__}: {e}", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
