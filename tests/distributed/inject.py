"""``launch/pretrain.py`` with a fault installed first, for tests that launch it through the real
launchers: ``XFT_TEST_FAULT`` picks the fault, on one rank (``RANK``) only.

    stall_data:RANK:BATCH    that rank's data loader sleeps for an hour before handing out BATCH (0-based)
    nan:RANK:STEP            that rank's loss is NaN in the first micro-batch of STEP (1-based)
    spike:RANK:STEP:FACTOR   that rank's loss (and gradients) times FACTOR in every micro-batch of STEP
                             (the first time STEP runs: a rolled-back run meets it once)
    slow_write:RANK:SECONDS  that rank's background checkpoint writer takes SECONDS longer over every
                             file (checkpoint.async_save: a save stays in flight)
    full_disk:RANK:STEP      that rank's background writer meets a full disk on the first file of
                             STEP's checkpoint
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


def _scale_loss(at_step: int, factor: float, first_micro_only: bool) -> None:
    """Multiply the model's loss sum by ``factor`` at ``at_step`` (the trainer's step numbers)."""
    import torch

    from xft_dist.models import wrappers
    from xft_dist.train import loop, step

    current = {"step": 0, "micro": 0, "runs": 0}
    original_step = step.train_step

    def counting_step(*args, **kwargs):
        current["step"], current["micro"] = kwargs.get("step", 0), 0
        current["runs"] += current["step"] == at_step
        return original_step(*args, **kwargs)

    loop.train_step = counting_step
    original = wrappers.AutoregressiveWrapper.hidden_loss_sums  # every loss, pipeline stages' too

    def hidden_loss_sums(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        hit = current["step"] == at_step and current["runs"] == 1 and (current["micro"] == 0 or not first_micro_only)
        if self.training and torch.is_grad_enabled():
            current["micro"] += 1
            if hit:
                return (out[0] * factor, *out[1:])
        return out

    wrappers.AutoregressiveWrapper.hidden_loss_sums = hidden_loss_sums


def _slow_write(seconds: float) -> None:
    from xft_dist.ckpt import staging

    original = staging.torch_save

    def slow(obj):
        write = original(obj)

        def writing(path):
            time.sleep(seconds)
            write(path)
        return writing

    staging.torch_save = slow


def _full_disk(at_step: int) -> None:
    import errno

    from xft_dist.ckpt import staging

    original = staging.BackgroundWriter.__init__

    def init(self, path, jobs, *, step):
        if step == at_step:
            def fail(target):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            jobs = [(jobs[0][0], fail), *jobs[1:]]
        original(self, path, jobs, step=step)

    staging.BackgroundWriter.__init__ = init


def launch(config: Path, name: str, *overrides: str, fault: str = "", nproc: int = 2, timeout: int = 300):
    """This entry point under the deepspeed launcher on ``nproc`` CPU ranks, with ``fault``
    installed: the finished process (stdout and stderr captured)."""
    import subprocess

    from ..helpers import cpu_rank_env, free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
           str(free_port()), str(Path(__file__)), "--config", str(config), f"run.name={name}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env={**cpu_rank_env(), "XFT_TEST_FAULT": fault},
                          cwd=REPO, timeout=timeout)


def install(fault: str, rank: int) -> None:
    kind, target, *args = fault.split(":")
    if int(target) != rank:
        return
    if kind == "stall_data":
        _stall_data(int(args[0]))
    elif kind == "nan":
        _scale_loss(int(args[0]), float("nan"), first_micro_only=True)
    elif kind == "spike":
        _scale_loss(int(args[0]), float(args[1]), first_micro_only=False)
    elif kind == "slow_write":
        _slow_write(float(args[0]))
    elif kind == "full_disk":
        _full_disk(int(args[0]))
    else:
        raise ValueError(f"XFT_TEST_FAULT={fault!r}: unknown fault {kind!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if os.environ.get("XFT_TEST_FAULT"):
        install(os.environ["XFT_TEST_FAULT"], int(os.environ.get("RANK", "0")))
    sys.argv = [str(REPO / "launch" / "pretrain.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
