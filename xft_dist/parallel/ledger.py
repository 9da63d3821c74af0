"""The collective ledger: what ``comm``'s collectives moved, for tests and the benchmark.

While a ``CollectiveLedger`` is active (``with CollectiveLedger() as led``) every collective of
``parallel/comm.py`` is recorded: kind, group size, bytes, the phase (forward, backward, or a
forward replayed in the backward by activation checkpointing: recompute) and the module it was
made for. ``tools/bench.py --mode comm`` prints it; ``tests/distributed/test_comm_ledger.py`` holds
the models to the analytical minimum.

``comm`` reaches this module through two calls, ``note`` (each collective) and ``region`` (each
autograd region function); both return at once when nothing records, so training pays nothing.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# The active ledger is one per process: autograd runs a backward on a thread of its own (one per CUDA
# device), and its collectives belong to the step that the ledger records. Module scopes and the
# region role are per thread (a forward's scope is carried to its backward explicitly).
_ACTIVE: "CollectiveLedger | None" = None
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .scopes: module names; .role: forward / backward


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective: ``kind`` (all_reduce, all_gather, reduce_scatter, broadcast), the group's
    size, the bytes of one rank's input, ``phase`` (forward, backward, recompute), the module
    (``scope``, a qualified name such as ``net.attn_layers.layers.0.attn``), the tensor shape and
    the group's global ranks."""

    kind: str
    group_size: int
    bytes: int
    phase: str
    scope: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...] = ()

    @property
    def layer(self) -> str:
        """The stack and layer the record belongs to (``encoder.layers.1``), or its scope outside any layer."""
        m = re.search(r"(?:^|\.)((?:[\w.]*?\.)?layers\.\d+)", self.scope)
        return m.group(1) if m else self.scope


@dataclass
class CollectiveLedger:
    """Records each collective of ``comm`` in this process while active (``with CollectiveLedger() as
    led``), whichever thread makes it (autograd's backward threads included).

    ``watch(module)`` names records after the innermost module running when the collective (or, for a
    backward collective, the forward it belongs to) was made. Collectives on groups of size 1 are
    identities and not recorded."""

    records: list[CollectiveRecord] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __enter__(self) -> "CollectiveLedger":
        global _ACTIVE
        with _LOCK:
            if _ACTIVE is not None:
                raise RuntimeError("a CollectiveLedger is already recording in this process")
            _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        with _LOCK:
            _ACTIVE = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def watch(self, module: torch.nn.Module, prefix: str = "") -> "CollectiveLedger":
        for name, sub in module.named_modules(prefix=prefix):
            self._hooks.append(sub.register_forward_pre_hook(_push_scope(name or type(sub).__name__)))
            self._hooks.append(sub.register_forward_hook(_pop_scope, always_call=True))
        return self

    def select(self, *, min_bytes: int = 0, phase: str | None = None,
               kind: str | None = None) -> list[CollectiveRecord]:
        return [r for r in self.records if r.bytes >= min_bytes and (phase is None or r.phase == phase)
                and (kind is None or r.kind == kind)]


def _push_scope(name: str):
    def hook(module, args):
        stack = getattr(_LOCAL, "scopes", None)
        if stack is None:
            stack = _LOCAL.scopes = []
        stack.append(name)
    return hook


def _pop_scope(module, args, output):
    stack = getattr(_LOCAL, "scopes", None)
    if stack:
        stack.pop()


def current_scope() -> str:
    """The module running now (as named by an active ledger's ``watch``), or ""."""
    stack = getattr(_LOCAL, "scopes", None)
    return stack[-1] if stack else ""


@contextlib.contextmanager
def in_scope(scope: str, role: str | None = None) -> Iterator[None]:
    """Attribute the collectives made inside to ``scope`` (a backward replaying its forward's
    module), as ``role`` ("forward" or "backward") where given."""
    stack = getattr(_LOCAL, "scopes", None)
    if stack is None:
        stack = _LOCAL.scopes = []
    old_role = getattr(_LOCAL, "role", None)
    stack.append(scope)
    if role is not None:
        _LOCAL.role = role
    try:
        yield
    finally:
        stack.pop()
        _LOCAL.role = old_role


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def note(kind: str, x: torch.Tensor, group: ProcessGroup | None) -> None:
    led = _ACTIVE
    if led is None:
        return
    role = getattr(_LOCAL, "role", None)
    if role == "backward":
        phase = "backward"
    elif role == "forward":
        phase = "recompute" if _in_backward() else "forward"
    else:
        phase = "backward" if _in_backward() else "forward"
    if group is None:
        ranks = tuple(range(dist.get_world_size())) if dist.is_available() and dist.is_initialized() else (0,)
    else:
        ranks = tuple(dist.get_process_group_ranks(group))
    record = CollectiveRecord(kind, len(ranks), x.numel() * x.element_size(), phase, current_scope(),
                              tuple(x.shape), ranks)
    with _LOCK:
        led.records.append(record)


def region(ctx, role: str, fn, *args, **kwargs):
    """Run a region function's ``forward`` or ``backward`` (``role``) body ``fn``: the forward
    remembers its module, the backward's collectives are attributed to it."""
    if role == "forward":
        ctx.scope = current_scope()
    if _ACTIVE is None:  # nothing records: no bookkeeping on the hot path
        return fn(*args, **kwargs)
    with in_scope(ctx.scope, role):
        return fn(*args, **kwargs)
