"""Activation checkpointing that replays the TP RNG stream, so recomputed dropout masks are the originals.

``torch.utils.checkpoint`` restores the default CPU / CUDA generators for the recompute, but not
our named streams (they live outside torch). Here the streams' states are saved at the forward,
swapped in for the recompute, and swapped back afterwards.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.utils.checkpoint

from ..parallel import RNGStreams


def checkpoint(fn: Callable[..., Any], *args, rng: RNGStreams | None = None, **kwargs) -> Any:
    if rng is None:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    at_forward = rng.get_states()
    calls = 0

    def run(*a, **kw):
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward itself: advance the streams as usual
            return fn(*a, **kw)
        later = rng.get_states()
        rng.set_states(at_forward)
        try:
            return fn(*a, **kw)
        finally:
            rng.set_states(later)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
