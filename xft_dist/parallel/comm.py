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

and the pair that sequence parallelism uses at a TP region's edges, along the sequence (dim 1)::

    gather_seq_to_tp     forward: all-gather        backward: reduce-scatter
    reduce_scatter_seq   forward: reduce-scatter    backward: all-gather

``enter_tp`` / ``leave_tp`` pick a region's entry and exit: ``copy_to_tp`` / ``reduce_from_tp``, or
with ``sequence_parallel=True`` the sequence pair above. ``tp_region_input`` is ``enter_tp`` for
the column-parallel layers of a region; under sequence parallelism it keeps only this rank's chunk
for the backward and all-gathers it again there (Megatron's trade: one more all-gather for a full
``[b, n, d]`` less per region).

Each collective tells the collective ledger (``parallel/ledger.py``) about itself through one call,
``ledger.note``, and each region function runs through ``ledger.region``: both return at once
when no ledger records.

``group=None`` (or a group of size 1) makes every collective on a group the identity. The
exceptions are ``barrier``, ``all_gather_object`` and ``any_rank``/``reduce_values`` with
``group=None``, which mean the whole world when one is initialised.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import ledger

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
    ledger.note("all_reduce", x, group)
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
        ledger.note("all_reduce", x, group)
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
    ledger.note("all_reduce", t, group)
    dist.all_reduce(t, op=_op(op), group=group)
    return t.tolist()


