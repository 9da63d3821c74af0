#!/usr/bin/env python
"""``make gpu-smoke``: the first run on a machine with GPUs, in three parts.

1. ``pytest -m gpu``: CUDA kernels against their CPU twins (varlen vs dense-mask attention, fused vs
   unfused loss, SDPA in bf16, CUDA RNG streams per TP rank, a TP=2 NCCL step when 2 GPUs are seen).
2. 30 steps of ``configs/gpt_125m.yaml`` in bf16 on the standard-library shards (TP=2 when two GPUs
   are visible) under the deepspeed launcher.
3. ``tools/bench.py`` at GPT-2 small shape in bf16: tokens/s, memory and MFU side by side with
   x-transformers.

It uses the torch in ``.venv``; with a CPU build or no visible device it says what to install and
exits with status 2. Record what it prints in docs/perf.md (GPU model, date, command).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BENCH = ["--dim", "768", "--depth", "12", "--heads", "12", "--dim-head", "64", "--vocab", "50304", "--seq", "1024",
         "--batch", "8", "--dtype", "bf16"]


def cuda_devices() -> tuple[int, str]:
    """(visible GPUs, what is wrong if none)."""
    import torch

    if torch.version.cuda is None:
        return 0, (f"this torch ({torch.__version__}) is a CPU build. Install the CUDA build of the same "
                   "version first, e.g. .venv/bin/pip install torch==2.13.0 --index-url "
                   "https://download.pytorch.org/whl/cu128 (match your driver's CUDA), then make gpu-smoke")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return 0, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi, "
                   "CUDA_VISIBLE_DEVICES and the driver")
    return torch.cuda.device_count(), ""


def step(title: str, cmd: list[str], env: dict | None = None) -> bool:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}).returncode == 0


def main() -> int:
    gpus, problem = cuda_devices()
    if not gpus:
        print(f"gpu-smoke: {problem}", file=sys.stderr)
        return 2
    import torch

    print(f"gpu-smoke: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    tp = 2 if gpus >= 2 else 1
    shards = REPO / "data" / "stdlib"
    tests = [str(BIN / "python"), "-m", "pytest", "-m", "gpu", "tests/gpu", "-q"]
    results = {"pytest -m gpu": step("GPU tests", tests)}
    if not (shards / "manifest.json").exists():
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        step("shards", [str(BIN / "python"), "tools/make_shards.py", *map(str, sorted(stdlib.glob("*.py"))),
                        "--out", str(shards), "--shard-tokens", "250000", "--overwrite", "--quiet"])
    results[f"gpt_125m bf16, 30 steps, TP={tp}"] = step("pretrain", [
        str(BIN / "deepspeed"), "--num_gpus", str(tp), "launch/pretrain.py", "--config", "configs/gpt_125m.yaml",
        f"data.shards={shards}", "data.num_streams=8", "data.num_workers=1", "train.steps=30", "train.global_batch=64",
        "train.micro_batch=16", f"parallel.tp={tp}", "run.name=gpu-smoke", "checkpoint.resume=false",
        "checkpoint.every=1000", "logging.every=5", "logging.wandb=disabled", "schedule.warmup_steps=5"])
    results["bench GPT-2 small bf16"] = step("bench", [str(BIN / "python"), "tools/bench.py", *BENCH])
    print("\n== gpu-smoke summary")
    for name, ok in results.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
