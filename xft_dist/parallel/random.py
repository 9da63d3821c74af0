"""RNG streams for tensor parallelism, and capture/restore of every RNG state.

The default generators are seeded identically on every rank ("DP-shared"): dropout outside a split
region (on replicated activations) then draws the same mask on all TP ranks, as it must, and full
weights built from them are the same everywhere. Dropout *inside* a split region (on this rank's
heads or hidden units) must differ between TP ranks, or every shard would drop the same pattern; it
runs under ``streams.fork()``, which swaps in a TP-distinct generator state for the duration.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch

TP_STREAM = "tensor-parallel"
# Offset between the default seed and the TP stream seeds, so that neither collides with the other.
_TP_SEED_OFFSET = 2718


def _cuda_ready() -> bool:
    # Whether or not CUDA was initialised yet: a stream created before the first CUDA op must still
    # carry a CUDA state, or dropout in TP regions would draw the same mask on every TP rank.
    return torch.cuda.is_available()


def _current_states() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if _cuda_ready() else None)


def _set_states(cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
    torch.set_rng_state(cpu)
    if cuda is not None and _cuda_ready():
        torch.cuda.set_rng_state(cuda)


def _states_for_seed(seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    saved = _current_states()
    torch.manual_seed(seed)  # seeds CPU and (lazily) every CUDA device
    states = _current_states()
    _set_states(*saved)
    return states


class RNGStreams:
    """Named generator states that can be swapped in around a region of code."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._active: set[str] = set()

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._states[name] = _states_for_seed(seed)

    def names(self) -> list[str]:
        return sorted(self._states)

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM) -> Iterator[None]:
        """Run the body with stream ``name`` as the default generator; advance it, not the default."""
        if name not in self._states:
            raise KeyError(f"unknown RNG stream {name!r}; streams: {self.names()}")
        if name in self._active:
            raise RuntimeError(f"RNG stream {name!r} is already forked (nested fork of one stream)")
        outer = _current_states()
        _set_states(*self._states[name])
        self._active.add(name)
        try:
            yield
        finally:
            self._states[name] = _current_states()
            self._active.discard(name)
            _set_states(*outer)

    def get_states(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """A copy of every stream's state (activation checkpointing replays from it)."""
        return {k: (cpu.clone(), None if cuda is None else cuda.clone())
                for k, (cpu, cuda) in self._states.items()}

    def set_states(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        unknown = set(states) - set(self._states)
        if unknown:
            raise KeyError(f"unknown RNG streams {sorted(unknown)}; streams: {self.names()}")
        for k, (cpu, cuda) in states.items():
            self._states[k] = (cpu.clone(), None if cuda is None else cuda.clone())


def seed_all(seed: int, *, tp_rank: int = 0) -> RNGStreams:
    """Seed Python, NumPy and torch identically on every rank; return streams with a TP-distinct one."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    streams = RNGStreams()
    streams.add(TP_STREAM, seed + _TP_SEED_OFFSET + tp_rank)
    return streams


def capture_rng_state(streams: RNGStreams | None = None) -> dict[str, Any]:
    """Every RNG state of this process (Python, NumPy, torch CPU, all CUDA devices, named streams)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if _cuda_ready() else None,
        "streams": streams.get_states() if streams is not None else None,
    }


def restore_rng_state(state: dict[str, Any], streams: RNGStreams | None = None) -> None:
    """Inverse of ``capture_rng_state``: the next draws are those that followed the capture."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and _cuda_ready():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if state["streams"] is not None:
        if streams is None:
            raise ValueError("the captured state holds named RNG streams; pass the RNGStreams to restore")
        streams.set_states(state["streams"])


def rng_state_to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """``capture_rng_state``'s result in types ``torch.load(weights_only=True)`` reads (NumPy's key
    array becomes a tensor)."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                               int(has_gauss), float(gauss))}


def rng_state_from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``rng_state_to_tensors``."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    return {**state, "numpy": (kind, keys, pos, has_gauss, gauss)}
