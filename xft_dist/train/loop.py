"""The run: ``build_run`` -> steps -> metrics -> checkpoints -> finish.

``run(cfg)`` is what ``launch/pretrain.py`` calls. Signal handlers and logging are the entry
point's: pass ``stop`` (anything with a ``requested`` attribute, e.g. ``runtime.StopSignals``) to
let SIGTERM / SIGUSR1 end the run with a checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..data import DataError
from ..models.factory import flops_per_token
from ..models.flops import PEAK_FLOPS
from ..obs import StepMeter
from ..parallel import barrier, reduce_values
from ..runtime import DistEnv, LaunchError, Watchdog, write_status
from ..runtime.faults import explain, is_comm_error
from ..runtime.heartbeat import Heartbeat
from .cadence import Cadence
from .checkpointing import CheckpointWriteHalt, after_step, finish_saves, save
from .guard import SpikeGuard
from .setup import Run, build_run, restore_checkpoint
from .step import LossSpikeHalt, NonFiniteLoss, TrainingHalted, train_step

log = logging.getLogger("xft_dist.train")


def run(cfg: Config, *, local_rank: int | None = None, stop=None) -> dict:
    """Train; a lost peer or link makes this rank log who was lost and exit with status 3."""
    state: dict = {"run": None}
    try:
        state["run"] = r = build_run(cfg, DistEnv.from_environ(local_rank_arg=local_rank))
        summary = train(r, stop=stop)
        finish(r, summary)
        return summary
    except TrainingHalted as e:
        # Decided alike on every rank (the numbers travel in the step's one collective); for a
        # non-finite loss no update was applied. The newest checkpoint is the state to resume from.
        r = state["run"]
        if r is not None and r.rank0 and r.run_dir is not None:
            latest = r.ckpt.latest() if r.ckpt is not None else None
            state = {NonFiniteLoss: "nonfinite", CheckpointWriteHalt: "checkpoint_failed"}.get(type(e), "spike")
            write_status(r.run_dir, state=state, step=r.step,
                         steps=cfg.train.steps, checkpoint=str(latest) if latest else None, reason=str(e))
        _leave_world()
        raise
    except (ConfigError, DataError, LaunchError):
        # Bad input, refused alike by every rank (e.g. a checkpoint it cannot reshard): leave the
        # process group before the interpreter exits, or gloo's threads abort the teardown and the
        # caller's exit status 2 becomes 250.
        _leave_world()
        raise
    except Exception as e:  # noqa: BLE001 - any collective failure, whatever layer raised it
        if not (dist.is_initialized() and is_comm_error(e)):
            raise
        r = state["run"]
        table = r.world.table if r is not None and r.world is not None else None
        msg = explain(e, table, me=dist.get_rank(), timeout_s=cfg.parallel.timeout_s)
        traceback.print_exc()  # the full story stays in the log; the line below is the summary
        print(f"pretrain: {msg}", file=sys.stderr, flush=True)
        log.error("%s", msg)
        # Do not wait in process-group teardown for peers that are gone: leave now.
        os._exit(3)


def _meter(r: Run) -> StepMeter:
    cfg = r.cfg
    peak = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else None
    if peak is None and r.device.type == "cuda":
        name = torch.cuda.get_device_name(r.device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k.split("-")[0] in name), None)
    return StepMeter(flops_per_token=flops_per_token(cfg, r.model),
                     peak_flops_total=peak * r.groups.world_size if peak else None)


def _skip_batches(r: Run, batches, n: int, why: str) -> None:
    """Consume ``n`` global batches without training on them (the loader state moves past them)."""
    for _ in range(n):
        next(batches)
    r.skipped_batches += n
    if r.rank0:
        log.warning("skipped %d global batches of data (%s); %d skipped in this run", n, why, r.skipped_batches)


def _rollback(r: Run, guard: SpikeGuard, step: int, why: str):
    """Reload the newest complete checkpoint on every rank and skip ``train.spike.skip_batches``
    batches; ``(step, batch iterator)`` to go on from."""
    spike = r.cfg.train.spike
    if guard.rollbacks >= spike.max_rollbacks:
        raise LossSpikeHalt(f"step {step}: loss spike ({why}) after {guard.rollbacks} rollbacks "
                            f"(train.spike.max_rollbacks={spike.max_rollbacks}): stopping")
    finish_saves(r, step)  # an asynchronous save in flight is the newest state to roll back to
    latest = r.ckpt.latest()
    if latest is None:
        raise LossSpikeHalt(f"step {step}: loss spike ({why}) and no checkpoint to roll back to: stopping")
    rollbacks = guard.rollbacks + 1
    restore_checkpoint(r, latest)
    guard.load_state_dict(r.spike_state)
    guard.rollbacks = rollbacks
    if r.rank0:
        log.warning("rolled back from step %d to %s (rollback %d of at most %d)", step, latest, rollbacks,
                    spike.max_rollbacks)
    batches = iter(r.loader)
    _skip_batches(r, batches, spike.skip_batches, f"rollback after the spike at step {step}")
    return r.step, batches


def _watchdog(r: Run):
    """This rank's stall watchdog (``parallel.stall_timeout_s``; None when 0)."""
    timeout = r.cfg.parallel.stall_timeout_s
    if not timeout:
        return None

    def stalled(where: str, idle: float) -> None:
        latest = r.ckpt.latest()
        write_status(r.run_dir, state="stalled", step=r.step, steps=r.cfg.train.steps,
                     checkpoint=str(latest) if latest else None, rank=r.groups.rank, phase=where,
                     idle_s=round(idle, 1))

    return Watchdog(timeout, rank=r.groups.rank, on_stall=stalled).start()


