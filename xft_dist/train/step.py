"""One optimizer step: micro-batches, loss normalised by the global number of loss tokens, and a
cross-rank finite check before the update.

The model owns the loss: ``engine(micro_batch)`` runs the model's ``loss_sums`` (``models.LossModel``)
on a ``data.Batch`` and returns ``(loss_sum, num_loss_tokens)``; the count of the whole global batch
comes from the batches themselves (host integers the loader counted), so this file knows nothing of
model kinds and nothing waits for a forward to know what to divide by.

DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over the
DP group, so micro-batch ``i`` on DP rank ``r`` backpropagates ``sum_i,r / N * dp * accum`` where
``N`` counts the loss tokens of the whole global batch (all micro-batches, all DP ranks). The
gradient is then that of ``sum / N`` however the batch is split.

Host syncs: the token counts go to the device once and are reduced there (the scale stays a device
tensor, as torchtitan's global token count does), and the
step's numbers (loss sum, counts, non-finite flag, stop request) travel in one collective and come
to the host once, before the update, so ``train.nonfinite=stop`` never applies a non-finite update.
``train.nonfinite=skip`` must decide before each backward: one more sync per micro-batch.

``drop_update`` (``train.spike.action=skip``) is asked, with the step's global loss, before the last
micro-batch's backward; when it says drop, that backward carries NaN gradients, so DeepSpeed's own
overflow path discards the whole accumulated update (no optimizer step, no scheduler step, counted
in ``engine.skipped_steps``) on every rank alike.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.batch import Batch
from ..parallel import ParallelGroups, all_reduce, any_rank

log = logging.getLogger("xft_dist.train")


class TrainingHalted(RuntimeError):
    """Every rank stops at the same step for a reason of the training itself (exit status 5)."""


class LossSpikeHalt(TrainingHalted):
    """A loss spike after ``train.spike.max_rollbacks`` rollbacks."""


class NonFiniteLoss(TrainingHalted):
    pass


@dataclass
class StepResult:
    loss: float            # mean over the global batch's loss tokens
    loss_tokens: float     # global
    tokens: int            # global positions processed (padding included)
    real_tokens: int       # global non-padding input positions
    skipped_micro: int
    grad_norm: float | None
    lr: float
    stop_requested: bool = False  # some rank asked to stop (a signal), decided with the step's numbers
    dropped: bool = False         # drop_update said so: the update was discarded
    writers_busy: int = 0         # ranks whose background checkpoint writer is still writing
    writers_failed: int = 0       # ranks whose background checkpoint writer failed


def step_flags(stop_requested: bool, writer: tuple[int, int], device) -> torch.Tensor:
    """The flags that travel with the step's numbers: ``[stop requested, checkpoint writer busy,
    checkpoint writer failed]`` of this rank (summed over the world)."""
    if not any(writer):  # the usual step: fills, no copy
        flags = torch.zeros(3, dtype=torch.float64, device=device)
        if stop_requested:
            flags[0] = 1.0
        return flags
    return host_numbers([float(stop_requested), float(writer[0]), float(writer[1])], device)


def split_micro_batches(batch: Batch, micro_batch: int, device) -> list[Batch]:
    """Micro-batches of ``micro_batch`` rows, each cut (and its document layout made) on the host,
    then moved to ``device``: through pinned memory on GPU ranks, so the copies are asynchronous
    (a ``non_blocking`` copy from pageable memory is not)."""
    pin = torch.device(device).type == "cuda"
    return [(mb.pin_memory() if pin else mb).to(device, non_blocking=True) for mb in batch.split(micro_batch)]


def host_numbers(values, device) -> torch.Tensor:
    """Host numbers as an fp64 tensor on ``device``: one asynchronous copy from pinned memory on GPU
    ranks (``torch.tensor(values, device=cuda)`` would copy from pageable memory and wait)."""
    pin = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=torch.float64, pin_memory=pin).to(device, non_blocking=True)


def step_inputs(engine, batch: Batch, groups: ParallelGroups, micro_batch: int):
    """``(micro-batches on the device, counts, scale)``: the global batch's ``[positions, real
    positions, loss tokens]`` (the batches' own counts, reduced over DP on the device) and the
    factor ``dp x accumulation / N`` each micro-batch's loss sum is scaled by."""
    micro = split_micro_batches(batch, micro_batch, engine.device)
    if len(micro) != engine.gradient_accumulation_steps():
        raise RuntimeError(f"{len(micro)} micro-batches of {micro_batch} rows, but DeepSpeed accumulates "
                           f"{engine.gradient_accumulation_steps()}")
    counts = all_reduce(host_numbers(batch.counts(), engine.device), groups.dp_group)
    return micro, counts, (groups.dp_size * len(micro)) / counts[2].clamp(min=1.0)


def _world(groups: ParallelGroups):
    """The default (world) group when there is one, else None (one process: no collective)."""
    import torch.distributed as dist

    return dist.group.WORLD if groups.world_size > 1 else None


def _zero_grad_surrogate(engine) -> torch.Tensor:
    """A loss with zero gradient for every parameter: the backward every rank must still run."""
    return sum(p.sum() for p in engine.module.parameters()) * 0.0


def train_step(engine, batch: Batch, *, groups: ParallelGroups, micro_batch: int, nonfinite: str = "stop",
               step: int = 0, stop_requested: bool = False, writer: tuple[int, int] = (0, 0),
               drop_update: Callable[[float], bool] | None = None) -> StepResult:
    """One optimizer step. ``writer``: this rank's background checkpoint writer ``(busy, failed)``,
    summed over the world with the step's numbers (``StepResult.writers_*``)."""
    if groups.pp_size > 1:
        from .pipe_step import pipeline_train_step

        return pipeline_train_step(engine, batch, groups=groups, micro_batch=micro_batch, nonfinite=nonfinite,
                                   step=step, stop_requested=stop_requested, writer=writer, drop_update=drop_update)
    micro, counts, scale = step_inputs(engine, batch, groups, micro_batch)
    device = counts.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.float64, device=device)
    skipped, numbers, dropped = 0, None, False
    for i, mb in enumerate(micro):
        s, _ = engine(mb)
        finite = torch.isfinite(s.detach())
        if nonfinite == "skip" and any_rank(not bool(finite), None):
            log.warning("step %d micro-batch %d: non-finite loss on at least one rank: skipping this micro-batch "
                        "(train.nonfinite=skip)", step, i)
            skipped += 1
            loss = _zero_grad_surrogate(engine)
        else:
            loss = s * scale.to(s.dtype)
            loss_sum = loss_sum + torch.where(finite, s.detach().to(torch.float64), 0.0)
            bad = bad + (~finite).to(torch.float64)
        if i == len(micro) - 1:  # before the update: every number of the step, one collective, one sync
            # Over the whole world, so that a stop request or a bad loss on any rank reaches every
            # TP peer too; TP peers hold the same loss, so only TP rank 0 adds it in.
            own = loss_sum if groups.tp_rank == 0 else torch.zeros_like(loss_sum)
            flags = step_flags(stop_requested, writer, device)
            numbers = all_reduce(torch.cat([torch.stack([own, bad]), flags]), _world(groups))
            numbers = torch.cat([counts, numbers]).tolist()
            if numbers[4] > 0 and nonfinite == "stop":
                msg = f"step {step}: non-finite loss on at least one rank (train.nonfinite=stop): stopping"
                log.error("%s", msg)
                raise NonFiniteLoss(msg)
            if drop_update is not None and drop_update(numbers[3] / max(numbers[2], 1.0)):
                dropped = True  # NaN gradients: DeepSpeed's overflow check discards the update
                loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    return step_result(engine, numbers, step=step, skipped=skipped, dropped=dropped)


def step_result(engine, numbers: list[float], *, step: int, skipped: int, dropped: bool) -> StepResult:
    """The step's result from its numbers (``[positions, real, loss tokens, loss sum, non-finite,
    stop, writers busy, writers failed]``) and the engine's grad norm and learning rate."""
    positions, real, total, loss_total, _, stop, busy, failed = numbers
    norm = None if dropped else engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    if norm is not None and not math.isfinite(norm):
        raise NonFiniteLoss(f"step {step}: non-finite gradient norm {norm} after the update")
    return StepResult(loss=loss_total / max(total, 1.0), loss_tokens=total, tokens=int(positions),
                      real_tokens=int(real), skipped_micro=skipped, grad_norm=norm, lr=engine.get_lr()[0],
                      stop_requested=stop > 0, dropped=dropped, writers_busy=int(busy), writers_failed=int(failed))
