"""One optimizer step: micro-batches, loss normalised by the global number of loss tokens, and a
cross-rank finite check before each backward.

The model owns the loss: ``engine(micro_batch)`` returns ``(loss_sum, num_tokens)`` and
``model.token_counts(micro_batch)`` counts the same tokens without a forward pass (both wrappers
built by ``models.factory.build_model`` do this), so this file knows nothing of model kinds.

DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over the
DP group, so micro-batch ``i`` on DP rank ``r`` backpropagates ``sum_i,r / N * dp * accum`` where
``N`` counts the loss tokens of the whole global batch (all micro-batches, all DP ranks). The
gradient is then that of ``sum / N`` however the batch is split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..parallel import ParallelGroups, any_rank, reduce_values

log = logging.getLogger("xft_dist.train")


class NonFiniteLoss(RuntimeError):
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


def split_micro_batches(batch: dict, micro_batch: int, device) -> list[dict]:
    """Rows ``[i, i + micro_batch)`` of every tensor, on ``device``."""
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + micro_batch].to(device, non_blocking=True) for k, v in batch.items()}
            for i in range(0, rows, micro_batch)]


def _zero_grad_surrogate(engine) -> torch.Tensor:
    """A loss with zero gradient for every parameter: the backward every rank must still run."""
    return sum(p.sum() for p in engine.module.parameters()) * 0.0


def train_step(engine, batch: dict, *, groups: ParallelGroups, micro_batch: int, nonfinite: str = "stop",
               step: int = 0) -> StepResult:
    micro = split_micro_batches(batch, micro_batch, engine.device)
    if len(micro) != engine.gradient_accumulation_steps():
        raise RuntimeError(f"{len(micro)} micro-batches of {micro_batch} rows, but DeepSpeed accumulates "
                           f"{engine.gradient_accumulation_steps()}")
    model = engine.module
    # [positions, real positions, loss tokens] of the global batch: one reduction, on the group's device
    positions, real, total = reduce_values(sum(model.token_counts(mb) for mb in micro), groups.dp_group)
    scale = groups.dp_size * len(micro) / max(total, 1.0)
    loss_sum, skipped = 0.0, 0
    for i, mb in enumerate(micro):
        s, _ = engine(mb)
        if any_rank(not bool(torch.isfinite(s.detach())), None):  # every rank decides the same way
            msg = f"step {step} micro-batch {i}: non-finite loss on at least one rank (local loss sum {s.item()})"
            if nonfinite == "stop":
                log.error("%s: stopping (train.nonfinite=stop)", msg)
                raise NonFiniteLoss(msg)
            log.warning("%s: skipping this micro-batch (train.nonfinite=skip)", msg)
            skipped += 1
            engine.backward(_zero_grad_surrogate(engine))
        else:
            engine.backward(s * scale)
            loss_sum += float(s.detach().to(torch.float64))
        engine.step()
    (loss_sum,) = reduce_values([loss_sum], groups.dp_group)
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    if norm is not None and not math.isfinite(norm):
        raise NonFiniteLoss(f"step {step}: non-finite gradient norm {norm} after the update")
    return StepResult(loss=loss_sum / max(total, 1.0), loss_tokens=total, tokens=int(positions),
                      real_tokens=int(real), skipped_micro=skipped, grad_norm=norm, lr=engine.get_lr()[0])
