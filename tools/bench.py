#!/usr/bin/env python
"""Side-by-side training-step benchmark: xft_dist vs x-transformers, same shape, same data.

    python tools/bench.py                         # tiny CPU-friendly shape
    python tools/bench.py --dim 768 --depth 12 --heads 12 --seq 1024 --batch 8 --dtype bf16   # on a GPU
    python tools/bench.py --mode data [--shards DIR]   # raw webdataset read vs the packed loader
    python tools/bench.py --mode converge --dim 192 --depth 4 --heads 6 --lr 2e-3   # loss curves, same batches
    python tools/bench.py --mode loss --tokens 8192 --dim 1024 --vocab 32768       # fused head + loss vs unfused
    python tools/bench.py --mode attention --seq 8192 --docs 8                       # packed (varlen) attention
    python tools/bench.py --mode memory --seq 2048 --batch 1       # sequence parallel / recomputation memory
    python tools/bench.py --mode comm --seq 128 --batch 1          # the collective ledger vs the minimum
    python tools/bench.py --mode pipeline --seq 256 --batch 2      # the 1F1B bubble at PP=2 vs PP=1
    python tools/bench.py --mode checkpoint --dims 256 512 768     # what a save blocks: sync vs async

Each implementation runs in its own subprocess (so peak memory is its own): ``warmup`` steps, then
``steps`` timed steps of forward + next-token loss + backward + AdamW. Prints tokens/s, step time,
peak memory (CUDA max allocated, or the process's peak RSS on CPU), MFU where the hardware peak is
known (or given with --peak-tflops), and the xft / x-transformers ratio. x-transformers is a
dev-only dependency (``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date

IMPLS = ("xft", "x-transformers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="model",
                   choices=["model", "data", "converge", "loss", "attention", "memory", "comm", "pipeline",
                            "checkpoint"])
    p.add_argument("--tokens", type=int, default=8192, help="loss mode: tokens")
    p.add_argument("--docs", type=int, default=8, help="attention mode: documents per row")
    p.add_argument("--tp", type=int, default=1, help="loss mode: tensor-parallel ranks (gloo processes)")
    p.add_argument("--shards", help="data mode: a shard directory (default: a synthetic corpus in a temp dir)")
    p.add_argument("--workers", type=int, default=1, help="data mode: DataLoader workers of the packed loader")
    p.add_argument("--data-tokens", type=int, default=4_000_000, help="data mode: tokens to read per side")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--corpus-docs", type=int, default=24000, help="data mode: documents of the synthetic corpus")
    p.add_argument("--shard-mib", type=int, default=1024, help="data mode: shard size for the memory check (0: skip)")
    p.add_argument("--mixture-steps", type=int, default=10_000, help="data mode: steps of the mixture share check")
    p.add_argument("--config", help="memory / comm modes: the model of this run config (at TP=2)")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 512, 768], help="checkpoint mode: model widths")
    p.add_argument("--every", type=int, default=6, help="checkpoint mode: steps between saves")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--ff-mult", type=float, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="hardware peak for MFU (0: known GPUs only)")
    p.add_argument("--lr", type=float, default=2e-3, help="converge mode: peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="converge mode: AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=20, help="converge mode: linear warmup, then cosine")
    p.add_argument("--init", default=None, help="converge mode: xft_dist init scheme (default: the schema's)")
    p.add_argument("--tie", action="store_true", help="converge mode: tie embedding and head on both sides")
    p.add_argument("--compile", action="store_true",
                   help="model mode: also xft with every block through torch.compile (train.compile), and "
                        "the kernels per layer (forward + backward) of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", help=argparse.SUPPRESS)  # internal: run one implementation, print JSON
    p.add_argument("--batches", help=argparse.SUPPRESS)  # internal: converge mode's batch file
    return p.parse_args(argv)


def build(impl: str, a):

    if impl in ("xft", "xft-compiled"):
        extra = {"tie_embedding": a.tie}
        if a.init:
            extra["init"] = a.init
        model = xft_run(a, **extra).model  # the trainer's own wiring: an AutoregressiveWrapper
        return model.net, model
    import x_transformers as xt

    net = xt.TransformerWrapper(num_tokens=a.vocab, max_seq_len=a.seq, use_abs_pos_emb=False,
                                tie_embedding=a.tie,
                                attn_layers=xt.Decoder(dim=a.dim, depth=a.depth, heads=a.heads,
                                                       attn_dim_head=a.dim_head, ff_mult=a.ff_mult,
                                                       rotary_pos_emb=True, attn_flash=True))
    return net, xt.AutoregressiveWrapper(net)


def xft_run(a, **model_overrides):
    """The run the trainer would build for this shape (model stage: no world, no shards)."""
    from xft_dist.config.load import validate
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import VocabFacts, build_run

    model = {"dim": a.dim, "depth": a.depth, "heads": a.heads, "dim_head": a.dim_head, "ff_mult": a.ff_mult,
             "num_tokens": a.vocab, **model_overrides}
    cfg = validate({"model": model, "data": {"shards": "unused", "seq_len": a.seq}, "train": {"seed": a.seed}},
                   "tools/bench.py")
    vocab = VocabFacts(num_tokens=a.vocab, pad_id=0, tokenizer_vocab=a.vocab, num_sentinels=0)
    return build_run(cfg, DistEnv.single(), upto="model", vocab=vocab)


def run_one(impl: str, a) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    torch.manual_seed(a.seed)
    net, model = build(impl, a)
    model.to(device)
    kernels = layer_kernels(impl, a, device) if a.compile else None
    if impl == "xft-compiled":
        from xft_dist.models.compile import compile_blocks

        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if a.dtype == "bf16" else None
    seq = torch.randint(1, a.vocab, (a.batch, a.seq + 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = model(seq)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]  # median
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        hw = torch.cuda.get_device_name()
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hw = f"CPU x{torch.get_num_threads()} threads"
    from xft_dist.models.flops import model_flops_per_token

    flops_model = build("xft", a)[0] if impl != "xft" else net  # same shape: one FLOPs count
    return {
        "impl": impl, "device": device, "hardware": hw, "step_ms": step_s * 1e3,
        "tokens_per_s": a.batch * a.seq / step_s, "peak_mib": peak_mib,
        "params": sum(p.numel() for p in net.parameters()),
        "flops_per_token": model_flops_per_token(flops_model, a.seq), "kernels_per_layer": kernels,
    }


def _step_ops(model, seq) -> int:
    """aten ops dispatched by one forward + loss + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        model(seq).backward()
    return Count.n


