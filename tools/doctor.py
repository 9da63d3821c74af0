#!/usr/bin/env python
"""Pre-flight check for a training job. Run it exactly as the job will run (same launcher, nodes, config):

    srun python tools/doctor.py --config configs/gpt_1_3b.yaml          # inside an allocation
    torchrun --nproc_per_node 8 tools/doctor.py --config configs/gpt_125m.yaml
    deepspeed --num_gpus 2 tools/doctor.py --config configs/tiny.yaml

Checks: the launcher's environment on every rank; the config against the world it will run in;
forming the process group within --timeout; the rank mapping (unique local ranks per host, each
host a contiguous block of ranks, every tensor-parallel group inside one host); an all-reduce;
shards present and matching the tokenizer (and the checkpoint, if resuming); free disk for
checkpoints; the device (GPU name, CUDA and NCCL versions on GPU ranks). Rank 0 prints one report;
every rank exits 0 for GO and 1 for NO-GO.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path


def local_checks(args) -> tuple[dict, list[tuple[str, bool, str]], object, object]:
    """Checks every rank can do alone. Returns (info, results, env, cfg)."""
    from xft_dist.config import ConfigError, load_config
    from xft_dist.data import DataError
    from xft_dist.runtime import DistEnv, LaunchError

    results, env, cfg = [], None, None
    try:
        env = DistEnv.from_environ(local_rank_arg=args.local_rank)
        problems = DistEnv.inconsistencies()
        results.append(("environment", not problems, "; ".join(problems) or
                        f"{env.world_size} ranks via {env.launcher}, master {env.master_addr}:{env.master_port}"))
    except LaunchError as e:
        results.append(("environment", False, str(e)))
    try:
        cfg = load_config(args.config, args.overrides)
        if env is not None:
            from xft_dist.runtime.world import accelerator
            from xft_dist.train.setup import static_checks

            dp, _ = static_checks(cfg, env, accelerator())
            pp = f"pp {cfg.parallel.pp} x " if cfg.parallel.pp > 1 else ""
            results.append(("config", True, f"{pp}tp {cfg.parallel.tp} x dp {dp}, ZeRO {cfg.parallel.zero_stage}, "
                                            f"{cfg.train.precision}"))
    except (ConfigError, DataError) as e:
        results.append(("config", False, str(e).replace("\n", " ")))
    if cfg is not None:
        results.append(shard_check(cfg))
        results.append(disk_check(cfg))
    return results, env, cfg


def shard_check(cfg) -> tuple[str, bool, str]:
    import json

    from xft_dist.data import DataError, Manifest

    try:
        m = Manifest.load(cfg.data.primary_shards)
    except DataError as e:
        return "shards", False, str(e)
    missing = [s.url for s in m.shards if "://" not in s.url and not s.url.startswith("pipe:")
               and not (os.path.isfile(s.url) and os.path.getsize(s.url) > 0)]
    if missing:
        return "shards", False, f"{len(missing)} shard(s) missing or empty, first: {missing[0]}"
    tok = m.tokenizer
    if cfg.model.num_tokens is not None and tok["vocab_size"] > cfg.model.num_tokens:
        return "shards", False, (f"tokenizer {tok['kind']}:{tok.get('name')} has vocab {tok['vocab_size']} "
                                 f"> model.num_tokens={cfg.model.num_tokens}")
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.out_dir) / cfg.run.name / "checkpoints"
    from xft_dist.ckpt import CheckpointManager

    latest = CheckpointManager(ckpt_root).latest() if cfg.checkpoint.resume else None
    if latest is not None:
        saved = json.loads((latest / "xft_state.json").read_text())["loader"]["fingerprint"]["manifest"]
        if saved != m.digest:
            return "shards", False, (f"the shards' manifest changed since checkpoint {latest} "
                                     f"(manifest {m.digest} vs {saved}): resuming would read other data")
    return "shards", True, (f"{len(m.shards)} shards, {m.tokens} tokens, tokenizer {tok['kind']}:{tok.get('name')} "
                            f"vocab {tok['vocab_size']}" + (f"; resumes from {latest.name}" if latest else ""))


def disk_check(cfg) -> tuple[str, bool, str]:
    from xft_dist.data import DataError, Manifest
    from xft_dist.models.flops import estimate_parameters

    m = cfg.model
    try:
        vocab = m.num_tokens or Manifest.load(cfg.data.primary_shards).tokenizer["vocab_size"]
    except DataError:
        vocab = m.num_tokens or 50304
    params = estimate_parameters(vocab=vocab, dim=m.dim, depth=m.depth, heads=m.heads,
                                 dim_head=m.head_dim, kv_heads=m.kv_heads or m.heads, ff_mult=m.ff_mult,
                                 ff_glu=m.ff_glu, tie_embedding=m.tie_embedding,
                                 enc_depth=m.enc_depth if m.kind == "encoder_decoder" else 0, enc_dim=m.enc_dim)
    per_ckpt = params * 16  # fp32 master weights + 2 Adam moments + model weights
    need = per_ckpt * (cfg.checkpoint.keep + 1)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.out_dir) / cfg.run.name
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    gib = 2**30
    detail = (f"{free / gib:.1f} GiB free at {probe}; {cfg.checkpoint.keep}+1 checkpoints of ~{per_ckpt / gib:.2f} GiB "
              f"(~{params / 1e6:.0f}M parameters) need {need / gib:.1f} GiB")
    return "disk", free >= need, detail


def mapping_check(table, tp: int) -> tuple[str, bool, str]:
    problems = []
    by_host = defaultdict(list)
    for r in table:
        by_host[r.host].append(r)
    for host, ranks in sorted(by_host.items()):
        local = sorted(r.local_rank for r in ranks)
        if local != list(range(len(ranks))):
            problems.append(f"host {host}: local ranks {local}, expected {list(range(len(ranks)))}")
        glob = sorted(r.rank for r in ranks)
        if glob != list(range(glob[0], glob[0] + len(glob))):
            problems.append(f"host {host}: global ranks {glob} are not one contiguous block")
    for start in range(0, len(table), tp):
        hosts = sorted({table[i].host for i in range(start, start + tp)})
        if len(hosts) > 1:
            problems.append(f"tensor-parallel group {list(range(start, start + tp))} spans hosts {hosts}")
    summary = ", ".join(f"{h}: ranks {sorted(r.rank for r in rs)}" for h, rs in sorted(by_host.items()))
    return "rank mapping", not problems, "; ".join(problems) or summary


def layout_lines(world_size: int, tp: int, pp: int) -> list[str]:
    """The PP x DP x TP grid as the trainer builds it: each stage's ranks, and each rank's place."""
    stage = world_size // pp
    dp = stage // tp
    lines = []
    for s in range(pp):
        ranks = [f"{r} (tp {r % tp}, dp {(r % stage) // tp})" for r in range(s * stage, (s + 1) * stage)]
        lines.append(f"stage {s}: ranks " + ", ".join(ranks))
    return [f"pp {pp} x dp {dp} x tp {tp}"] + lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to form the process group / all-reduce")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    results, env, cfg = local_checks(args)
    if env is None:
        print("doctor: NO-GO\n" + "\n".join(f"  [{'ok' if ok else 'FAIL'}] {n}: {d}" for n, ok, d in results))
        return 1
    import torch.distributed as dist

    from xft_dist.parallel import all_gather_object, barrier, reduce_values
    from xft_dist.runtime.world import device_report, init_world

    rank = env.rank
    try:
        # The trainer's own way in: CUDA device from LOCAL_RANK first, then the process group.
        world = init_world(env, tp=1, backend=cfg.parallel.backend if cfg is not None else "auto",
                           timeout_s=args.timeout)
        table = world.table
        t0 = time.perf_counter()
        (total,) = reduce_values([1.0])
        ar = ("all-reduce", total == env.world_size,
              f"sum {total:g} of {env.world_size} ranks in {1e3 * (time.perf_counter() - t0):.1f} ms "
              f"({world.backend} on {world.device})")
        results.append(("device", True, device_report(world.device)))
        everyone = all_gather_object(results)
    except Exception as e:  # noqa: BLE001 - report, do not hang
        print(f"doctor: rank {rank}: NO-GO: could not form the process group or all-reduce within "
              f"{args.timeout:g}s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
        os._exit(1)
    report = [("process group", True, f"{env.world_size} ranks joined")]
    tp = cfg.parallel.tp if cfg is not None else 1
    report.append(mapping_check(table, tp))
    pp = cfg.parallel.pp if cfg is not None else 1
    if env.world_size % (tp * pp) == 0:
        report.append(("layout", True, "; ".join(layout_lines(env.world_size, tp, pp))))
    report.append(ar)
    for name in dict.fromkeys(n for rs in everyone for n, _, _ in rs):  # local checks, per host
        bad = [(table[r].host, r, d) for r, rs in enumerate(everyone) for n, ok, d in rs if n == name and not ok]
        if bad:
            host, r, detail = bad[0]
            where = sorted({h for h, _, _ in bad})
            report.append((name, False, f"on {', '.join(where)} (e.g. rank {r}): {detail}"))
        else:
            report.append((name, True, next(d for n, ok, d in everyone[0] if n == name)))
    go = all(ok for _, ok, _ in report)
    if rank == 0:
        lines = [f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}" for name, ok, detail in report]
        print("doctor report\n" + "\n".join(lines) + f"\ndoctor: {'GO' if go else 'NO-GO'}", flush=True)
    barrier()
    dist.destroy_process_group()
    return 0 if go else 1


if __name__ == "__main__":
    sys.exit(main())
