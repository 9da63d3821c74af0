"""The run: config -> distributed init -> model, engine, loader -> steps -> metrics -> checkpoints.

Static checks (world size vs TP, batch arithmetic, precision, streams vs DP, shards present) run on
every rank before the process group exists, so a bad config exits every rank with the same message
and nobody waits on a collective.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, batch_split, check_precision, dump_config
from ..data import DataError, LoaderConfig, Manifest, StreamingLoader
from ..dist import DistEnv, ParallelGroups, capture_rng_state, restore_rng_state, seed_all
from ..models.flops import PEAK_FLOPS
from ..obs import MetricSinks, StepMeter
from .engine import build_model, flops_per_token, initialize
from .step import train_step

log = logging.getLogger("xft_dist.train")


def static_checks(cfg: Config, env: DistEnv, device: str) -> tuple[int, Manifest]:
    tp = cfg.parallel.tp
    if env.world_size % tp:
        raise ConfigError(f"parallel.tp={tp} must divide the world size {env.world_size} "
                          f"(launcher: {env.launcher})")
    dp = env.world_size // tp
    micro, _ = batch_split(cfg, dp)
    check_precision(cfg, device)
    if cfg.data.num_streams % dp:
        raise ConfigError(f"data.num_streams={cfg.data.num_streams} must be divisible by the data-parallel "
                          f"size {dp} (world {env.world_size} / tp {tp})")
    if cfg.train.global_batch % cfg.data.num_streams:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} must be a multiple of "
                          f"data.num_streams={cfg.data.num_streams}")
    try:
        manifest = Manifest.load(cfg.data.shards)
    except DataError as e:
        raise ConfigError(f"data.shards={cfg.data.shards!r}: {e}") from None
    if cfg.model.num_tokens is not None:
        manifest.check_vocab(cfg.model.num_tokens)
    return dp, manifest


class _Signals:
    """SIGTERM / SIGUSR1 ask for a checkpoint and a clean stop at the end of the current step."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name


def run(cfg: Config, *, local_rank: int | None = None) -> dict:
    """Train; a lost peer or link makes this rank log who was lost and exit with status 3."""
    state = {"table": None, "rank": 0}
    try:
        return _run(cfg, local_rank, state)
    except Exception as e:  # noqa: BLE001 - any collective failure, whatever layer raised it
        from ..dist.faults import explain, is_comm_error

        if not (dist.is_initialized() and is_comm_error(e)):
            raise
        msg = explain(e, state["table"], me=state["rank"], timeout_s=cfg.parallel.timeout_s)
        traceback.print_exc()  # the full story stays in the log; the line below is the summary
        print(f"pretrain: {msg}", file=sys.stderr, flush=True)
        log.error("%s", msg)
        # Do not wait in process-group teardown for peers that are gone: leave now.
        os._exit(3)