def layer_kernels(impl: str, a, device: str) -> float:
    """Kernels one layer runs per training step (forward + backward). Eager: the aten ops of a step
    at ``depth + 1`` minus those at ``depth``. Compiled: the kernels inductor generates for a block's
    forward and backward graphs (every block runs the same ones), matmuls (extern calls) not counted."""
    import copy

    import torch

    seq = torch.randint(1, a.vocab, (a.batch, a.seq + 1), device=device)
    if impl != "xft-compiled":
        counts = []
        for depth in (a.depth + 1, a.depth):
            b = copy.copy(a)
            b.depth = depth
            torch.manual_seed(a.seed)
            counts.append(_step_ops(build(impl, b)[1].to(device), seq))
        return float(counts[0] - counts[1])
    import torch._inductor.metrics as metrics

    from xft_dist.models.compile import compile_blocks

    b = copy.copy(a)
    b.depth = 1
    torch.manual_seed(a.seed)
    model = build("xft", b)[1].to(device)
    compile_blocks(model)
    metrics.reset()
    model(seq).backward()
    return float(metrics.generated_kernel_count)


def peak_flops(hardware: str, a) -> float:
    if a.peak_tflops:
        return a.peak_tflops * 1e12
    from xft_dist.models.flops import PEAK_FLOPS

    if a.dtype != "bf16":
        return 0.0
    for name, peak in PEAK_FLOPS.items():
        if name.split("-")[0] in hardware:
            return peak
    return 0.0


