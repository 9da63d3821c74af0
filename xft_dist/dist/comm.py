"""Autograd-aware collectives for a tensor-parallel region.

They come in conjugate pairs (the backward of one is the forward of the other):

    copy_to_tp     forward: identity           backward: all-reduce (sum)
    reduce_from_tp forward: all-reduce (sum)   backward: identity
    scatter_to_tp  forward: keep own chunk     backward: all-gather
    gather_from_tp forward: all-gather         backward: keep own chunk

``group=None`` (or a group of size 1) makes every one of them the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} evenly over {size} tensor-parallel ranks"
        )
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region: replicated input, gradients summed over the TP ranks."""
    if group_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region by summing the partial results of every TP rank."""
    if group_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of ``dim``; gradients are gathered back."""
    if group_size(group) == 1:
        return x
    return _ScatterToTP.apply(x, group, dim)


def gather_from_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's chunk along ``dim``; gradients are split back."""
    if group_size(group) == 1:
        return x
    return _GatherFromTP.apply(x, group, dim)