def _run(cfg: Config, local_rank: int | None, state: dict) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = DistEnv.from_environ(local_rank_arg=local_rank)
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()  # "cuda" on GPUs, "cpu" for CPU ranks (DS_ACCELERATOR=cpu)
    dp, manifest = static_checks(cfg, env, device)

    env.export()
    import deepspeed

    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=cfg.parallel.timeout_s))
    groups = ParallelGroups.build(tp_size=cfg.parallel.tp, timeout=timedelta(seconds=cfg.parallel.timeout_s))
    state["rank"] = groups.rank
    from ..dist.faults import rank_table

    state["table"] = rank_table(env.local_rank)
    rank0 = groups.rank == 0
    streams = seed_all(cfg.train.seed, tp_rank=groups.tp_rank)

    tok = manifest.tokenizer
    loader_cfg = LoaderConfig(seq_len=cfg.data.seq_len, global_rows=cfg.train.global_batch,
                              num_streams=cfg.data.num_streams, mode=cfg.data.mode, seed=cfg.train.seed,
                              shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers,
                              skip_bad=cfg.data.skip_bad, enc_len=cfg.data.enc_len,
                              noise_density=cfg.data.noise_density, mean_span=cfg.data.mean_span)
    probe = StreamingLoader(manifest, loader_cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    num_tokens = cfg.model.num_tokens or tok["vocab_size"] + getattr(probe, "num_sentinels", 0)
    loader = StreamingLoader(manifest, loader_cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size,
                             vocab_size=num_tokens)
    model = build_model(cfg, groups, streams, num_tokens=num_tokens, pad_id=tok["pad_id"])
    engine = initialize(cfg, model, groups)

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    config_text = dump_config(cfg)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_text)
    from ..ckpt import CheckpointManager

    ckpt = CheckpointManager(ckpt_dir, keep=cfg.checkpoint.keep)
    step, run_id = 0, None
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        rank_state, shared = ckpt.load(engine, latest)
        step, run_id = shared["step"], shared.get("wandb_run_id")
        loader.load_state_dict(shared["loader"])
        restore_rng_state(rank_state["rng"], streams)
        if rank0:
            log.info("resumed from %s at step %d", latest, step)

    peak = (cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else
            next((v for k, v in PEAK_FLOPS.items() if device == "cuda" and k.split("-")[0] in torch.cuda.get_device_name()), None))
    meter = StepMeter(flops_per_token=flops_per_token(cfg, model),
                      peak_flops_total=peak * groups.world_size if peak else None)
    sinks = MetricSinks(run_dir, mode=cfg.logging.wandb, project=cfg.logging.project, name=cfg.run.name,
                        run_id=run_id, config=cfg.model_dump(mode="json"), enabled=rank0)
    signals = _Signals()
    bar = None
    if rank0 and cfg.logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", file=sys.stderr)

    def save(at: int) -> Path:
        states = [None] * groups.dp_size
        dist.all_gather_object(states, loader.state_dict(), group=groups.dp_group)
        shared = {"loader": StreamingLoader.merge_states(states), "wandb_run_id": sinks.run_id,
                  "num_tokens": num_tokens, "pad_id": tok["pad_id"]}
        return ckpt.save(engine, at, rank_state={"rng": capture_rng_state(streams)}, shared=shared,
                         config_text=config_text)

    last_saved, stop_reason, batches = None, None, iter(loader)
    history = []
    while step < cfg.train.steps:
        meter.start()
        batch = next(batches)
        result = train_step(engine, batch, kind=cfg.model.kind, groups=groups, micro_batch=cfg.train.micro_batch,
                            pad_id=tok["pad_id"], nonfinite=cfg.train.nonfinite, step=step + 1)
        step += 1
        metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                   "loss_tokens": result.loss_tokens, "skipped_micro_batches": result.skipped_micro,
                   **meter.finish(tokens=result.tokens, real_tokens=result.real_tokens,
                                  loss_tokens=result.loss_tokens)}
        history.append(result.loss)
        sinks.log(step, metrics)
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{result.loss:.4f}")
        if rank0 and (step % cfg.logging.every == 0 or step == 1):
            mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            log.info("step %d/%d loss %.4f lr %.2e grad_norm %s tokens/s %.0f%s mem %.0f MiB", step,
                     cfg.train.steps, result.loss, result.lr,
                     f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a",
                     metrics["tokens_per_s"], mfu, metrics["memory_mib"])
        flag = torch.tensor([1.0 if signals.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() > 0:
            stop_reason = f"signal {signals.requested or 'on another rank'}"
        elif cfg.train.stop_after is not None and step >= cfg.train.stop_after:
            stop_reason = f"train.stop_after={cfg.train.stop_after}"
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop_reason:
            last_saved = save(step)
        if stop_reason:
            if rank0:
                log.info("stopping after step %d (%s); checkpoint %s", step, stop_reason, last_saved)
            break
    if bar is not None:
        bar.close()
    summary = {"step": step, "checkpoint": str(last_saved or ckpt.latest()), "metrics": str(sinks.jsonl_path),
               "wandb": sinks.wandb_dir, "wandb_mode": sinks.mode, "losses": history, "stopped": stop_reason}
    sinks.finish()
    if rank0:
        (run_dir / "status.json").write_text(json.dumps({
            "state": "stopped" if stop_reason and step < cfg.train.steps else "finished",
            "step": step, "steps": cfg.train.steps, "checkpoint": summary["checkpoint"]}))
        print(f"\nrun {cfg.run.name}: {step} steps"
              f"{f' (stopped: {stop_reason})' if stop_reason else ''}\n"
              f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
              f"  W&B ({sinks.mode}): {summary['wandb'] or 'disabled'}"
              + ("\n  sync with: wandb sync " + summary["wandb"] if sinks.mode == "offline" and summary["wandb"] else ""),
              flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return summary
