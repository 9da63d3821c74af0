"""Norms (replicated over TP ranks)."""

from __future__ import annotations

from torch import nn


def make_norm(dim: int, *, rmsnorm: bool = False, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """LayerNorm by default (with a bias unless ``bias=False``); RMSNorm
    (``x / sqrt(mean(x^2) + eps) * weight``, never a bias) with ``rmsnorm=True``."""
    if eps < 0:
        raise ValueError(f"norm eps={eps}: expected >= 0")
    return nn.RMSNorm(dim, eps=eps) if rmsnorm else nn.LayerNorm(dim, eps=eps, bias=bias)
