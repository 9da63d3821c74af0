"""Feed-forward block: column-parallel up (and gate), row-parallel down. GELU, or SwiGLU / GEGLU."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from ..parallel import RNGStreams, group_size, tp_region_input
from .init import InitScheme
from .linear import ColumnParallelLinear, RowParallelLinear, fused_column


def split_region_rng(rng: RNGStreams | None, group: ProcessGroup | None, dropout: float, what: str):
    """Check that dropout inside a TP-split region has a TP-distinct RNG stream to draw from."""
    if dropout > 0 and group_size(group) > 1 and rng is None:
        raise ValueError(f"{what}: dropout={dropout} at tensor-parallel size {group_size(group)} needs "
                         "rng=xft_dist.parallel.seed_all(seed, tp_rank=...) so each TP rank drops its own units")
    return rng


def fork(rng: RNGStreams | None):
    return rng.fork() if rng is not None else contextlib.nullcontext()


class FeedForward(nn.Module):
    """``down(act(up(x)))``; with ``glu=True`` ``down(act(gate(x)) * up(x))`` (SwiGLU with ``swish``).

    Up and gate are separate column-parallel layers, so every TP rank holds matching halves of a GLU;
    they share one entry into the TP region (one backward all-reduce of the input, not two) and run
    as one GEMM (``fused_column``).
    """

    def __init__(
        self,
        dim: int,
        *,
        mult: float = 4,
        inner_dim: int | None = None,
        glu: bool = False,
        swish: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        group: ProcessGroup | None = None,
        rng: RNGStreams | None = None,
        init: InitScheme | str | None = None,
        num_layers: int = 1,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        inner = inner_dim or int(dim * mult)
        self.sequence_parallel = sequence_parallel
        init = InitScheme.of(init)
        col = dict(bias=bias, group=group, init_method=init.matrix(dim, dim=dim), bias_init=init.bias(dim))
        self.up = ColumnParallelLinear(dim, inner, **col)
        self.gate = ColumnParallelLinear(dim, inner, **col) if glu else None
        self.down = RowParallelLinear(inner, dim, bias=bias, group=group, bias_init=init.bias(inner),
                                      init_method=init.output(inner, dim=dim, num_layers=num_layers),
                                      sequence_parallel=sequence_parallel)
        self.act = F.silu if swish else F.gelu
        self.dropout = dropout
        self.rng = split_region_rng(rng, group, dropout, "FeedForward")
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, n, dim]``; built with ``sequence_parallel=True``, this rank's sequence chunk
        ``[b, n / tp, dim]`` in and out (all-gathered on entry, reduce-scattered on exit)."""
        with tp_region_input(x, self.group, self.sequence_parallel) as x:
            if self.gate is not None:  # one GEMM for gate and up
                gate, up = fused_column(x, [self.gate, self.up])
            else:
                gate, up = None, self.up(x, tp_input=True)
        h = self.act(gate) * up if gate is not None else self.act(up)
        if self.dropout > 0 and self.training:
            with fork(self.rng):  # hidden units are split over TP ranks: TP-distinct masks
                h = F.dropout(h, self.dropout, training=True)
        return self.down(h)
