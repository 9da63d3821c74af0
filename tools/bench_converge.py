"""``tools/bench.py --mode converge``: train xft_dist and x-transformers on the same batches with the
same optimizer and schedule, and compare the loss curves.

The batches are byte-level packed rows of Python source (the standard library's modules, through
``tools/make_shards.py`` and the packed loader), drawn once and handed to both sides, which run at
the same time in two processes of one thread each. Both train causal next-token prediction over the
whole row (no document masks: x-transformers has none), with AdamW (betas 0.9 / 0.95), linear
warmup then cosine to 10 %, and grad-norm clipping at 1.0, weight decay on every parameter on both
sides. The architectures match (rotary, pre-norm, GELU feed-forward, untied head unless ``--tie``),
so the difference is the initialisation (``--init``, default the schema's) and little else.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

TAIL = 50  # the summary: mean loss over the last TAIL steps


def make_batches(a, path: Path) -> None:
    """``steps`` batches of ``[batch, seq + 1]`` byte ids from the stdlib corpus, saved to ``path``."""
    import sysconfig

    import torch

    from xft_dist.data import LoaderConfig, StreamingLoader

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shards = path.parent / "shards"
    tool = Path(__file__).resolve().parent / "make_shards.py"
    res = subprocess.run([sys.executable, str(tool), *map(str, sorted(stdlib.glob("*.py"))), "--out", str(shards),
                          "--shard-tokens", "250000", "--quiet"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"make_shards failed:\n{res.stderr[-2000:]}")
    # rows of seq + 1 packed tokens (the inputs of a loader one token longer): both models shift them
    loader = StreamingLoader(shards, LoaderConfig(seq_len=a.seq + 1, global_rows=a.batch * 4, num_streams=4,
                                                  seed=a.seed))
    rows, it = [], iter(loader)
    while len(rows) < a.steps * a.batch:
        rows.extend(next(it).input_ids)
    torch.save(torch.stack(rows[: a.steps * a.batch]).view(a.steps, a.batch, a.seq + 1), path)


def lr_at(step: int, a) -> float:
    """Linear warmup to ``lr``, then cosine to 10 % of it at the last step (as the trainer's schedule)."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    t = (step - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_curve(impl: str, a, build) -> dict:
    """One side: the loss of every step on the saved batches."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    _, model = build(impl, a)
    batches = torch.load(a.batches)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    losses, t0 = [], time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        loss = model(batches[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"impl": impl, "losses": losses, "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def converge(a, argv: list[str]) -> int:
    a.vocab = 259  # the byte tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.pt"
        make_batches(a, batches)
        bench = Path(__file__).resolve().parent / "bench.py"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(bench), *argv, "--vocab", "259", "--impl", impl,
                                   "--batches", str(batches)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for impl in ("xft", "x-transformers")]
        rows = []
        for impl, p in zip(("xft", "x-transformers"), procs):
            out, err = p.communicate()
            if p.returncode != 0:
                print(f"{impl} failed:\n{err[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(out.strip().splitlines()[-1]))
    from xft_dist.config.choices import DEFAULT_INIT

    tail = min(TAIL, a.steps)
    means = [sum(r["losses"][-tail:]) / tail for r in rows]
    print(f"# {date.today()}  converge: dim={a.dim} depth={a.depth} heads={a.heads}x{a.dim_head} seq={a.seq} "
          f"batch={a.batch} steps={a.steps} lr={a.lr:g} wd={a.weight_decay:g} warmup={a.warmup_steps} "
          f"tie={a.tie} init={a.init or DEFAULT_INIT} seed={a.seed}")
    print(f"# python tools/bench.py {' '.join(argv)}")
    print(f"{'':16}{'first':>8}{'last ' + str(tail) + ' mean':>16}{'params':>12}{'seconds':>9}")
    for r, m in zip(rows, means):
        print(f"{r['impl']:16}{r['losses'][0]:>8.3f}{m:>16.4f}{r['params']:>12,}{r['seconds']:>9.0f}")
    print(f"{'xft / x-t':16}{'':>8}{means[0] / means[1]:>16.3f}")
    return 0
