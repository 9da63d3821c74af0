"""Throughput, MFU, memory and padding per step."""

from __future__ import annotations

import resource
import time

import torch


def memory_mib() -> float:
    """CUDA max allocated on GPU ranks, else this process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepMeter:
    """Turns one step's token counts and wall time into the logged metrics."""

    def __init__(self, *, flops_per_token: float, peak_flops_total: float | None):
        self.flops_per_token, self.peak = flops_per_token, peak_flops_total
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def finish(self, *, tokens: int, real_tokens: int, loss_tokens: float) -> dict:
        dt = time.perf_counter() - self._t0
        out = {
            "step_time_s": dt,
            "tokens_per_s": tokens / dt,
            "loss_tokens_per_s": loss_tokens / dt,
            "padding_fraction": 1.0 - real_tokens / max(tokens, 1),
            "memory_mib": memory_mib(),
        }
        if self.peak:
            out["mfu"] = tokens / dt * self.flops_per_token / self.peak
        return out
