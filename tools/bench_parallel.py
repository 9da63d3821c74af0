"""``tools/bench.py --mode memory`` and ``--mode comm``: what tensor parallelism costs a training step.

memory   activation memory per rank (the bytes a forward leaves alive for its backward, read from the
         C allocator: ``mallinfo2``, every CPU tensor included) and step time (forward + loss +
         backward) of the decoder LM: TP=2 with and without sequence parallelism, and recomputation
         off / selective / full, causal (the trainer's packed rows take the same kernels) and with a
         key-padding mask. Ratios are printed against the variant without the feature.
comm     the collective ledger of one step (forward + loss + backward) at TP=2, per layer and in
         total, next to the analytical minimum (``xft_dist.models.collectives.tp_minimum``).
         Only tensor-parallel collectives are xft_dist's own; DeepSpeed's data-parallel gradient
         reduction is not in the ledger.

    python tools/bench.py --mode memory --dim 256 --depth 4 --heads 8 --seq 2048 --batch 1
    python tools/bench.py --mode comm --dim 768 --depth 12 --heads 12 --seq 1024 --batch 1   # GPT-125M shape
    python tools/bench.py --mode comm --config configs/t5_base.yaml --batch 1   # a run config's model, at TP=2

With ``--config`` the model is the one the trainer builds from that config (``build_model``; its
vocabulary from ``model.num_tokens``, else ``--vocab``), at TP=2, with the config's sequence
length(s); ``parallel.sequence_parallel`` and ``model.activation_checkpointing`` are then the
variants' own.

Each variant runs in fresh processes (TP ranks over gloo, one thread each), so allocations do not mix.
"""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import time
from datetime import date


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                 "uordblks", "fordblks", "keepcost")]


def allocated_bytes() -> int:
    """Bytes the C allocator has handed out and not taken back (heap and mmapped chunks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def _from_config(a, groups, sp, ckpt):
    from xft_dist.config.load import load_config
    from xft_dist.models.factory import build_model

    tp = 1 if groups is None else groups.tp_size
    cfg = load_config(a.config, [f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
                                 f"model.activation_checkpointing={ckpt}", "model.attn_dropout=0",
                                 "model.ff_dropout=0"])
    a.seq = cfg.data.seq_len
    a.enc_seq = cfg.data.enc_len if cfg.model.kind == "encoder_decoder" else None
    a.dim = cfg.model.dim
    return build_model(cfg, groups or _single(), None, num_tokens=cfg.model.num_tokens or a.vocab, pad_id=0)


def _single():
    from xft_dist.parallel import ParallelGroups

    return ParallelGroups.single()


def build_lm(a, *, groups=None, sp=False, ckpt=0):
    import torch

    torch.manual_seed(0)
    if getattr(a, "config", None):
        return _from_config(a, groups, sp, ckpt)
    from xft_dist import AutoregressiveWrapper, Decoder, TransformerWrapper

    a.enc_seq = None
    layers = Decoder(dim=a.dim, depth=a.depth, heads=a.heads, attn_dim_head=a.dim // a.heads, ff_mult=a.ff_mult,
                     groups=groups, sequence_parallel=sp, activation_checkpointing=ckpt)
    net = TransformerWrapper(num_tokens=a.vocab, max_seq_len=a.seq, attn_layers=layers, tie_embedding=True)
    return AutoregressiveWrapper(net, fused_loss=True)


def measure_step(model, a, *, padding_mask: bool = False) -> dict:
    """Activation bytes of one forward and the median forward + backward time. ``padding_mask``:
    the last 8 positions are padding (a key-padding mask: attention takes its masked path)."""
    import torch

    inputs = _inputs(model, a)
    kw = {}
    if padding_mask:
        kw["src_mask" if a.enc_seq else "mask"] = mask = torch.ones(inputs[0].shape, dtype=torch.bool)
        mask[:, -8:] = False
    model(*inputs, **kw).backward()  # warm up: lazily allocated buffers, kernels chosen
    model.zero_grad(set_to_none=False)
    gc.collect()
    before = allocated_bytes()
    loss = model(*inputs, **kw)
    activations = allocated_bytes() - before
    loss.backward()
    del loss
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        model(*inputs, **kw).backward()
        times.append(time.perf_counter() - t)
    return {"activation_bytes": activations, "step_s": sorted(times)[len(times) // 2], "shape": _shape(a)}


def _inputs(model, a) -> tuple:
    """A step's inputs: ``(tokens,)`` for a decoder LM (``seq`` positions after the shift), or
    ``(src, tgt)`` for an encoder-decoder (the decoder reads ``seq`` positions)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    vocab = min(a.vocab, 256)
    tgt = torch.randint(1, vocab, (a.batch, a.seq + 1), generator=gen)
    if a.enc_seq is None:
        return (tgt,)
    return torch.randint(1, vocab, (a.batch, a.enc_seq), generator=gen), tgt


