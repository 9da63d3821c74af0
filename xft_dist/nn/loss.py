"""Cross-entropy over vocab-split logits, and the masked (sum, count) reduction.

Per token, with ``x`` the logits over the real vocabulary ``V`` (split over TP ranks), ``t`` the
target, ``eps`` the label smoothing and ``lse = log sum_j exp(x_j)``:

    loss = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j) + z_loss * lse**2

which is ``F.cross_entropy(..., label_smoothing=eps)`` plus the PaLM z-loss. The gradient is
``softmax(x) * (1 + 2 z_loss lse) - (1 - eps) onehot(t) - eps / V``. No rank ever holds more than its
own vocab shard: the max, the target logit, the sum of exps and the sum of logits are combined with
two small all-reduces of ``[...]``-shaped tensors.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..parallel.comm import all_reduce, group_rank, group_size


def _ce_forward(logits, target, group, vocab_size, ignore_index, label_smoothing, z_loss, *, own_buffer=False):
    """Per-token losses of vocab-split ``logits``, and what the gradient needs (``saved``).

    Works on one fp32 copy of the shard, which ends up holding the softmax (``saved[0]``); with
    ``own_buffer`` fp32 logits are that buffer themselves (the caller will not read them again)."""
    v_local = logits.shape[-1]
    start = group_rank(group) * v_local
    n_real = max(0, min(v_local, vocab_size - start))  # real (unpadded) columns on this rank

    if n_real > 0:
        row_max = logits[..., :n_real].amax(dim=-1).float()
    else:
        row_max = logits.new_full(logits.shape[:-1], float("-inf"), dtype=torch.float32)
    row_max = all_reduce(row_max, group, op="max")

    # The one fp32 buffer of the vocab shard (a copy, never the caller's tensor): shifted
    # logits, then exps, then softmax, then (for the gradient) the gradient, all in place.
    shifted = logits.to(torch.float32, copy=not own_buffer).sub_(row_max.unsqueeze(-1))
    if n_real < v_local:
        shifted[..., n_real:] = float("-inf")  # padded columns get exp(-inf) = 0 probability

    ignored = target == ignore_index
    local_t = target - start
    in_shard = (local_t >= 0) & (local_t < v_local) & ~ignored
    local_t = torch.where(in_shard, local_t, torch.zeros_like(local_t)).unsqueeze(-1)
    target_logit = shifted.gather(-1, local_t).squeeze(-1).masked_fill(~in_shard, 0.0)
    stats = [target_logit]
    if label_smoothing > 0:
        stats.append(shifted[..., :n_real].sum(dim=-1))
    exps = shifted.exp_()
    stats.append(exps.sum(dim=-1))
    stats = all_reduce(torch.stack(stats), group)  # one collective for all per-token sums
    target_logit, sum_exp = stats[0], stats[-1]

    log_z = sum_exp.log()  # lse - row_max
    loss = log_z - target_logit
    if label_smoothing > 0:
        mean_logit = stats[1] / vocab_size
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - mean_logit)
    lse = log_z + row_max
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    loss = loss.masked_fill(ignored, 0.0)
    probs = exps.div_(sum_exp.unsqueeze(-1))
    return loss, (probs, local_t, in_shard, ignored, lse, n_real)


def _ce_grad_(saved, grad_loss, *, vocab_size, label_smoothing, z_loss) -> torch.Tensor:
    """d(sum_t grad_loss_t * loss_t) / d logits, in place in the saved softmax buffer (fp32)."""
    probs, local_t, in_shard, ignored, lse, n_real = saved
    grad, eps = probs, label_smoothing
    if z_loss > 0:
        grad.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(-1))
    grad.scatter_add_(-1, local_t, (-(1.0 - eps) * in_shard.to(grad.dtype)).unsqueeze(-1))
    if eps > 0 and n_real > 0:
        grad[..., :n_real].sub_(eps / vocab_size)
    return grad.mul_(grad_loss.float().masked_fill(ignored, 0.0).unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing, z_loss):
        loss, saved = _ce_forward(logits, target, group, vocab_size, ignore_index, label_smoothing, z_loss)
        probs, local_t, in_shard, ignored, lse, n_real = saved
        ctx.save_for_backward(probs, local_t, in_shard, ignored, lse)
        ctx.n_real, ctx.vocab_size = n_real, vocab_size
        ctx.label_smoothing, ctx.z_loss = label_smoothing, z_loss
        ctx.logits_dtype = logits.dtype
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy reuses its saved softmax buffer for the "
                               "gradient; backward through it twice (retain_graph) is not supported")
        ctx.backward_done = True
        grad = _ce_grad_((*ctx.saved_tensors, ctx.n_real), grad_loss, vocab_size=ctx.vocab_size,
                         label_smoothing=ctx.label_smoothing, z_loss=ctx.z_loss)
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None


def check_loss_args(*, vocab_size: int, padded: int, tp: int, shard: int, label_smoothing: float,
                    z_loss: float) -> None:
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size}: expected 1..{padded} (the padded vocab across "
                         f"{tp} rank(s) of {shard} columns)")
    if tp > 1 and shard * (tp - 1) >= vocab_size:
        raise ValueError(f"a vocab shard of {shard} columns per rank leaves the last of {tp} tensor-parallel "
                         f"ranks none of the {vocab_size} real ids: pass this rank's shard, not the full vocabulary")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a value in [0, 1]")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss}: expected a non-negative coefficient")


def check_targets(target: torch.Tensor, *, vocab_size: int, ignore_index: int) -> None:
    """An id outside ``[0, vocab_size)`` that is not ``ignore_index`` is a ``ValueError`` (a host sync)."""
    counted = target != ignore_index
    if counted.any() and bool(((target < 0) | (target >= vocab_size))[counted].any()):
        bad = target[counted & ((target < 0) | (target >= vocab_size))][0].item()
        raise ValueError(f"target id {bad} is outside the vocabulary [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index}")


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: ProcessGroup | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab_size: int | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Per-token cross-entropy of vocab-split logits; fp32, shaped like ``target``, 0 where ignored.

    ``logits [..., v_local]`` is this rank's contiguous shard of the (padded) vocabulary: rank ``r``
    holds columns ``[r * v_local, (r + 1) * v_local)``. ``group=None`` means the logits are not split.
    ``vocab_size`` is the real vocabulary; columns at or beyond it are padding and get no probability
    (default: no padding). The math runs in fp32 whatever the logits' dtype; the gradient comes back
    in the logits' dtype. Reduce with ``masked_loss_sum`` and divide once by the global token count.
    """
    tp = group_size(group)
    padded = logits.shape[-1] * tp
    vocab_size = padded if vocab_size is None else vocab_size
    check_loss_args(vocab_size=vocab_size, padded=padded, tp=tp, shard=logits.shape[-1],
                    label_smoothing=label_smoothing, z_loss=z_loss)
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
                         "expected logits shaped target + (vocab shard,)")
    target = target.long()
    if check_ids:  # a host sync; the trainer turns it off (its loader checks ids on read)
        check_targets(target, vocab_size=vocab_size, ignore_index=ignore_index)
    return _VocabParallelCrossEntropy.apply(
        logits, target, group, vocab_size, ignore_index, float(label_smoothing), float(z_loss)
    )


