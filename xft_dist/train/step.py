"""One optimizer step: micro-batches, loss normalised by the global number of loss tokens, and a
cross-rank finite check before each backward.

DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over the
DP group, so micro-batch ``i`` on DP rank ``r`` backpropagates ``sum_i,r / N * dp * accum`` where
``N`` counts the loss tokens of the whole global batch (all micro-batches, all DP ranks). The
gradient is then that of ``sum / N`` however the batch is split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..dist import ParallelGroups
from ..nn import masked_loss_sum, vocab_parallel_cross_entropy

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


def _count(kind: str, mb: dict, pad_id: int) -> torch.Tensor:
    if kind == "decoder":
        return mb["loss_mask"].float().sum()
    tgt, tgt_mask = mb["tgt"][:, 1:], mb["tgt_mask"][:, 1:]
    return (tgt_mask & (tgt != pad_id)).float().sum()


def _loss_sums(kind: str, module, mb: dict, groups: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "decoder":
        logits = module(mb["input_ids"], mask=mb["mask"], doc_ids=mb["doc_ids"], positions=mb["positions"])
        losses = vocab_parallel_cross_entropy(logits, mb["labels"], group=groups.tp_group,
                                              vocab_size=module.module.num_tokens)
        return masked_loss_sum(losses, loss_mask=mb["loss_mask"])
    return module(mb["src"], mb["tgt"], src_mask=mb["src_mask"], tgt_mask=mb["tgt_mask"], return_sums=True)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(engine, batch: dict, *, kind: str, groups: ParallelGroups, micro_batch: int, pad_id: int,
               nonfinite: str = "stop", step: int = 0) -> StepResult:
    device = engine.device
    rows = next(iter(batch.values())).shape[0]
    micro = [_to({k: v[i:i + micro_batch] for k, v in batch.items()}, device) for i in range(0, rows, micro_batch)]
    accum = len(micro)
    if accum != engine.gradient_accumulation_steps():
        raise RuntimeError(f"batch of {rows} rows / micro {micro_batch} = {accum} micro-batches, "
                           f"but DeepSpeed accumulates {engine.gradient_accumulation_steps()}")
    total = torch.stack([_count(kind, mb, pad_id) for mb in micro]).sum().to(torch.float64)
    if groups.dp_group is not None:
        dist.all_reduce(total, group=groups.dp_group)
    scale = groups.dp_size * accum / total.clamp(min=1).item()
    loss_sum, skipped = torch.zeros((), dtype=torch.float64, device=device), 0
    for i, mb in enumerate(micro):
        s, _ = _loss_sums(kind, engine, mb, groups)
        bad = (~torch.isfinite(s.detach())).to(torch.float32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank decides the same way
        if bad.item() > 0:
            msg = f"step {step} micro-batch {i}: non-finite loss on at least one rank (local loss sum {s.item()})"
            if nonfinite == "stop":
                log.error("%s: stopping (train.nonfinite=stop)", msg)
                raise NonFiniteLoss(msg)
            log.warning("%s: skipping this micro-batch (train.nonfinite=skip)", msg)
            skipped += 1
            engine.backward(sum(p.sum() for p in engine.module.parameters()) * 0.0)
        else:
            engine.backward(s * scale)
            loss_sum += s.detach().to(torch.float64)
        engine.step()
    if groups.dp_group is not None:
        dist.all_reduce(loss_sum, group=groups.dp_group)
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    if norm is not None and not torch.isfinite(torch.tensor(norm)):
        raise NonFiniteLoss(f"step {step}: non-finite gradient norm {norm} after the update")
    key = "mask" if kind == "decoder" else "tgt_mask"
    real = torch.tensor(float(sum(mb[key].sum().item() for mb in micro)), dtype=torch.float64)
    positions = sum(mb[key].numel() for mb in micro)
    if groups.dp_group is not None:
        dist.all_reduce(real, group=groups.dp_group)
    return StepResult(loss=(loss_sum / total.clamp(min=1)).item(), loss_tokens=total.item(),
                      tokens=positions * groups.dp_size, real_tokens=int(real.item()), skipped_micro=skipped,
                      grad_norm=norm, lr=engine.get_lr()[0])