def _synthetic_shards(out, *, docs: int, shard_tokens: int, lo: int = 64, hi: int = 2048, seed: int = 0,
                      ids=(3, 259)):
    import numpy as np

    from xft_dist.data.shards import ShardWriter
    from xft_dist.data.tokenizer import ByteTokenizer

    rng = np.random.default_rng(seed)
    with ShardWriter(out, ByteTokenizer().identity(), shard_tokens=shard_tokens) as w:
        for _ in range(docs):
            w.write(rng.integers(*ids, size=int(rng.integers(lo, hi + 1))))


def _minimal_packer(urls, seq: int, rows: int, eos: int, total: int, clock: dict) -> int:
    """The least work any packer does: decode, append EOS, concatenate, cut rows, shift labels. It
    decodes with the loader's own ``decode_tokens`` (faster than ``np.load``), so the ratio measures
    what packing and bookkeeping cost, not the decoder."""
    import numpy as np
    import torch
    import webdataset as wds

    from xft_dist.data.sources import decode_tokens

    n, buf, have = 0, [], 0
    while n < total:
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x, workersplitter=lambda x: x,
                            empty_check=False)
        for sample in ds:
            doc = decode_tokens(sample["tokens.npy"])
            buf += [doc.astype(np.int64), np.array([eos], dtype=np.int64)]
            have += len(doc) + 1
            need = rows * seq + 1
            if have >= need:
                stream = np.concatenate(buf)
                cut = stream[:need]
                inputs = torch.from_numpy(cut[:-1].reshape(rows, seq).copy())
                labels = torch.from_numpy(cut[1:].reshape(rows, seq).copy())
                if "t0" not in clock:  # the first batch is not timed (as for the loader)
                    clock["t0"] = time.perf_counter()
                else:
                    n += inputs.numel() + 0 * labels.numel()
                buf, have = [stream[need - 1:]], len(stream) - need + 1
                if n >= total:
                    break
    return n


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _memory_child(shards: str, seq: int, streams: int, batches: int) -> None:
    """Child process: RSS before and after reading ``batches`` from ``streams`` streams (JSON on stdout)."""
    from xft_dist.data import LoaderConfig, Manifest, StreamingLoader

    m = Manifest.load(shards)
    before = _rss_mib()
    it = iter(StreamingLoader(m, LoaderConfig(seq_len=seq, global_rows=streams, num_streams=streams)))
    next(it)
    first = peak = _rss_mib()
    for _ in range(batches):
        next(it)
        peak = max(peak, _rss_mib())
    print(json.dumps({"before_mib": before, "first_mib": first, "peak_mib": peak}))


MIX_LENGTHS = {"long": "4k-30k tokens", "short": "16-600 tokens"}


def _mixture_share_errors(root: str, kind: str, steps: int) -> dict[int, float]:
    """The largest |share - weight| over 3 sources, counted from the ids of the rows handed out
    (each source has its own id range), at 100, 1,000, ... steps up to ``steps``."""
    from xft_dist.data import LoaderConfig, Manifest, Mixture, Source, StreamingLoader

    names, weights = ("web", "code", "books"), (0.5, 0.3, 0.2)
    ranges = {"web": (3, 100), "code": (100, 180), "books": (180, 259)}
    lo, hi, docs, shard = (4096, 30_000, 60, 60_000) if kind == "long" else (16, 600, 3000, 30_000)
    for i, n in enumerate(names):
        _synthetic_shards(f"{root}/{n}", docs=docs, shard_tokens=shard, lo=lo, hi=hi, seed=i + 1, ids=ranges[n])
    mix = Mixture([Source(n, Manifest.load(f"{root}/{n}"), w) for n, w in zip(names, weights)])
    it = iter(StreamingLoader(mix, LoaderConfig(seq_len=128, global_rows=8, num_streams=4)))
    counts, out, marks = dict.fromkeys(names, 0), {}, {10 ** k for k in range(2, 8)}
    for step in range(1, steps + 1):
        ids = next(it).input_ids.numpy()
        for n, (a, b) in ranges.items():
            counts[n] += int(((ids >= a) & (ids < b)).sum())
        if step in marks:
            total = sum(counts.values())
            out[step] = max(abs(counts[n] / total - w) for n, w in zip(names, weights))
    return out


