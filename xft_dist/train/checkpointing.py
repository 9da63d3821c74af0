"""The loop's checkpoints: what a save holds, synchronous or asynchronous, and its timings.

``save`` gathers the merged loader state, every rank's RNG and the engine into one checkpoint
(``CheckpointManager.save``). With ``checkpoint.async_save`` the loop blocks only while the state is
staged in host memory; ``after_step`` commits the save once the step's numbers say every rank's
background writer has finished, and stops the run on every rank when one failed; ``finish_saves``
waits for and commits the last one at the end of the run (or at a signal's stop). Each save logs
``checkpoint/blocking_s`` (the loop's wait) in its step's row and ``checkpoint/save_s`` (from the
start of the save to its commit) in the row of the step it was committed after (a row of its own
when that is the end of the run).
"""

from __future__ import annotations

import logging

from ..ckpt.staging import WriteFailed
from ..ckpt.universal import universal_client_state
from ..data import StreamingLoader
from ..parallel import all_gather_object, capture_rng_state, rng_state_to_tensors
from .setup import Run, layout
from .step import TrainingHalted

log = logging.getLogger("xft_dist.train")


class CheckpointWriteHalt(TrainingHalted):
    """A background checkpoint writer failed on some rank: every rank stops (exit status 5); the
    newest complete checkpoint is still the one before."""


def save(r: Run, step: int) -> tuple:
    """Collective: the merged loader state, every rank's RNG, the engine; ``(its path, the metrics
    for the step's row)``."""
    states = all_gather_object(r.loader.state_dict(), r.groups.dp_group)
    shared = {"loader": StreamingLoader.merge_states(states), "wandb_run_id": r.sinks.run_id,
              "num_tokens": r.vocab.num_tokens, "pad_id": r.vocab.pad_id, "tokenizer": r.loader.manifest.tokenizer,
              "layout": layout(r.cfg, r.groups), "spike": r.guard.state_dict() if r.guard is not None else None}
    params = r.model if r.groups.pp_size == 1 else r.engine.module.all_parameters()
    uc = universal_client_state(params, r.vocab.num_tokens)
    background = r.cfg.checkpoint.async_save
    try:
        times = r.ckpt.save(r.engine, step, rank_state={"rng": rng_state_to_tensors(capture_rng_state(r.streams))},
                            shared=shared, config_text=r.config_text, client_state=uc, background=background)
    except WriteFailed as e:  # the previous save's writer, found when this save waited for it
        raise _halt(r, step, e) from None
    metrics = {"checkpoint/blocking_s": times.blocking_s}
    if not background:
        metrics["checkpoint/save_s"] = times.blocking_s
    elif times.committed is not None:
        metrics["checkpoint/save_s"] = times.committed[1]
        if times.waited_s > 0.05:
            _warn_overlap(r, step, times)
    return times.path, metrics


def _warn_overlap(r: Run, step: int, times) -> None:
    if r.rank0:
        prev, save_s = times.committed
        log.warning("checkpoint.async_save: the save of step %d was still being written when step %d's began: "
                    "this save waited %.2f s for it (it took %.2f s from start to commit, longer than the "
                    "checkpoint.every=%d steps between saves); saves overlap and the loop waits for each: raise "
                    "checkpoint.every or write to faster storage", prev, step, times.waited_s, save_s,
                    r.cfg.checkpoint.every)


def after_step(r: Run, step: int, result) -> dict:
    """Commit the in-flight save when no rank's writer is busy; stop every rank when one failed.
    Decided from the step's numbers (the same on every rank), so the commit's collective is safe.
    The metrics for the step's row."""
    if r.ckpt.pending is None or (result.writers_busy and not result.writers_failed):
        return {}
    try:
        committed = r.ckpt.commit_pending()
    except WriteFailed as e:
        raise _halt(r, step, e) from None
    if committed is None:
        return {}
    if r.rank0:
        log.info("checkpoint of step %d committed after step %d (%.2f s from start to commit)", committed[0],
                 step, committed[1])
    return {"checkpoint/save_s": committed[1]}


def finish_saves(r: Run, step: int) -> None:
    """Collective, at the end of the run: wait for the in-flight save and commit it."""
    try:
        committed = r.ckpt.commit_pending()
    except WriteFailed as e:
        raise _halt(r, step, e) from None
    if committed is not None:
        r.sinks.log(step, {"checkpoint/save_s": committed[1]})


def _halt(r: Run, step: int, e: WriteFailed) -> CheckpointWriteHalt:
    msg = f"after step {step}: a background checkpoint write failed: {e}"
    log.error("%s", msg)
    return CheckpointWriteHalt(msg)