def any_rank(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is True on at least one (so all ranks decide the same way)."""
    return reduce_values([1.0 if flag else 0.0], group, op="max")[0] > 0


# One flat tensor in, one out (torch 2.13 names them ``*_single``; before, ``*_into_tensor`` / ``*_tensor``).
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _readable(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``x`` where ``group``'s collectives can read it, for a collective that only reads its input:
    ``x`` itself (no copy) when it is already there and contiguous."""
    device = group_device(group)
    if device is not None and x.device != device:
        x = x.to(device)
    return x.contiguous()


def all_gather(x: torch.Tensor, group: ProcessGroup | None, *, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` (in rank order), on ``x``'s device.

    One ``all_gather_single`` into a preallocated output, which it fills rank-major: that is
    the concatenation itself where ``dim`` has only size-1 dimensions before it, and one copy
    (rank-major to ``dim``-major) otherwise. The input is read in place."""
    size = group_size(group)
    if size == 1:
        return x
    ledger.note("all_gather", x, group)
    y = _readable(x, group)
    dim = dim % y.dim()
    out = torch.empty((size, *y.shape), dtype=y.dtype, device=y.device)
    _ALL_GATHER_SINGLE(out.view(-1), y.view(-1), group=group)
    gathered = (*y.shape[:dim], size * y.shape[dim], *y.shape[dim + 1:])
    if math.prod(y.shape[:dim]) == 1:
        return out.view(gathered).to(x.device)
    return out.movedim(0, dim).reshape(gathered).to(x.device)


def reduce_scatter(x: torch.Tensor, group: ProcessGroup | None, *, dim: int = 0,
                   op: str | dist.ReduceOp = "sum") -> torch.Tensor:
    """This rank's chunk (along ``dim``) of the reduction of ``x`` over ``group``.

    One ``reduce_scatter_single``, which splits its input rank-major: ``x`` is read in place where
    ``dim`` has only size-1 dimensions before it, and rearranged by one copy otherwise."""
    size = group_size(group)
    if size == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} ranks")
    ledger.note("reduce_scatter", x, group)
    chunk = (*x.shape[:dim], x.shape[dim] // size, *x.shape[dim + 1:])
    if math.prod(x.shape[:dim]) == 1:
        y = _readable(x, group)
    else:  # [..., size * c, ...] -> [size, ..., c, ...]: each rank's chunk contiguous
        device = group_device(group) or x.device
        y = x.to(device).unflatten(dim, (size, chunk[dim])).movedim(dim, 0).contiguous()
    out = torch.empty(chunk, dtype=x.dtype, device=y.device)
    _REDUCE_SCATTER_SINGLE(out.view(-1), y.view(-1), op=_op(op), group=group)
    return out.to(x.device)


def broadcast(x: torch.Tensor, group: ProcessGroup | None, *, src: int = 0) -> torch.Tensor:
    """``x`` of global rank ``src`` on every rank of ``group``, on ``x``'s device."""
    if group_size(group) == 1 and group is not None:
        return x
    if group is None and (not world_initialized() or dist.get_world_size() == 1):
        return x
    ledger.note("broadcast", x, group)
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


def barrier(group: ProcessGroup | None = None, *, timeout_s: float | None = None) -> None:
    """Wait for every rank of ``group`` (the world by default); nothing to do without a world.

    ``timeout_s``: wait up to this long instead of the group's own timeout, for a wait on long host
    work of one rank (a checkpoint's conversion to another layout). The wait then runs on a gloo
    group made for it (a CPU barrier: NCCL's watchdog, bound to ``parallel.timeout_s``, is not
    involved), and a rank that does not arrive is named (``monitored_barrier``)."""
    if not world_initialized():
        return
    if timeout_s is not None:
        from datetime import timedelta

        ranks = None if group is None else dist.get_process_group_ranks(group)
        waiting = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
        try:
            dist.monitored_barrier(group=waiting, timeout=timedelta(seconds=timeout_s))
        finally:
            dist.destroy_process_group(waiting)
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


class _Region(torch.autograd.Function):
    """Base of the region collectives: the forward runs as "forward" (a recompute when replayed in
    the backward), the backward as "backward" in the forward's module scope."""

    @staticmethod
    def _fwd(ctx, fn, *args, **kwargs):
        return ledger.region(ctx, "forward", fn, *args, **kwargs)

    @staticmethod
    def _bwd(ctx, fn, *args, **kwargs):
        return ledger.region(ctx, "backward", fn, *args, **kwargs)


class _CopyToTP(_Region):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.scope = group, ledger.current_scope()
        return x

    @staticmethod
    def backward(ctx, grad):
        return _Region._bwd(ctx, all_reduce, grad, ctx.group), None


class _ReduceFromTP(_Region):
    @staticmethod
    def forward(ctx, x, group):
        return _Region._fwd(ctx, all_reduce, x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(_Region):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.scope = group, dim, ledger.current_scope()
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _Region._bwd(ctx, all_gather, grad, ctx.group, dim=ctx.dim), None, None


class _GatherFromTP(_Region):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _Region._fwd(ctx, all_gather, x, group, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _GatherSeq(_GatherFromTP):
    """``_GatherFromTP``'s forward; the backward sums the gradient over the ranks (reduce-scatter),
    since every rank's full input fed its own part of the region."""

    @staticmethod
    def backward(ctx, grad):
        return _Region._bwd(ctx, reduce_scatter, grad, ctx.group, dim=ctx.dim), None, None


class _ReduceScatterSeq(_Region):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _Region._fwd(ctx, reduce_scatter, x, group, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return _Region._bwd(ctx, all_gather, grad, ctx.group, dim=ctx.dim), None, None


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


SEQ_DIM = 1  # activations are [b, n, d]: sequence parallelism splits n


def gather_seq_to_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = SEQ_DIM) -> torch.Tensor:
    """Enter a TP region from sequence-parallel activations: all-gather the sequence chunks;
    gradients are reduce-scattered back (summed over the TP ranks, each keeping its chunk)."""
    if group_size(group) == 1:
        return x
    return _GatherSeq.apply(x, group, dim)


def reduce_scatter_seq(x: torch.Tensor, group: ProcessGroup | None, dim: int = SEQ_DIM) -> torch.Tensor:
    """Leave a TP region into sequence-parallel activations: sum the partial results and keep this
    rank's chunk of the sequence; gradients are all-gathered."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterSeq.apply(x, group, dim)


def enter_tp(x: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool = False) -> torch.Tensor:
    """A TP region's input: ``copy_to_tp``, or the sequence all-gather under sequence parallelism."""
    return gather_seq_to_tp(x, group) if sequence_parallel else copy_to_tp(x, group)


def leave_tp(x: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool = False) -> torch.Tensor:
    """A TP region's output: ``reduce_from_tp``, or the sequence reduce-scatter under sequence parallelism."""
    return reduce_scatter_seq(x, group) if sequence_parallel else reduce_from_tp(x, group)


class _Regather:
    """The gathered input of a sequence-parallel region, kept for the backward as this rank's chunk."""

    def __init__(self, full: torch.Tensor, chunk: torch.Tensor, group: ProcessGroup | None, dim: int):
        self.ptr, self.chunk, self.group, self.dim = full.untyped_storage().data_ptr(), chunk.detach(), group, dim
        self.scope, self.full, self.pending = ledger.current_scope(), None, 0

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() != self.ptr:
            return t
        self.pending += 1
        return (self, tuple(t.shape), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        self, shape, stride, offset = packed
        if self.full is None:
            with ledger.in_scope(self.scope, "backward"):
                self.full = all_gather(self.chunk, self.group, dim=self.dim)
        full = self.full
        self.pending -= 1
        if self.pending <= 0:  # every saved use has read it: let it go
            self.full = None
        return full.as_strided(shape, stride, offset)


def _outer_saved_tensor_hooks() -> bool:
    """True inside activation checkpointing (or any other saved-tensor hooks), which then decide.
    A torch without the query answers True: the region then keeps its gathered input (right, and
    only the memory saving is lost)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


@contextlib.contextmanager
def tp_region_input(x: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool = False):
    """``with tp_region_input(x, group, sp) as full:`` the region's input (``enter_tp(x)``) for the
    column-parallel layers called inside the block. Under sequence parallelism the layers' saved
    copies of ``full`` are replaced by this rank's chunk ``x`` and all-gathered again in the
    backward, once for all of them (skipped inside activation checkpointing, which recomputes).
    Under ``torch.autocast`` the layers save their own cast copies instead, which stay as they are
    (the trainer runs bf16 as DeepSpeed does, with bf16 weights and activations: no autocast)."""
    full = enter_tp(x, group, sequence_parallel)
    # Under torch.compile the compiler decides what the backward keeps (saved-tensor hooks do not trace).
    if (not sequence_parallel or group_size(group) == 1 or torch.compiler.is_compiling()
            or _outer_saved_tensor_hooks()):
        yield full
        return
    keep = _Regather(full, x, group, SEQ_DIM)
    with torch.autograd.graph.saved_tensors_hooks(keep.pack, _Regather.unpack):
        yield full