def _ledger(model, a):
    from xft_dist.models.collectives import ledger_table, tp_minimum
    from xft_dist.parallel import CollectiveLedger

    inputs = _inputs(model, a)
    with CollectiveLedger() as led:
        led.watch(model)
        model(*inputs).backward()
    min_bytes = a.batch * (a.seq // 2) * a.dim * 4
    return {"ledger": sorted(ledger_table(led.records, min_bytes=min_bytes).items()),
            "minimum": sorted(tp_minimum(model, batch=a.batch, seq=a.seq, context_seq=a.enc_seq).items()),
            "shape": _shape(a)}


def _rank(rank: int, world: int, port: int, a, variant: dict, out) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from xft_dist.parallel import ParallelGroups, barrier

    groups = None
    if world > 1:
        dist.init_process_group("gloo")
        groups = ParallelGroups.build(tp_size=world)
    model = build_lm(a, groups=groups, sp=variant.get("sp", False), ckpt=variant.get("ckpt", 0))
    result = _ledger(model, a) if a.mode == "comm" else measure_step(model, a, padding_mask=variant.get("mask", False))
    if rank == 0:
        out.put(result)
    if world > 1:
        barrier()
        dist.destroy_process_group()


def run_variant(a, variant: dict, world: int, target=None) -> dict:
    """``target(rank, world, port, a, variant, out)`` (default: this module's rank) in ``world``
    fresh processes; what rank 0 puts in ``out``."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target or _rank, args=(r, world, port, a, variant, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"variant {variant}: a rank exited with {p.exitcode}")
    return result


def _shape(a) -> str:
    if getattr(a, "config", None):
        enc = f" enc_len={a.enc_seq}" if a.enc_seq else ""
        return f"{a.config} (model as configured), seq={a.seq}{enc} batch={a.batch}, fp32, CPU ranks over gloo"
    return (f"decoder dim={a.dim} depth={a.depth} heads={a.heads} ff_mult={a.ff_mult} vocab={a.vocab} "
            f"seq={a.seq} batch={a.batch}, fp32, CPU ranks over gloo")


def bench_memory(a) -> int:
    rows = [("TP=2", dict(), 2), ("TP=2 + sequence parallel", dict(sp=True), 2),
            ("TP=2 full", dict(ckpt=1), 2), ("TP=2 full + sequence parallel", dict(ckpt=1, sp=True), 2),
            ("TP=1 no recompute", dict(), 1), ("TP=1 selective", dict(ckpt="selective"), 1),
            ("TP=1 full", dict(ckpt=1), 1), ("TP=1 padding mask", dict(mask=True), 1),
            ("TP=1 padding mask selective", dict(mask=True, ckpt="selective"), 1)]
    results = {name: run_variant(a, variant, world) for name, variant, world in rows}
    print(f"# {date.today()}  memory: {results['TP=2']['shape']}")
    print(f"{'':32}{'activations MiB':>16}{'step s':>9}{'memory x':>10}{'time x':>8}")
    for name, _, _ in rows:
        base = results["TP=2 full" if name.startswith("TP=2 full") else "TP=2" if name.startswith("TP=2") else
                       "TP=1 padding mask" if "mask" in name else "TP=1 no recompute"]
        r = results[name]
        print(f"{name:32}{r['activation_bytes'] / 2**20:>16.1f}{r['step_s']:>9.3f}"
              f"{r['activation_bytes'] / base['activation_bytes']:>10.2f}{r['step_s'] / base['step_s']:>8.2f}")
    return 0


def bench_comm(a) -> int:
    for i, (name, variant) in enumerate((("TP=2", {}), ("TP=2 + sequence parallel", {"sp": True}),
                                         ("TP=2 + full recompute", {"ckpt": 1}))):
        r = run_variant(a, variant, 2)
        if i == 0:
            print(f"# {date.today()}  comm: {r['shape']}; TP=2, one forward + loss + backward; activation-sized "
                  "collectives (at least [b, n/2, d])")
        ledger, minimum = dict(map(tuple, r["ledger"])), dict(map(tuple, r["minimum"]))
        print(f"\n## {name}\n{'layer':34}{'phase':11}{'kind':16}{'ledger n':>9}{'min n':>7}{'ledger MiB':>12}"
              f"{'min MiB':>9}")
        for key in sorted(set(ledger) | set(minimum)):
            (gc_, gb), (mc, mb) = ledger.get(key, (0, 0)), minimum.get(key, (0, 0))
            if gc_ == mc == 0:
                continue
            print(f"{key[0]:34}{key[1]:11}{key[2]:16}{gc_:>9}{mc:>7}{gb / 2**20:>12.2f}{mb / 2**20:>9.2f}")
        tc, tb = (sum(v[i] for v in ledger.values()) for i in (0, 1))
        mc, mb = (sum(v[i] for v in minimum.values()) for i in (0, 1))
        print(f"{'total':61}{tc:>9}{mc:>7}{tb / 2**20:>12.2f}{mb / 2**20:>9.2f}"
              f"   ratio to the minimum: count {tc / mc:.2f}, bytes {tb / mb:.2f}")
    return 0
