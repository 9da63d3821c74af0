"""``tools/bench.py --mode pipeline``: what pipeline stages cost a training step.

For the decoder LM at PP=2 (two ranks, one stage each) with 4 and 8 micro-batches per step, the
trainer's own step (``train_step`` on DeepSpeed's pipeline engine, 1F1B) is timed, and each stage's
busy time (its forward and backward instructions) is measured inside the schedule: the idle
fraction ``1 - busy / schedule time`` per stage, printed beside the 1F1B formula
``(p - 1) / (m + p - 1)``. The step time is compared with PP=1 at the same global batch on the same
two ranks (DP=2).

    python tools/bench.py --mode pipeline --dim 256 --depth 8 --heads 8 --seq 256 --batch 2

``--batch``: rows per micro-batch. Each variant runs in fresh processes (gloo, one thread each).
"""

from __future__ import annotations

import os
import time
from datetime import date


def _config(a, pp: int, micro_batches: int):
    from xft_dist.config.load import validate

    return validate({"model": {"dim": a.dim, "depth": a.depth, "heads": a.heads, "dim_head": a.dim_head,
                               "ff_mult": a.ff_mult, "num_tokens": a.vocab},
                     "data": {"shards": "unused", "seq_len": a.seq, "num_streams": 2},
                     "parallel": {"pp": pp, "zero_stage": 1, "heartbeat_s": 0, "stall_timeout_s": 0},
                     "train": {"global_batch": micro_batches * a.batch, "micro_batch": a.batch,
                               "seed": a.seed},
                     "logging": {"wandb": "disabled", "progress_bar": False}})


def _batch(a, rows: int):
    import torch

    from xft_dist.data.batch import Batch

    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(1, a.vocab, (rows, a.seq + 1), generator=g)
    doc_ids = torch.zeros(rows, a.seq, dtype=torch.long)
    return Batch.of("packed", ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), doc_ids=doc_ids)


def _instrument(engine, busy: dict) -> None:
    """Time this stage's forward and backward instructions, and the schedule up to the reductions."""
    from deepspeed.runtime.pipe import schedule

    table = dict(type(engine)._INSTRUCTION_MAP)

    def timed(fn, key):
        def run(self, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, **kwargs)
            finally:
                busy[key] = busy.get(key, 0.0) + time.perf_counter() - t0
        return run

    for cmd in (schedule.ForwardPass, schedule.BackwardPass):
        table[cmd] = timed(table[cmd], "compute")
    reduce = table[schedule.ReduceTiedGrads]

    def end_of_schedule(self, **kwargs):
        busy["schedule"] = busy.get("schedule", 0.0) + time.perf_counter() - busy["start"]
        return reduce(self, **kwargs)

    table[schedule.ReduceTiedGrads] = end_of_schedule
    engine._INSTRUCTION_MAP = table


def _rank(rank: int, world: int, port: int, a, variant: dict, out) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from xft_dist.parallel import all_gather_object
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import VocabFacts, build_run
    from xft_dist.train.step import train_step

    pp, m = variant["pp"], variant["micro_batches"]
    cfg = _config(a, pp, m)
    vocab = VocabFacts(num_tokens=a.vocab, pad_id=0, tokenizer_vocab=a.vocab, num_sentinels=0)
    run = build_run(cfg, DistEnv.from_environ(), upto="engine", vocab=vocab)
    busy: dict = {}
    if pp > 1:
        _instrument(run.engine, busy)
    rows = cfg.train.global_batch // run.groups.dp_size
    batch = _batch(a, rows)
    times = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            busy.clear()
        busy["start"] = time.perf_counter()
        t0 = time.perf_counter()
        train_step(run.engine, batch, groups=run.groups, micro_batch=cfg.train.micro_batch, step=i)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[a.warmup:])[len(times[a.warmup:]) // 2]
    idle = 1.0 - busy["compute"] / busy["schedule"] if pp > 1 else 0.0
    everyone = all_gather_object({"stage": run.groups.pp_rank, "idle": idle, "step_s": step_s})
    if rank == 0:
        out.put(everyone)
    import torch.distributed as dist

    from xft_dist.parallel import barrier

    barrier()
    dist.destroy_process_group()


def run_variant(a, variant: dict) -> list[dict]:
    from bench_parallel import run_variant as spawn  # tools/bench_parallel.py: fresh gloo processes

    return spawn(a, variant, 2, target=_rank)


def bench_pipeline(a) -> int:
    print(f"# {date.today()}  pipeline: decoder dim={a.dim} depth={a.depth} heads={a.heads} vocab={a.vocab} "
          f"seq={a.seq}, {a.batch} rows per micro-batch, fp32, 2 CPU ranks over gloo; median of {a.steps} steps")
    print(f"{'micro-batches':>14}{'stage':>7}{'idle':>8}{'1F1B (p-1)/(m+p-1)':>21}{'PP=2 step s':>13}"
          f"{'PP=1 DP=2 step s':>18}{'time x':>8}")
    for m in (4, 8):
        piped = run_variant(a, {"pp": 2, "micro_batches": m})
        flat = run_variant(a, {"pp": 1, "micro_batches": m})
        formula = (2 - 1) / (m + 2 - 1)
        base = max(r["step_s"] for r in flat)
        for r in sorted(piped, key=lambda r: r["stage"]):
            step = max(x["step_s"] for x in piped)
            print(f"{m:>14}{r['stage']:>7}{r['idle']:>8.2f}{formula:>21.2f}{step:>13.3f}{base:>18.3f}"
                  f"{step / base:>8.2f}")
    return 0
