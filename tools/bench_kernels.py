"""``tools/bench.py --mode loss`` and ``--mode attention``: the fused pieces against what they
replace, each measured in its own process (peak memory is the process's own).

loss       head + cross-entropy, forward + backward: ``fused_head_cross_entropy`` vs ``F.linear`` +
           ``vocab_parallel_cross_entropy``. Memory beyond the inputs and their gradients, as a
           fraction of the full logits (tokens x vocab x 4 bytes), and time.
attention  packed rows (``--docs`` documents of equal length in one row of ``--seq`` tokens),
           forward + backward: the varlen path vs one causal SDPA call over the whole row with no
           mask (memory) and vs the sum of one causal SDPA call per document (time).

Memory is the resident set's high-water mark (``VmHWM``) above what the process held before the
measured call; on CUDA it is ``max_memory_allocated`` above the same baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date

MiB = 2 ** 20


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak bytes above the baseline at construction (CUDA allocator, else the resident set)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss("VmRSS")

    def __call__(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss("VmHWM") - self.base


def _timed(fn, repeats: int, device: str) -> float:
    import torch

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_loss(variant: str, a, group=None) -> dict:
    """One rank: this rank's vocab shard of the head (``a.vocab / tp`` rows) over the TP ``group``."""
    import torch
    import torch.nn.functional as F

    from xft_dist.nn import fused_head_cross_entropy, vocab_parallel_cross_entropy
    from xft_dist.parallel import copy_to_tp

    torch.manual_seed(0)
    device, dtype = a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32
    hidden = torch.randn(a.tokens, a.dim, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(a.vocab // a.tp, a.dim, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    target = torch.randint(0, a.vocab, (a.tokens,), device=device)
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()  # the inputs' gradients: not "extra"
    kw = dict(group=group, vocab_size=a.vocab, check_ids=False)

    def step():
        hidden.grad = weight.grad = None
        if variant == "fused":
            losses = fused_head_cross_entropy(hidden, weight, target, uniform_grad=True, **kw)
        else:
            losses = vocab_parallel_cross_entropy(F.linear(copy_to_tp(hidden, group), weight), target, **kw)
        losses.mean().backward()

    step()  # warm-up, outside the measured peak
    hidden.grad = weight.grad = None
    peak = Peak(device)
    seconds = _timed(step, a.steps, device)
    return {"variant": variant, "seconds": seconds, "extra_bytes": peak() - grads}


def run_attention(variant: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    from xft_dist.data.batch import DocLayout
    from xft_dist.nn import Attention

    torch.manual_seed(0)
    device, dtype = a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32
    h, d, n = a.heads, a.dim_head, a.seq
    doc_len = n // a.docs
    q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    doc_ids = torch.arange(n).div(doc_len, rounding_mode="floor").clamp(max=a.docs - 1)[None]
    layout = DocLayout.from_doc_ids(doc_ids).to(device)
    attn = Attention(h * d, heads=h, dim_head=d, causal=True)
    # the per-document reference: each document its own contiguous tensors, one causal call each
    docs = [tuple(t[:, :, s:s + doc_len].detach().clone().requires_grad_(True) for t in (q, k, v))
            for s in range(0, n, doc_len)]
    grads = 3 * q.numel() * q.element_size()  # the inputs' gradients: not "extra"

    def step():
        if variant == "varlen":
            attn._varlen(q, k, v, layout, True, 0.0).float().square().mean().backward()
        elif variant == "causal row":
            F.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().mean().backward()
        else:
            for dq, dk, dv in docs:
                F.scaled_dot_product_attention(dq, dk, dv, is_causal=True).float().square().mean().backward()
        for t in (q, k, v, *(t for doc in docs for t in doc)):
            t.grad = None

    step()
    peak = Peak(device)
    seconds = _timed(step, a.steps, device)
    return {"variant": variant, "seconds": seconds, "extra_bytes": peak() - grads}


VARIANTS = {"loss": ("fused", "unfused"), "attention": ("varlen", "causal row", "per document")}


def kernels(a, argv: list[str]) -> int:
    rows = []
    for variant in VARIANTS[a.mode]:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), *argv,
               "--impl", variant]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{variant} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# {date.today()}  {a.mode}: device={a.device} dtype={a.dtype} "
          + (f"tokens={a.tokens} dim={a.dim} vocab={a.vocab} tp={a.tp} (rank 0)" if a.mode == "loss"
             else f"seq={a.seq} docs={a.docs} heads={a.heads}x{a.dim_head}"))
    print(f"# python tools/bench.py {' '.join(argv)}")
    print(f"{'':14}{'seconds':>9}{'extra MiB':>11}")
    for r in rows:
        print(f"{r['variant']:14}{r['seconds']:>9.3f}{r['extra_bytes'] / MiB:>11.0f}")
    by = {r["variant"]: r for r in rows}
    if a.mode == "loss":
        logits = a.tokens * a.vocab // a.tp * 4
        print(f"full logits (of this rank's shard): {logits / MiB:.0f} MiB; extra memory / logits: fused "
              f"{by['fused']['extra_bytes'] / logits:.3f}, unfused {by['unfused']['extra_bytes'] / logits:.3f}; "
              f"time fused / unfused {by['fused']['seconds'] / by['unfused']['seconds']:.2f}")
    else:
        memory = by['varlen']['extra_bytes'] / max(by['causal row']['extra_bytes'], 1)
        print(f"memory varlen / causal row {memory:.2f}; "
              f"time varlen / per document {by['varlen']['seconds'] / by['per document']['seconds']:.2f}")
    return 0


def _loss_rank(rank: int, variant: str, a, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(a.tp))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from xft_dist.parallel import barrier

    result = run_loss(variant, a, dist.group.WORLD)
    if rank == 0:
        out.put(result)
    barrier()
    dist.destroy_process_group()


def run_variant(variant: str, a) -> dict:
    if a.mode == "attention":
        return run_attention(variant, a)
    if a.tp == 1:
        return run_loss(variant, a)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_loss_rank, args=(r, variant, a, port, out)) for r in range(a.tp)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
    return result
