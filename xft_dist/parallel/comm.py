"""Every collective xft_dist makes goes through this module.

A collective's tensors must live where the group's backend can read them: NCCL takes CUDA tensors
only (a CPU tensor raises "No backend type associated with device type cpu"), gloo is used with CPU
tensors. ``group_device(group)`` says which, and every helper here moves its input there and its
result back to the caller's device. CPU tests run gloo, where the two agree; the structure (no
collective anywhere else, checked by ``tests/unit/test_collectives_ast.py``) keeps the GPU path right.

Plain collectives (functional: the input is never modified)::

    all_reduce(x, group, op="sum")      all_gather(x, group, dim)        reduce_scatter(x, group, dim)
    all_reduce_(x, group) (in place)
    broadcast(x, group, src)            all_gather_object(obj, group)    barrier(group)
    reduce_values([a, b], group)        any_rank(flag, group)

Autograd collectives for a tensor-parallel region, in conjugate pairs (the backward of one is the
forward of the other)::

    copy_to_tp     forward: identity           backward: all-reduce (sum)
    reduce_from_tp forward: all-reduce (sum)   backward: identity
    scatter_to_tp  forward: keep own chunk     backward: all-gather
    gather_from_tp forward: all-gather         backward: keep own chunk

``group=None`` (or a group of size 1) makes every collective on a group the identity. The
exceptions are ``barrier``, ``all_gather_object`` and ``any_rank``/``reduce_values`` with
``group=None``, which mean the whole world when one is initialised.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT}


def world_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def device_for_backend(backend: str, current: torch.device | None = None) -> torch.device | None:
    """The device a backend's collectives need, or None when any device it serves will do.

    ``backend`` is what ``torch.distributed.get_backend`` reports: ``"nccl"``, ``"gloo"``, or a
    per-device list such as ``"cpu:gloo,cuda:nccl"`` (then the tensor may stay where it is).
    """
    backend = backend.lower()
    if "," in backend or ":" in backend:
        return None
    if backend == "nccl":
        if current is not None:
            return current
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return None


def group_device(group: ProcessGroup | None = None) -> torch.device | None:
    """Where tensors for ``group``'s collectives must be (None: leave them where they are)."""
    return device_for_backend(str(dist.get_backend(group)))


def _place(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """A contiguous tensor on the group's device that the collective may overwrite (never ``x``)."""
    device = group_device(group)
    if device is not None and x.device != device:
        return x.to(device).contiguous()
    return x.contiguous().clone()


def _op(op: str | dist.ReduceOp):
    if isinstance(op, str):
        if op not in _OPS:
            raise ValueError(f"reduce op {op!r}: expected one of {sorted(_OPS)}")
        return _OPS[op]
    return op


def all_reduce(x: torch.Tensor, group: ProcessGroup | None, *, op: str | dist.ReduceOp = "sum") -> torch.Tensor:
    """The reduction of ``x`` over ``group``, on ``x``'s device; ``x`` itself is not modified."""
    if group_size(group) == 1:
        return x
    y = _place(x, group)
    dist.all_reduce(y, op=_op(op), group=group)
    return y.to(x.device)


def all_reduce_(x: torch.Tensor, group: ProcessGroup | None, *, op: str | dist.ReduceOp = "sum") -> torch.Tensor:
    """In place when ``x`` is contiguous and already on the group's device (the caller owns it);
    otherwise through a placed copy, written back. Returns ``x``."""
    if group_size(group) == 1:
        return x
    device = group_device(group)
    if x.is_contiguous() and (device is None or x.device == device):
        dist.all_reduce(x, op=_op(op), group=group)
        return x
    return x.copy_(all_reduce(x, group, op=op))


def reduce_values(values: Sequence[float] | torch.Tensor, group: ProcessGroup | None = None, *,
                  op: str = "sum") -> list[float]:
    """Reduce a few host-side numbers (token counts, flags) in float64; return Python floats.

    The tensor is built directly on the group's device. ``group=None`` is the whole world when one
    is initialised, else the values come back unchanged.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to(torch.float64).flatten().tolist()
    values = [float(v) for v in values]
    if not world_initialized() or (group is not None and group_size(group) == 1):
        return values
    if group is None and dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=group_device(group) or "cpu")
    dist.all_reduce(t, op=_op(op), group=group)
    return t.tolist()


def any_rank(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is True on at least one (so all ranks decide the same way)."""
    return reduce_values([1.0 if flag else 0.0], group, op="max")[0] > 0


def all_gather(x: torch.Tensor, group: ProcessGroup | None, *, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` (in rank order), on ``x``'s device."""
    size = group_size(group)
    if size == 1:
        return x
    y = _place(x, group)
    parts = [torch.empty_like(y) for _ in range(size)]
    dist.all_gather(parts, y, group=group)
    return torch.cat(parts, dim=dim).to(x.device)


def reduce_scatter(x: torch.Tensor, group: ProcessGroup | None, *, dim: int = 0,
                   op: str | dist.ReduceOp = "sum") -> torch.Tensor:
    """This rank's chunk (along ``dim``) of the reduction of ``x`` over ``group``."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} ranks")
    y = _place(x, group)
    parts = [p.contiguous() for p in y.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, op=_op(op), group=group)
    return out.to(x.device)


def broadcast(x: torch.Tensor, group: ProcessGroup | None, *, src: int = 0) -> torch.Tensor:
    """``x`` of global rank ``src`` on every rank of ``group``, on ``x``'s device."""
    if group_size(group) == 1 and group is not None:
        return x
    if group is None and (not world_initialized() or dist.get_world_size() == 1):
        return x
    y = _place(x, group)
    dist.broadcast(y, src=src, group=group)
    return y.to(x.device)


def all_gather_object(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (``group=None``: the whole world, if any).

    Under NCCL the objects travel through the current CUDA device: call ``torch.cuda.set_device``
    first (``build_run`` and the doctor do).
    """
    if not world_initialized():
        return [obj]
    size = dist.get_world_size(group)
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group`` (the world by default); nothing to do without a world."""
    if not world_initialized():
        return
    device = group_device(group)
    if device is not None and device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])  # NCCL: name the device, do not guess
    else:
        dist.barrier(group=group)


# ---------------------------------------------------------------------------------------------
# Autograd collectives for tensor-parallel regions


def _split(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} evenly over {size} tensor-parallel ranks"
        )
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

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
        return all_gather(grad, ctx.group, dim=ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim=dim)

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
