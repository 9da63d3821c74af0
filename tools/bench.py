#!/usr/bin/env python
"""Side-by-side training-step benchmark: xft_dist vs x-transformers, same shape, same data.

    python tools/bench.py                         # tiny CPU-friendly shape
    python tools/bench.py --dim 768 --depth 12 --heads 12 --seq 1024 --batch 8 --dtype bf16   # on a GPU
    python tools/bench.py --mode data [--shards DIR]   # raw webdataset read vs the packed loader
    python tools/bench.py --mode converge --dim 192 --depth 4 --heads 6 --lr 2e-3   # loss curves, same batches
    python tools/bench.py --mode loss --tokens 8192 --dim 1024 --vocab 32768       # fused head + loss vs unfused
    python tools/bench.py --mode attention --seq 8192 --docs 8                       # packed (varlen) attention

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
    p.add_argument("--mode", choices=["model", "data", "converge", "loss", "attention"], default="model")
    p.add_argument("--tokens", type=int, default=8192, help="loss mode: tokens")
    p.add_argument("--docs", type=int, default=8, help="attention mode: documents per row")
    p.add_argument("--tp", type=int, default=1, help="loss mode: tensor-parallel ranks (gloo processes)")
    p.add_argument("--shards", help="data mode: a shard directory (default: a synthetic corpus in a temp dir)")
    p.add_argument("--workers", type=int, default=1, help="data mode: DataLoader workers of the packed loader")
    p.add_argument("--data-tokens", type=int, default=4_000_000, help="data mode: tokens to read per side")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", help=argparse.SUPPRESS)  # internal: run one implementation, print JSON
    p.add_argument("--batches", help=argparse.SUPPRESS)  # internal: converge mode's batch file
    return p.parse_args(argv)


def build(impl: str, a):

    if impl == "xft":
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
        "flops_per_token": model_flops_per_token(flops_model, a.seq),
    }


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


def bench_data(a) -> int:
    """Tokens/s of a raw webdataset pass over the shards vs the packed, stateful loader."""
    import tempfile

    import numpy as np
    import webdataset as wds

    from xft_dist.data import LoaderConfig, Manifest, StreamingLoader
    from xft_dist.data.shards import ShardWriter
    from xft_dist.data.tokenizer import ByteTokenizer

    tmp = None
    if a.shards is None:
        tmp = tempfile.TemporaryDirectory()
        rng = np.random.default_rng(0)
        with ShardWriter(tmp.name, ByteTokenizer().identity(), shard_tokens=1 << 19) as w:
            for _ in range(4000):
                w.write(rng.integers(3, 259, size=int(rng.integers(64, 2048))))
        a.shards = tmp.name
    m = Manifest.load(a.shards)
    urls = [s.url for s in m.shards]

    def raw_pass():
        n = 0
        while n < a.data_tokens:
            ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x,
                                workersplitter=lambda x: x, empty_check=False).decode()
            for sample in ds:
                n += len(sample["tokens.npy"])
                if n >= a.data_tokens:
                    break
        return n

    streams = max(1, min(8, len(urls)))
    cfg = LoaderConfig(seq_len=a.seq, global_rows=a.batch * streams, num_streams=streams,
                       num_workers=a.workers)

    def packed_pass():
        n, it = 0, iter(StreamingLoader(m, cfg))
        while n < a.data_tokens:
            n += next(it)["input_ids"].numel()
        return n

    rows = []
    for name, fn in (("webdataset raw", raw_pass), ("xft packed", packed_pass)):
        t0 = time.perf_counter()
        n = fn()
        rows.append((name, n / (time.perf_counter() - t0)))
    print(f"# {date.today()}  data: {len(urls)} shards, {m.tokens} tokens; packed loader seq={a.seq} "
          f"rows/step={cfg.global_rows} workers={a.workers}")
    print(f"{'':16}{'tokens/s':>14}")
    for name, rate in rows:
        print(f"{name:16}{rate:>14,.0f}")
    print(f"{'packed / raw':16}{rows[1][1] / rows[0][1]:>14.2f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.mode == "data":
        return bench_data(a)
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
    for impl in IMPLS:
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--impl", impl]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{impl} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    xft, ref = rows
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
    print(f"# FLOPs/token (training, PaLM convention): {xft['flops_per_token']:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
