#!/usr/bin/env python
"""``make gpu-smoke``: the first run on a machine with GPUs, in four parts.

1. ``pytest -m gpu``: CUDA kernels against their CPU twins (varlen vs dense-mask attention, fused vs
   unfused loss, SDPA in bf16, CUDA RNG streams per TP rank, a TP=2 NCCL step when 2 GPUs are seen).
2. 30 steps of ``configs/gpt_125m.yaml`` in bf16 on the standard-library shards (TP=2 when two GPUs
   are visible) under the deepspeed launcher.
3. ``tools/bench.py`` at GPT-2 small shape in bf16: tokens/s, memory and MFU side by side with
   x-transformers.
4. Host syncs on the GPU: three training steps of a small decoder LM (one GPU, bf16, ZeRO-1) under
   ``torch.cuda.set_sync_debug_mode("warn")``; every place that waited for the device is printed
   with its count per step (the CPU test, ``tests/distributed/test_host_syncs.py``, allows ours 2).

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


def sync_report(steps: int = 3) -> int:
    """Part 4, in its own process: ``train_step`` under ``set_sync_debug_mode("warn")``, the syncs
    counted by the place in xft_dist (or DeepSpeed, torch) that asked."""
    import collections
    import traceback
    import warnings

    import torch

    from xft_dist.config.load import validate
    from xft_dist.data import Batch
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import VocabFacts, build_run
    from xft_dist.train.step import train_step

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    cfg = validate({"model": {"dim": 256, "depth": 2, "heads": 4}, "data": {"shards": "unused", "seq_len": 256},
                    "parallel": {"zero_stage": 1}, "train": {"global_batch": 8, "micro_batch": 4, "precision": "bf16"}})
    run = build_run(cfg, DistEnv.from_environ(), upto="engine",
                    vocab=VocabFacts(num_tokens=512, pad_id=0, tokenizer_vocab=512, num_sentinels=0))
    ids = torch.randint(1, 512, (8, 257), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.zeros(8, 256, dtype=torch.long)
    doc_ids[:, 100:] = 1
    batch = Batch.of("packed", ids[:, :-1], ids[:, 1:], doc_ids=doc_ids, positions=torch.zeros_like(doc_ids))
    train_step(run.engine, batch, groups=run.groups, micro_batch=4, step=0)  # warm-up: allocations, kernels
    sites: collections.Counter = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        ours = [f for f in frames if "/xft_dist/" in f.filename] or [f for f in frames if "site-packages" in f.filename]
        where = ours[-1] if ours else frames[-1]
        sites[f"{where.filename.split('site-packages/')[-1].split('/work/')[-1]}:{where.lineno} {where.name}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        for i in range(steps):
            train_step(run.engine, batch, groups=run.groups, micro_batch=4, step=i + 1)
        torch.cuda.set_sync_debug_mode("default")
    print(f"host syncs in {steps} steps (per step: {sum(sites.values()) / steps:.1f}):")
    for where, n in sites.most_common():
        print(f"  {n / steps:5.1f} per step  {where}")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--sync-report"]:
        return sync_report()
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
    results["host syncs of a bf16 step"] = step("host syncs", [str(BIN / "python"), "tools/gpu_smoke.py",
                                                               "--sync-report"])
    print("\n== gpu-smoke summary")
    for name, ok in results.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