def _heartbeat(r: Run):
    """This rank's heartbeat on the rendezvous store (``parallel.heartbeat_s``; None when 0 or alone):
    a lost peer ends the run with exit status 3 before NCCL's own watchdog would abort it."""
    p = r.cfg.parallel
    if not p.heartbeat_s or r.world is None or r.groups.world_size == 1:
        return None
    dog = r.watchdog

    def lost(msg: str) -> None:
        log.error("%s", msg)
        latest = r.ckpt.latest()
        write_status(r.run_dir, state="lost_peer", step=r.step, steps=r.cfg.train.steps,
                     checkpoint=str(latest) if latest else None, rank=r.groups.rank, reason=msg)

    env = r.env
    return Heartbeat(rank=r.groups.rank, world_size=r.groups.world_size, host=env.master_addr, port=env.master_port,
                     table=r.world.table, every_s=p.heartbeat_s, lost_after_s=p.heartbeat_lost_s,
                     idle_s=dog.idle if dog is not None else None, on_lost=lost).start()


def _beat(dog, where: str) -> None:
    if dog is not None:
        dog.beat(where)


def _data_metrics(r: Run) -> dict:
    """``data/<source>/tokens`` (document tokens drawn, all DP ranks) and ``data/<source>/epoch``."""
    stats = r.loader.source_stats()
    names = list(stats)
    tokens = reduce_values([stats[n]["tokens"] for n in names], r.groups.dp_group, op="sum")
    epochs = reduce_values([stats[n]["epoch"] for n in names], r.groups.dp_group, op="max")
    out = {}
    for n, t, e in zip(names, tokens, epochs):
        out[f"data/{n}/tokens"], out[f"data/{n}/epoch"] = int(t), int(e)
    return out


def _progress(r: Run):
    if not (r.rank0 and r.cfg.logging.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=r.cfg.train.steps, initial=r.step, desc="train", unit="step", file=sys.stderr)


@dataclass
class _Progress:
    """What the loop carries from step to step into the run's summary."""

    losses: list = field(default_factory=list)
    valid: dict | None = None
    samples: list | None = None
    last_saved: Path | None = None
    stopped: str | None = None


