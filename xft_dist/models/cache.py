"""What a forward pass can hand back besides its output: per-block hidden states and the key/value
caches of cached decoding (x-transformers' ``LayerIntermediates``, the fields this package fills)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..nn.attention import KVCache


@dataclass
class BlockCache:
    """One block's caches: its self-attention and, when it cross-attends, its cross-attention."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache | None = None


@dataclass
class LayerIntermediates:
    """``hiddens``: the input of every block and the last block's output (before the final norm);
    ``last_hidden``: the stack's output (after it). ``attn_cache``: one ``BlockCache`` per block;
    ``cache_length``: the positions the caches hold (the next call computes positions from there)."""

    hiddens: list[torch.Tensor] | None = None
    last_hidden: torch.Tensor | None = None
    attn_cache: list[BlockCache] | None = None
    cache_length: int = 0
