"""Norms (replicated over TP ranks).

Under sequence parallelism (``sequence_parallel=True``, set when the norm is built) a norm sees
only this rank's chunk of the sequence, so its weight's (and bias's) gradient is a partial sum: the
forward then reads the parameters through ``copy_to_tp``, whose backward sums the gradient over the
TP group before it reaches the parameter (and DeepSpeed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from ..parallel import copy_to_tp


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, *, eps: float = 1e-5, bias: bool = True, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False):
        super().__init__(dim, eps=eps, bias=bias)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return super().forward(x)
        bias = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, copy_to_tp(self.weight, self.group), bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, *, eps: float = 1e-5, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False):
        super().__init__(dim, eps=eps)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return super().forward(x)
        return F.rms_norm(x, self.normalized_shape, copy_to_tp(self.weight, self.group), self.eps)


def make_norm(dim: int, *, rmsnorm: bool = False, eps: float = 1e-5, bias: bool = True,
              group: ProcessGroup | None = None, sequence_parallel: bool = False) -> nn.Module:
    """LayerNorm by default (with a bias unless ``bias=False``); RMSNorm
    (``x / sqrt(mean(x^2) + eps) * weight``, never a bias) with ``rmsnorm=True``. ``group``: the TP
    group whose ranks hold the other sequence chunks under sequence parallelism."""
    if eps < 0:
        raise ValueError(f"norm eps={eps}: expected >= 0")
    if rmsnorm:
        return RMSNorm(dim, eps=eps, group=group, sequence_parallel=sequence_parallel)
    return LayerNorm(dim, eps=eps, bias=bias, group=group, sequence_parallel=sequence_parallel)