def bench_data(a) -> int:
    """Packed loader vs a minimal packer on the same shards (one process, and with workers); loader
    memory with 4 streams over large shards; token shares of a 3-source mixture."""
    import tempfile

    from xft_dist.data import LoaderConfig, Manifest, StreamingLoader

    tmp = tempfile.TemporaryDirectory()
    if a.shards is None:
        _synthetic_shards(f"{tmp.name}/docs", docs=a.corpus_docs, shard_tokens=1 << 20)  # 24000: 25 shards
        a.shards = f"{tmp.name}/docs"
    m = Manifest.load(a.shards)
    urls = [s.url for s in m.shards]
    eos = m.tokenizer["eos_id"]
    print(f"# {date.today()}  data: {len(urls)} shards, {m.tokens:,} tokens, documents of 64-2048 tokens; "
          f"seq {a.seq}, {a.data_tokens:,} tokens per measurement")

    def rate(fn):
        """Tokens/s after the first batch (a loader's first batch waits for its streams' shuffle buffers
        to fill: a start-up cost, not a rate)."""
        clock = {}
        n = fn(clock)
        return n / (time.perf_counter() - clock["t0"])

    def packed(workers):
        streams = min(8, len(urls))
        cfg = LoaderConfig(seq_len=a.seq, global_rows=a.batch * streams, num_streams=streams, num_workers=workers)

        def run(clock):
            it = iter(StreamingLoader(m, cfg))
            next(it)
            clock["t0"], n = time.perf_counter(), 0
            while n < a.data_tokens:
                n += next(it).input_ids.numel()
            return n
        return run

    minimal = rate(lambda clock: _minimal_packer(urls, a.seq, a.batch * 8, eos, a.data_tokens, clock))
    rows = [("minimal packer", minimal)]
    for w in sorted({0, a.workers}):
        rows.append((f"packed, {w} workers", rate(packed(w))))
    print(f"{'':24}{'tokens/s':>14}{'vs minimal':>12}")
    for name, r in rows:
        print(f"{name:24}{r:>14,.0f}{r / minimal:>12.2f}")

    if a.shard_mib:
        big = f"{tmp.name}/big"
        docs = a.shard_mib * (1 << 20) // (2 * 1056)  # uint16 tokens, ~1056 per document
        _synthetic_shards(big, docs=4 * docs, shard_tokens=docs * 1056)
        mb = Manifest.load(big)
        child = subprocess.run([sys.executable, __file__, "--memory-child", big, "--seq", str(a.seq)],
                               capture_output=True, text=True, check=True)
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        size = mb.tokens * 2 / len(mb.shards) / 2**20
        print(f"\nloader memory: 4 streams over {len(mb.shards)} shards of ~{size:,.0f} MiB: RSS "
              f"{mem['before_mib']:,.0f} MiB before the loader, {mem['first_mib']:,.0f} MiB after its first batch, "
              f"peak {mem['peak_mib']:,.0f} MiB over 200 more: growth {mem['peak_mib'] - mem['before_mib']:,.0f} MiB")

    for kind in ("long", "short"):
        errors = _mixture_share_errors(f"{tmp.name}/{kind}", kind, a.mixture_steps)
        print(f"\nmixture of {kind} documents ({MIX_LENGTHS[kind]}), weights 0.5 / 0.3 / 0.2, the tiny shape "
              "(seq 128, 8 rows, 4 streams): largest share error " +
              ", ".join(f"{e:.4f} at {s:,} steps" for s, e in errors.items()))
    tmp.cleanup()
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.memory_child:
        _memory_child(a.memory_child, a.seq, 4, 200)
        return 0
    if a.mode == "data":
        return bench_data(a)
    if a.mode == "checkpoint":
        from bench_checkpoint import bench_checkpoint  # tools/bench_checkpoint.py

        return bench_checkpoint(a)
    if a.mode == "pipeline":
        from bench_pipeline import bench_pipeline  # tools/bench_pipeline.py

        return bench_pipeline(a)
    if a.mode in ("memory", "comm"):
        from bench_parallel import bench_comm, bench_memory  # tools/bench_parallel.py

        return bench_memory(a) if a.mode == "memory" else bench_comm(a)
    if a.mode in ("loss", "attention"):
        from bench_kernels import kernels, run_variant  # tools/bench_kernels.py

        if a.device == "auto":
            import torch

            a.device = "cuda" if torch.cuda.is_available() else "cpu"
        if a.impl:
            print(json.dumps(run_variant(a.impl, a)))
            return 0
        return kernels(a, argv if argv is not None else sys.argv[1:])
    if a.mode == "converge":
        from bench_converge import converge, train_curve  # tools/bench_converge.py

        if a.impl:
            print(json.dumps(train_curve(a.impl, a, build)))
            return 0
        return converge(a, argv if argv is not None else sys.argv[1:])
    if a.impl:
        print(json.dumps(run_one(a.impl, a)))
        return 0
    rows = []
    for impl in (IMPLS[0], "xft-compiled", IMPLS[1]) if a.compile else IMPLS:
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--impl", impl]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{impl} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    xft, ref = rows[0], rows[-1]
    print(f"# {date.today()}  {xft['hardware']}  dtype={a.dtype}  shape: dim={a.dim} depth={a.depth} "
          f"heads={a.heads}x{a.dim_head} ff_mult={a.ff_mult} vocab={a.vocab} seq={a.seq} batch={a.batch}")
    print(f"# {len(sys.argv) and ' '.join(['python tools/bench.py', *(argv if argv is not None else sys.argv[1:])])}")
    peak = peak_flops(xft["hardware"], a)
    head = f"{'':16}{'tokens/s':>12}{'step ms':>10}{'peak MiB':>10}{'params':>12}" + (f"{'MFU':>8}" if peak else "")
    print(head)
    for r in rows:
        line = f"{r['impl']:16}{r['tokens_per_s']:>12.0f}{r['step_ms']:>10.1f}{r['peak_mib']:>10.0f}{r['params']:>12,}"
        if peak:
            line += f"{r['tokens_per_s'] * r['flops_per_token'] / peak:>8.1%}"
        print(line)
    print(f"{'xft / x-t':16}{xft['tokens_per_s'] / ref['tokens_per_s']:>12.2f}{xft['step_ms'] / ref['step_ms']:>10.2f}"
          f"{xft['peak_mib'] / ref['peak_mib']:>10.2f}")
    if a.compile:
        comp = rows[1]
        print(f"{'compiled / eager':16}{comp['tokens_per_s'] / xft['tokens_per_s']:>12.2f}"
              f"{comp['step_ms'] / xft['step_ms']:>10.2f}{comp['peak_mib'] / xft['peak_mib']:>10.2f}")
        print("# kernels per layer, forward + backward: " + ", ".join(
            f"{r['impl']} {r['kernels_per_layer']:.0f}" for r in rows)
              + " (eager: aten ops; compiled: generated kernels, matmuls not counted)")
    print(f"# FLOPs/token (training, PaLM convention): {xft['flops_per_token']:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
