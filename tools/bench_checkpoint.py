"""``tools/bench.py --mode checkpoint``: what a save costs the training loop, synchronous and async.

For each model width in ``--dims`` (decoder LM, ``--depth`` layers, byte vocabulary), the trainer runs
through the deepspeed launcher on 2 CPU ranks twice, ``checkpoint.async_save`` off and on, with the
same seed and data, saving every ``--every`` steps. From each run's ``metrics.jsonl``: the median
``checkpoint/blocking_s`` (how long the loop waited for a save) and ``checkpoint/save_s`` (from the
start of a save to its commit), beside the checkpoint's size on disk (weights + Adam, every rank's
files). Prints one row per size with the async / sync ratio of the blocking time.

    python tools/bench.py --mode checkpoint --dims 256 512 768 --depth 2 --steps 24 --every 6
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _corpus(out: Path) -> None:
    """Shards of the Python standard library's ``json`` and ``email`` sources (byte tokenizer)."""
    stdlib = Path(json.__file__).parent.parent
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), str(stdlib / "json"), str(stdlib / "email"),
           "--include", "*.py", "--out", str(out), "--shard-tokens", "40000", "--workers", "1", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True)


def _run(root: Path, a, dim: int, background: bool) -> dict:
    name = f"d{dim}-{'async' if background else 'sync'}"
    cfg = {"model": {"dim": dim, "depth": a.depth, "heads": max(1, dim // 64)},
           "data": {"shards": str(root / "shards"), "seq_len": a.seq, "num_streams": 2},
           "train": {"steps": a.steps, "global_batch": 2 * a.batch, "micro_batch": a.batch, "seed": a.seed},
           "checkpoint": {"every": a.every, "keep": 2, "async_save": background},
           "logging": {"every": 1000, "wandb": "disabled", "progress_bar": False},
           "run": {"out_dir": str(root / "runs"), "name": name}}
    (root / f"{name}.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(29700 + dim % 97),
           str(REPO / "launch" / "pretrain.py"), "--config", str(root / f"{name}.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    ckpt = root / "runs" / name / "checkpoints"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    size = sum(v["size"] for v in json.loads((latest / "files.json").read_text())["files"].values())
    return {"blocking": statistics.median(r["checkpoint/blocking_s"] for r in rows if "checkpoint/blocking_s" in r),
            "save": statistics.median(r["checkpoint/save_s"] for r in rows if "checkpoint/save_s" in r),
            "losses": [r["loss"] for r in rows if "loss" in r], "mb": size / 2**20}


def bench_checkpoint(a) -> int:
    print(f"checkpoint saves, 2 CPU ranks (gloo), decoder depth {a.depth}, seq {a.seq}, {a.steps} steps, a save "
          f"every {a.every}; medians over the run's saves ({date.today()})")
    print(f"{'dim':>5} {'checkpoint':>11} {'sync block':>11} {'async block':>12} {'ratio':>6} "
          f"{'sync save':>10} {'async save':>11}  losses")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _corpus(root / "shards")
        for dim in a.dims:
            sync, bg = _run(root, a, dim, False), _run(root, a, dim, True)
            same = "equal" if sync["losses"] == bg["losses"] else "DIFFER"
            print(f"{dim:>5} {sync['mb']:>8.1f} MB {sync['blocking']:>10.3f}s {bg['blocking']:>11.3f}s "
                  f"{bg['blocking'] / sync['blocking']:>6.2f} {sync['save']:>9.3f}s {bg['save']:>10.3f}s  {same}",
                  flush=True)
    return 0
