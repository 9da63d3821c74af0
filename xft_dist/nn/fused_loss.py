"""Output head and vocab-parallel cross-entropy in one pass over token chunks, never holding the
full logits.

``fused_head_cross_entropy(hidden, weight, target)`` equals
``vocab_parallel_cross_entropy(F.linear(copy_to_tp(hidden), weight), target)``: per-token fp32
losses. Tokens go through in chunks of ``chunk_tokens``; each chunk's logits shard is made, turned
into losses and into the gradient of the losses with respect to those logits, which the same pass
multiplies into the gradients for ``hidden`` and ``weight``. At most one chunk of logits (and its
fp32 copy) is alive at a time.

The gradients are computed for an upstream gradient that is the same for every counted token (a
sum or mean of the losses, the trainer's case; ``masked_loss_sum`` with a 0/1 mask is folded in by
setting masked targets to ``ignore_index``). The backward then only scales them. Any other upstream
gradient (a float loss mask, say) is handled too, by recomputing the chunks in the backward: right,
but with the head's matmuls done twice.

Legend: n tokens, d hidden width, v this rank's vocab shard.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..parallel import ledger
from ..parallel.comm import all_reduce_, group_size
from .loss import _ce_forward, _ce_grad_, check_loss_args, check_targets

# Default chunk: at most 128 M logits per rank (0.5 GiB in fp32). On GPUs that is the whole rule: the
# head's GEMMs want many tokens (M) per chunk. Measured on an H100, 32k tokens, vocab 50304, bf16
# (docs/perf.md): 333-token chunks 76.7 ms, 1024 53.6, 2048 48.5, 4096 45.6, 8192 44.5; unfused 43.2
# ms for 13x the memory; the budget gives 2668-token chunks there. On CPUs the chunk is also at most
# 1/16 of the tokens (a CPU GEMM is as fast in smaller pieces, and the memory stays small next to
# the whole).
_CHUNK_ELEMENTS = 1 << 27


def default_chunk(n: int, vocab_shard: int, device: torch.device) -> int:
    """Tokens per chunk when none is given (see ``_CHUNK_ELEMENTS``)."""
    budget = max(1, _CHUNK_ELEMENTS // vocab_shard)
    if device.type == "cuda":
        return min(max(n, 1), budget)
    return max(1, min(budget, -(-n // 16)))


def _chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _chunk_pass(hidden, weight, target, grad_scale, *, want_h, want_w, group, ce):
    """Losses, and d(sum_t grad_scale_t * loss_t) w.r.t. hidden (this rank's part) and weight.

    The matmuls run in ``ce["mm_dtype"]`` (autocast's dtype where autocast is on, as ``F.linear``
    would: bf16 on tensor cores, not fp32); the gradients accumulate in fp32 or wider."""
    n, mm = hidden.shape[0], ce["mm_dtype"]
    acc = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    w = weight.to(mm)  # one cast per pass, as autocast would make
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty(n, hidden.shape[1], dtype=acc, device=hidden.device) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are explicit here
        for s, e in _chunks(n, ce["chunk"]):
            h = hidden[s:e].to(mm)
            loss, saved = _ce_forward(h @ w.t(), target[s:e], group, ce["vocab_size"], ce["ignore_index"],
                                      ce["label_smoothing"], ce["z_loss"], own_buffer=True)
            losses[s:e] = loss
            if want_h or want_w:
                g = _ce_grad_(saved, grad_scale[s:e], vocab_size=ce["vocab_size"],
                              label_smoothing=ce["label_smoothing"], z_loss=ce["z_loss"]).to(mm)  # [c, v]
                del saved
                # written straight into the gradient buffers where the dtypes agree
                if want_h:
                    if acc == mm:
                        torch.mm(g, w, out=grad_h[s:e])
                    else:
                        grad_h[s:e] = g @ w
                if want_w:
                    if acc == mm:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += g.t() @ h
                del g
    return losses, grad_h, grad_w


class _FusedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, ce):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ones = torch.ones(target.shape, dtype=torch.float32, device=target.device)
        losses, grad_h, grad_w = _chunk_pass(hidden, weight, target, ones, want_h=want_h, want_w=want_w,
                                             group=group, ce=ce)
        ctx.save_for_backward(hidden, weight, target, grad_h, grad_w)
        ctx.group, ctx.ce, ctx.want, ctx.scope = group, ce, (want_h, want_w), ledger.current_scope()
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, grad_h, grad_w = ctx.saved_tensors
        want_h, want_w = ctx.want
        counted = target != ctx.ce["ignore_index"]
        g = grad_loss.float().masked_fill(~counted, 0.0)
        # The scale of the counted tokens' gradient: the largest, a device op (no host sync).
        c = g.abs().amax() * torch.sign(g.sum()) if g.numel() else g.new_zeros(())
        if not ctx.ce["uniform_grad"] and not bool((g[counted] == c).all()):  # a host sync
            # not one scale for every counted token: recompute the chunks with the real gradient
            _, grad_h, grad_w = _chunk_pass(hidden, weight, target, g, want_h=want_h, want_w=want_w,
                                            group=ctx.group, ce=ctx.ce)
        else:
            # in place: these buffers become the gradients (exact per token for the hidden states)
            grad_h = grad_h.mul_(g.unsqueeze(-1).to(grad_h.dtype)) if want_h else None
            grad_w = grad_w.mul_(c.to(grad_w.dtype)) if want_w else None
        if want_h:
            # hidden is replicated over the TP ranks: its gradient is the sum of every shard's part
            grad_h = ledger.region(ctx, "backward", all_reduce_, grad_h, ctx.group).to(hidden.dtype)  # in place
        if want_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def fused_head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_tokens: int | None = None,
    check_ids: bool = True,
    uniform_grad: bool = False,
) -> torch.Tensor:
    """Per-token fp32 losses of the head ``weight [v, d]`` (this rank's vocab shard, tied or untied)
    on ``hidden [..., d]`` against ``target [...]``; shaped like ``target``, 0 where ignored.

    Same options as ``vocab_parallel_cross_entropy``; ``chunk_tokens`` bounds the tokens per chunk
    (default ``default_chunk``: at most about 128 M logits on this rank, and on CPUs at most 1/16 of
    the tokens).
    ``check_ids=False`` skips the id check (a host sync). ``uniform_grad=True`` promises that the
    losses are summed or averaged with one weight for every counted token, so the backward need not
    check it (another host sync).
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree: "
                         "expected hidden shaped target + (d,)")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)}: expected [vocab shard, {hidden.shape[-1]}] "
                         "(this rank's rows of the output head)")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: expected at least 1 token per chunk")
    tp = group_size(group)
    padded = weight.shape[0] * tp
    vocab_size = padded if vocab_size is None else vocab_size
    check_loss_args(vocab_size=vocab_size, padded=padded, tp=tp, shard=weight.shape[0],
                    label_smoothing=label_smoothing, z_loss=z_loss)
    target = target.long()
    if check_ids:  # a host sync; the trainer turns it off (its loader checks ids on read)
        check_targets(target, vocab_size=vocab_size, ignore_index=ignore_index)
    n = target.numel()
    chunk = chunk_tokens or default_chunk(n, weight.shape[0], hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # F.linear's dtype under autocast
        mm_dtype = torch.get_autocast_dtype(device_type)
    else:
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    ce = dict(vocab_size=vocab_size, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
              z_loss=float(z_loss), chunk=chunk, uniform_grad=bool(uniform_grad), mm_dtype=mm_dtype)
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # no autograd (validation, generation): the forward matmuls only. The autograd function's
        # ``needs_input_grad`` ignores grad mode and would make gradients nobody asked for.
        ones = torch.ones(flat_t.shape, dtype=torch.float32, device=flat_t.device)
        losses, _, _ = _chunk_pass(flat_h, weight, flat_t, ones, want_h=False, want_w=False, group=group, ce=ce)
        return losses.view(target.shape)
    return _FusedHeadCrossEntropy.apply(flat_h, weight, flat_t, group, ce).view(target.shape)