def train(r: Run, *, stop=None) -> dict:
    """Steps from ``r.step`` to ``train.steps`` (or a stop); returns the run's summary."""
    cfg, step = r.cfg, r.step
    dog = r.watchdog = _watchdog(r)
    r.heartbeat = _heartbeat(r)
    guard = r.guard = SpikeGuard.from_config(cfg.train.spike)
    guard.load_state_dict(r.spike_state)
    when = Cadence.from_config(cfg, validation=r.valid_batches is not None)
    meter, bar, batches, done = _meter(r), _progress(r), iter(r.loader), _Progress()
    while step < cfg.train.steps:
        meter.start()
        requested = getattr(stop, "requested", None)
        _beat(dog, f"data for step {step + 1}")
        batch = next(batches)
        _beat(dog, f"step {step + 1}")
        result = train_step(r.engine, batch, groups=r.groups, micro_batch=cfg.train.micro_batch,
                            nonfinite=cfg.train.nonfinite, step=step + 1, stop_requested=bool(requested),
                            writer=r.ckpt.writer_state(), drop_update=guard.drop_update)
        step = r.step = step + 1
        _beat(dog, f"logging step {step}")
        metrics = _step_metrics(result, meter)
        done.losses.append(result.loss)
        spike = guard.after_step(result.loss, result.grad_norm, dropped=result.dropped)
        if spike is not None:
            metrics.update(guard.metrics())
            _log_spike(r, step, spike, result)
            if guard.action == "rollback":
                r.sinks.log(step, metrics)
                _beat(dog, f"rollback after step {step}")
                step, batches = _rollback(r, guard, step, spike)
                continue
        done.stopped = _stop_reason(cfg, step, result, requested)
        try:  # the checkpoint's numbers go into the step's row
            metrics.update(after_step(r, step, result))  # commits (or reports the failure of) an async save
            metrics.update(_skip_and_save(r, when, step, batches, done))
        except CheckpointWriteHalt:
            _record(r, when, step, result, metrics, bar)
            raise
        _record(r, when, step, result, metrics, bar)
        _evaluate_and_sample(r, when, step, done)
        if done.stopped:
            if r.rank0:
                log.info("stopping after step %d (%s); checkpoint %s", step, done.stopped, done.last_saved)
            break
    if bar is not None:
        bar.close()
    finish_saves(r, step)
    return {"step": step, "checkpoint": str(done.last_saved or r.ckpt.latest()), "metrics": str(r.sinks.jsonl_path),
            "wandb": r.sinks.wandb_dir, "wandb_mode": r.sinks.mode, "losses": done.losses, "stopped": done.stopped,
            "valid": done.valid, "samples": done.samples}


def _step_metrics(result, meter: StepMeter) -> dict:
    return {"loss": result.loss, "lr": result.lr, "tokens": result.tokens, "grad_norm": result.grad_norm,
            "loss_tokens": result.loss_tokens, "skipped_micro_batches": result.skipped_micro,
            **meter.finish(tokens=result.tokens, real_tokens=result.real_tokens, loss_tokens=result.loss_tokens)}


def _log_spike(r: Run, step: int, spike: str, result) -> None:
    if r.rank0:
        log.warning("step %d: loss spike: %s (train.spike.action=%s)%s", step, spike, r.cfg.train.spike.action,
                    ": update skipped" if result.dropped else "")


def _record(r: Run, when: Cadence, step: int, result, metrics: dict, bar) -> None:
    """The step's metrics to the sinks (with the data metrics when due), the bar and the log line."""
    if when.data_metrics(step):  # a collective: the same steps on every rank
        metrics.update(_data_metrics(r))
    r.sinks.log(step, metrics)
    if bar is not None:
        bar.update()
        bar.set_postfix(loss=f"{result.loss:.4f}")
    if r.rank0 and when.prints(step):
        _log_step(r.cfg, step, result, metrics)


def _stop_reason(cfg: Config, step: int, result, requested) -> str | None:
    if result.stop_requested:  # decided with the step's numbers: every rank stops at the same step
        return f"signal {requested or 'on another rank'}"
    if cfg.train.stop_after is not None and step >= cfg.train.stop_after:
        return f"train.stop_after={cfg.train.stop_after}"
    return None


def _skip_and_save(r: Run, when: Cadence, step: int, batches, done: _Progress) -> dict:
    """Data skips and the checkpoint due after this step (the checkpoint holds the loader after the
    skip); the checkpoint's metrics."""
    if when.skip_after(step):  # train.skip_data: the batches a rollback skipped, or chosen by hand
        _skip_batches(r, batches, when.skip_after(step), f"train.skip_data after step {step}")
    if not when.saves(step, stopping=done.stopped is not None):
        return {}
    _beat(r.watchdog, f"checkpoint of step {step}")
    done.last_saved, metrics = save(r, step)
    return metrics


def _evaluate_and_sample(r: Run, when: Cadence, step: int, done: _Progress) -> None:
    """Validation and samples due after this step (they touch no state a checkpoint holds)."""
    if when.validates(step):
        _beat(r.watchdog, f"validation after step {step}")
        done.valid = run_validation(r, step)
    if when.samples(step):
        _beat(r.watchdog, f"samples after step {step}")
        done.samples = log_samples(r, step)