def vocab_parallel_correct(logits: torch.Tensor, target: torch.Tensor, *, group: ProcessGroup | None = None,
                           vocab_size: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Whether each target is the argmax of vocab-split ``logits`` (bool, shaped like ``target``;
    False where ignored; a tie with the maximum counts as correct). One all-reduce (max) of the row
    maxima and target logits: no rank gathers the vocabulary."""
    v_local = logits.shape[-1]
    vocab_size = v_local * group_size(group) if vocab_size is None else vocab_size
    start = group_rank(group) * v_local
    n_real = max(0, min(v_local, vocab_size - start))
    low = torch.full(target.shape, float("-inf"), dtype=torch.float32, device=logits.device)
    row_max = logits[..., :n_real].amax(dim=-1).float() if n_real > 0 else low
    local_t = target.long() - start
    in_shard = (local_t >= 0) & (local_t < n_real) & (target != ignore_index)
    picked = logits.gather(-1, torch.where(in_shard, local_t, 0).unsqueeze(-1)).squeeze(-1).float()
    stats = all_reduce(torch.stack([row_max, torch.where(in_shard, picked, low)]), group, op="max")
    return (stats[1] >= stats[0]) & (target != ignore_index)


def masked_loss_sum(
    losses: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_tokens)`` over the tokens that count, both fp32 scalars.

    A token counts with weight ``loss_mask`` (1 when absent) unless its target is ``ignore_index``.
    Sum ``loss_sum`` and ``num_tokens`` over micro-batches and data-parallel ranks, then divide once:
    the mean is over real tokens of the whole global batch, however it is split.
    """
    weight = torch.ones_like(losses, dtype=torch.float32)
    if target is not None:
        if target.shape != losses.shape:
            raise ValueError(f"target {tuple(target.shape)} must be shaped like losses {tuple(losses.shape)}")
        weight = weight.masked_fill(target == ignore_index, 0.0)
    if loss_mask is not None:
        if loss_mask.shape != losses.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must be shaped like losses "
                             f"{tuple(losses.shape)}")
        weight = weight * loss_mask.float()
    return (losses.float() * weight).sum(), weight.sum()
