"""Initialisation schemes. Each weight is still drawn as the full matrix (``sharded_parameter``), so
a scheme gives the same weights at any TP size.

``d`` is the width of the stack a layer belongs to, ``L`` its number of layers, ``fan_in`` a
matrix's input features. "Output" projections are the ones that write into the residual stream
(attention ``to_out``, self- and cross-attention alike, and the feed-forward ``down``).

=================  ==========================  ===========================  ==================  ====================
scheme             matrices                    outputs                      token embedding     untied output head
=================  ==========================  ===========================  ==================  ====================
``normal``         N(0, std)                   N(0, std / sqrt(2 L))        N(0, std)           N(0, std)
``small_init``     N(0, sqrt(2 / (5 d)))       N(0, 2 / (L sqrt(d)))        as matrices         as matrices
``xtransformers``  U(+-1 / sqrt(fan_in))       as matrices                  N(0, sqrt(2 / d))   U(+-1 / sqrt(d))
=================  ==========================  ===========================  ==================  ====================

``normal`` is Megatron / GPT-2 (``std`` defaults to 0.02); ``small_init`` with Wang's outputs is
GPT-NeoX's; ``xtransformers`` is what x-transformers (and so PyTorch's ``nn.Linear`` and
``kaiming_normal_`` for the embedding) draws. Biases are zero, except under ``xtransformers``
(U(+-1 / sqrt(fan_in)), as ``nn.Linear``). Norm gains are one. ``emb_std`` / ``head_std`` replace
the scheme's choice for the token embedding / untied output head with N(0, that std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config.choices import DEFAULT_INIT
from ..config.choices import INIT_SCHEMES as SCHEMES

InitMethod = Callable[[torch.Tensor], object]


def normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std)."""
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)
    return init


def uniform_init(bound: float) -> InitMethod:
    """U(-bound, bound)."""
    def init(weight: torch.Tensor) -> None:
        nn.init.uniform_(weight, -bound, bound)
    return init


def zeros_init(weight: torch.Tensor) -> None:
    nn.init.zeros_(weight)


@dataclass(frozen=True)
class InitScheme:
    name: str = DEFAULT_INIT
    std: float = 0.02
    emb_std: float | None = None
    head_std: float | None = None

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"init={self.name!r}: expected one of {SCHEMES}")
        for key in ("std", "emb_std", "head_std"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"init {key}={value}: expected a positive standard deviation")

    @classmethod
    def of(cls, init: "str | InitScheme | None") -> "InitScheme":
        if init is None:
            return cls()
        return init if isinstance(init, InitScheme) else cls(name=init)

    def matrix(self, fan_in: int, *, dim: int) -> InitMethod:
        """Projections that read the residual stream (q, k, v, feed-forward up and gate)."""
        if self.name == "normal":
            return normal_init(self.std)
        if self.name == "small_init":
            return normal_init(math.sqrt(2.0 / (5.0 * dim)))
        return uniform_init(1.0 / math.sqrt(fan_in))

    def output(self, fan_in: int, *, dim: int, num_layers: int) -> InitMethod:
        """Projections that write into the residual stream, in a stack of ``num_layers`` layers."""
        if self.name == "normal":
            return normal_init(self.std / math.sqrt(2.0 * num_layers))
        if self.name == "small_init":
            return normal_init(2.0 / (num_layers * math.sqrt(dim)))
        return uniform_init(1.0 / math.sqrt(fan_in))

    def bias(self, fan_in: int) -> InitMethod:
        return uniform_init(1.0 / math.sqrt(fan_in)) if self.name == "xtransformers" else zeros_init

    def embedding(self, dim: int) -> InitMethod:
        if self.emb_std is not None:
            return normal_init(self.emb_std)
        if self.name == "normal":
            return normal_init(self.std)
        if self.name == "small_init":
            return normal_init(math.sqrt(2.0 / (5.0 * dim)))
        return normal_init(math.sqrt(2.0 / dim))

    def head(self, dim: int) -> InitMethod:
        if self.head_std is not None:
            return normal_init(self.head_std)
        if self.name == "xtransformers":
            return uniform_init(1.0 / math.sqrt(dim))
        return self.matrix(dim, dim=dim)

    def position_std(self, dim: int) -> float:
        """Learned absolute positions."""
        if self.name == "normal":
            return self.std
        if self.name == "small_init":
            return math.sqrt(2.0 / (5.0 * dim))
        return dim ** -0.5
