"""The layer stack: pre-norm blocks of self-attention, optional cross-attention and feed-forward.

``Encoder`` and ``Decoder`` are ``AttentionLayers`` with ``causal`` fixed. The stack maps embeddings
to embeddings (``[b, n, dim] -> [b, n, dim]``), so it runs directly on precomputed embeddings.
Argument names follow x-transformers where it has them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import Attention, FeedForward, RotaryEmbedding, checkpoint, document_positions, make_norm
from ..nn.attention import DocLayout
from ..nn.init import InitScheme
from ..parallel import ParallelGroups, RNGStreams


class Block(nn.Module):
    def __init__(self, dim, *, heads, dim_head, kv_heads, causal, cross_attend, dim_context,
                 attn_dropout, ff_mult, ff_glu, ff_swish, ff_dropout, use_rmsnorm, attn_backend,
                 group, rng, init, num_layers):
        super().__init__()
        attn_kw = dict(heads=heads, dim_head=dim_head, dropout=attn_dropout, group=group, rng=rng,
                       backend=attn_backend, init=init, num_layers=num_layers)
        self.attn_norm = make_norm(dim, rmsnorm=use_rmsnorm)
        self.attn = Attention(dim, kv_heads=kv_heads, causal=causal, **attn_kw)
        if cross_attend:
            self.cross_norm = make_norm(dim, rmsnorm=use_rmsnorm)
            self.cross_attn = Attention(dim, dim_context=dim_context, **attn_kw)
        else:
            self.cross_norm = self.cross_attn = None
        self.ff_norm = make_norm(dim, rmsnorm=use_rmsnorm)
        self.ff = FeedForward(dim, mult=ff_mult, glu=ff_glu, swish=ff_swish, dropout=ff_dropout,
                              group=group, rng=rng, init=init, num_layers=num_layers)

    def forward(self, x, mask=None, context=None, context_mask=None, doc_ids=None, rotary=None, doc_layout=None):
        x = x + self.attn(self.attn_norm(x), mask=mask, doc_ids=doc_ids, rotary=rotary, doc_layout=doc_layout)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this stack was built with cross_attend=True: pass context=[b, m, dim_context]")
            x = x + self.cross_attn(self.cross_norm(x), context=context, context_mask=context_mask)
        return x + self.ff(self.ff_norm(x))


class AttentionLayers(nn.Module):
    """``depth`` pre-norm blocks and a final norm, tensor-parallel over ``groups.tp_group``.

    ``activation_checkpointing``: 0 off, 1 every layer, k every k-th layer (layers 0, k, 2k, ...).
    ``rng`` (from ``xft_dist.parallel.seed_all``) is required for dropout at TP > 1.
    ``init``: a scheme name (``normal``, ``small_init``, ``xtransformers``) or an ``InitScheme``
    (see ``xft_dist.nn.init``); the wrapper around the stack uses it for embeddings and head too.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        *,
        causal: bool = False,
        cross_attend: bool = False,
        cross_attn_dim_context: int | None = None,
        attn_dim_head: int = 64,
        attn_kv_heads: int | None = None,
        attn_dropout: float = 0.0,
        ff_mult: float = 4,
        ff_glu: bool = False,
        ff_swish: bool = False,
        ff_dropout: float = 0.0,
        use_rmsnorm: bool = False,
        rotary_pos_emb: bool = True,
        rotary_emb_dim: int | None = None,
        rotary_theta: float = 10000.0,
        attn_backend: str = "auto",
        activation_checkpointing: int = 0,
        init: str | InitScheme | None = None,
        groups: ParallelGroups | None = None,
        rng: RNGStreams | None = None,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: expected at least one layer")
        if activation_checkpointing < 0:
            raise ValueError(f"activation_checkpointing={activation_checkpointing}: expected 0 (off), "
                             "1 (every layer) or k (every k-th layer)")
        self.groups = groups or ParallelGroups.single()
        self.rng = rng
        self.dim, self.depth, self.heads, self.causal = dim, depth, heads, causal
        self.dim_head, self.kv_heads = attn_dim_head, attn_kv_heads or heads
        self.cross_attend = cross_attend
        self.dim_context = cross_attn_dim_context or dim
        self.ff_inner, self.ff_glu = int(dim * ff_mult), ff_glu
        self.activation_checkpointing = activation_checkpointing
        self.init = InitScheme.of(init)
        self.rotary = RotaryEmbedding(rotary_emb_dim or attn_dim_head, theta=rotary_theta) if rotary_pos_emb else None
        self.layers = nn.ModuleList(
            Block(dim, heads=heads, dim_head=attn_dim_head, kv_heads=attn_kv_heads, causal=causal,
                  cross_attend=cross_attend, dim_context=cross_attn_dim_context, attn_dropout=attn_dropout,
                  ff_mult=ff_mult, ff_glu=ff_glu, ff_swish=ff_swish, ff_dropout=ff_dropout,
                  use_rmsnorm=use_rmsnorm, attn_backend=attn_backend, group=self.groups.tp_group, rng=rng,
                  init=self.init, num_layers=depth)
            for _ in range(depth)
        )
        self.final_norm = make_norm(dim, rmsnorm=use_rmsnorm)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_layout: DocLayout | None = None,
    ) -> torch.Tensor:
        """``x [b, n, dim]`` -> ``[b, n, dim]``. ``mask [b, n]`` True for real tokens; ``doc_ids``
        keeps packed documents apart and restarts their positions; ``context`` for cross-attention.

        Packed documents without a ``mask`` take the varlen path: their ``DocLayout`` (given, or built
        here from ``doc_ids``) is made once and shared by every layer; no ``n x n`` mask exists."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected embeddings [b, n, {self.dim}], got {tuple(x.shape)}")
        rotary = None
        if self.rotary is not None:
            if positions is None:
                positions = (document_positions(doc_ids) if doc_ids is not None
                             else torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1))
            rotary = self.rotary(positions)
        if doc_layout is None and doc_ids is not None and mask is None:
            doc_layout = DocLayout.from_doc_ids(doc_ids)
        k = self.activation_checkpointing
        for i, layer in enumerate(self.layers):
            args = (x, mask, context, context_mask, doc_ids, rotary, doc_layout)
            if k and i % k == 0 and torch.is_grad_enabled():
                x = checkpoint(layer, *args, rng=self.rng)
            else:
                x = layer(*args)
        return self.final_norm(x)


class Encoder(AttentionLayers):
    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        if kwargs.pop("causal", False):
            raise ValueError("Encoder is not causal; use Decoder")
        super().__init__(dim, depth, heads, causal=False, **kwargs)


class Decoder(AttentionLayers):
    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        if not kwargs.pop("causal", True):
            raise ValueError("Decoder is causal; use Encoder")
        super().__init__(dim, depth, heads, causal=True, **kwargs)
