"""Helpers shared by the test suites: ports, the environment of a CPU rank, and shard builders.

Synthetic corpora: every document starts with its own index, so tests can tell exactly which
documents a batch holds. ``stdlib_shards``: real text (Python sources) through tools/make_shards.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

from xft_dist.data.shards import ShardWriter
from xft_dist.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "GROUP_RANK", "ROLE_", "TORCHELASTIC_")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_rank_env(*, clean: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a CPU rank: one OpenMP thread, DeepSpeed's CPU accelerator, W&B offline,
    and DeepSpeed's JIT-built op cached in the repo. ``clean`` drops launcher variables inherited
    from this process (so a test sets exactly the ones it means)."""
    base = {k: v for k, v in os.environ.items() if not (clean and k.startswith(LAUNCHER_VARS))}
    return {**base, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
            **extra}


BASE = 200  # document index in two "digits" of base 200, offset past the specials (0 pad, 1 eos, 2 bos)


def doc_tokens(index: int, rng: np.random.Generator, max_len: int = 40) -> np.ndarray:
    body = rng.integers(3, 259, size=int(rng.integers(1, max_len)))
    return np.concatenate([[3 + index // BASE, 3 + index % BASE], body]).astype(np.int64)


def doc_index(tokens) -> int:
    return (int(tokens[0]) - 3) * BASE + int(tokens[1]) - 3


def make_corpus(out_dir, *, num_docs: int = 400, shard_tokens: int = 1500, seed: int = 0, max_len: int = 40):
    """Shards of synthetic documents (byte tokenizer ids); returns the documents by index."""
    rng = np.random.default_rng(seed)
    docs = [doc_tokens(i, rng, max_len) for i in range(num_docs)]
    with ShardWriter(out_dir, ByteTokenizer().identity(), shard_tokens=shard_tokens) as w:
        for d in docs:
            w.write(d)
    return docs


def stdlib_shards(out, *packages: str, shard_tokens: int = 20000):
    """Real text for training tests: the Python sources of stdlib packages, through tools/make_shards.py."""
    import json
    import subprocess
    import sys

    stdlib = Path(json.__file__).parent.parent
    tool = REPO / "tools" / "make_shards.py"
    res = subprocess.run([sys.executable, str(tool), *(str(stdlib / p) for p in packages or ("json",)),
                          "--include", "*.py", "--out", str(out), "--shard-tokens", str(shard_tokens),
                          "--workers", "1", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


def kill_groups(procs) -> None:
    """SIGKILL the process group of every process still running (each started with start_new_session)."""
    import signal

    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def wait_for_training(procs, metrics, *, rows: int = 3, limit_s: float = 240) -> None:
    """Until ``metrics`` (a run's metrics.jsonl) has ``rows`` rows; a process that ends first, or the
    limit, fails the test with the processes' output."""
    import time

    import pytest

    deadline = time.monotonic() + limit_s
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            outs = [p.communicate(timeout=30)[0] if p.poll() is not None else "(running)" for p in procs]
            kill_groups(procs)
            pytest.fail("the run did not start training:\n" + "\n---\n".join((o or "")[-3000:] for o in outs))
        time.sleep(0.3)