def run_validation(r: Run, step: int) -> dict:
    """Evaluate on the fixed validation batches; log ``valid/*`` (collective over the world)."""
    from .evaluate import evaluate

    metrics = evaluate(r.engine, r.model, r.valid_batches, groups=r.groups, micro_batch=r.cfg.train.micro_batch,
                       device=r.device, byte_tokenizer=r.byte_tokenizer)
    r.sinks.log(step, metrics)
    if r.rank0:
        bpb = f" bpb {metrics['valid/bpb']:.4f}" if "valid/bpb" in metrics else ""
        bpb += f" mlm_acc {metrics['valid/mlm_acc']:.4f}" if "valid/mlm_acc" in metrics else ""
        log.info("step %d valid loss %.4f ppl %.2f%s (%d tokens)", step, metrics["valid/loss"], metrics["valid/ppl"],
                 bpb, metrics["valid/tokens"])
    return metrics


def log_samples(r: Run, step: int) -> list[dict] | None:
    """Continuations of ``logging.sample_prompts`` (every rank samples; rank 0 prints and logs)."""
    from .samples import sample_continuations

    rows = sample_continuations(r, step)
    if rows is not None:
        r.sinks.log_table(step, "samples", ["step", "prompt", "continuation"],
                          [[step, x["prompt"], x["continuation"]] for x in rows])
        if r.rank0:
            for x in rows:
                log.info("step %d sample: %r -> %r", step, x["prompt"], x["continuation"])
    return rows


def _log_step(cfg: Config, step: int, result, metrics: dict) -> None:
    mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    norm = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
    log.info("step %d/%d loss %.4f lr %.2e grad_norm %s tokens/s %.0f%s mem %.0f MiB", step, cfg.train.steps,
             result.loss, result.lr, norm, metrics["tokens_per_s"], mfu, metrics["memory_mib"])


def finish(r: Run, summary: dict) -> None:
    """Close the sinks, write status.json and the summary (rank 0), leave the process group."""
    cfg, step, reason = r.cfg, summary["step"], summary["stopped"]
    dog = getattr(r, "watchdog", None)
    _beat(dog, "finish")
    if r.heartbeat is not None:  # before the world ends: rank 0's store goes with it
        r.heartbeat.stop()
    r.sinks.finish()
    if r.rank0:
        write_status(r.run_dir, state="stopped" if reason and step < cfg.train.steps else "finished",
                     step=step, steps=cfg.train.steps, checkpoint=summary["checkpoint"])
        sync = (f"\n  sync with: wandb sync {summary['wandb']}"
                if summary["wandb_mode"] == "offline" and summary["wandb"] else "")
        valid = summary.get("valid")
        if valid:
            bpb = f", {valid['valid/bpb']:.3f} bits/byte" if "valid/bpb" in valid else ""
            bpb += f", masked-token accuracy {valid['valid/mlm_acc']:.3f}" if "valid/mlm_acc" in valid else ""
            print(f"\nvalidation loss {valid['valid/loss']:.4f} (perplexity {valid['valid/ppl']:.2f}{bpb})", flush=True)
        for x in summary.get("samples") or []:
            print(f"\nsample: {x['prompt']!r} -> {x['continuation']!r}", flush=True)
        picture = _draw_curves(r)
        print(f"\nrun {cfg.run.name}: {step} steps{f' (stopped: {reason})' if reason else ''}\n"
              f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
              f"  curves:     {picture or 'not drawn (see the log)'}\n"
              f"  W&B ({r.sinks.mode}): {summary['wandb'] or 'disabled'}{sync}", flush=True)
    barrier()
    dist.destroy_process_group()
    if dog is not None:
        dog.stop()
    _release_shm_buffer()


def _draw_curves(r: Run) -> Path | None:
    """runs/<name>/curves.png from the run's metrics.jsonl (rank 0); a failure is logged, never fatal."""
    from ..obs.plot import curves, plot, read_rows

    out = r.run_dir / "curves.png"
    try:
        plot([curves(read_rows(r.sinks.jsonl_path), label=r.cfg.run.name)], out)
    except Exception as e:  # noqa: BLE001 - a picture must not fail a finished run
        log.warning("could not draw %s: %s", out, e)
        return None
    return out


def _leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _release_shm_buffer()


def _release_shm_buffer() -> None:
    """DeepSpeed's CPU communication op leaves a 66 MB all-reduce buffer per rank in /dev/shm when
    the process exits; unlink this rank's (the mapping stays valid until the process ends)."""
    addr, port, local = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"))
    if addr and port and local is not None:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{local}"):
            f.unlink(missing_ok=True)
