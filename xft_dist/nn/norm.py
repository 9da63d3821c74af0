"""Norms (replicated over TP ranks)."""

from __future__ import annotations

from torch import nn


def make_norm(dim: int, *, rmsnorm: bool = False, eps: float = 1e-5) -> nn.Module:
    """LayerNorm by default; RMSNorm (``x / rms(x) * weight``) with ``rmsnorm=True``."""
    return nn.RMSNorm(dim, eps=eps) if rmsnorm else nn.LayerNorm(dim, eps=eps)
