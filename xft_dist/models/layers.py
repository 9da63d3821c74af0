"""The layer stack: pre-norm blocks of self-attention, optional cross-attention and feed-forward.

``Encoder`` and ``Decoder`` are ``AttentionLayers`` with ``causal`` fixed. The stack maps embeddings
to embeddings (``[b, n, dim] -> [b, n, dim]``), so it runs directly on precomputed embeddings.
Argument names follow x-transformers where it has them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..data.batch import DocLayout
from ..nn import Attention, FeedForward, RotaryEmbedding, checkpoint, document_positions, make_norm
from ..nn.attention import KVCache
from ..nn.init import InitScheme
from ..parallel import ParallelGroups, RNGStreams, gather_from_tp, group_size, scatter_to_tp
from .cache import BlockCache, LayerIntermediates
from .xt_options import LAYERS as XT_LAYERS


class Block(nn.Module):
    """Pre-norm self-attention, optional cross-attention and feed-forward, built for its layout:
    ``sequence_parallel`` (``x`` is this rank's sequence chunk) and ``recompute_core`` (selective
    activation checkpointing of the attention cores) are fixed here, not passed per call."""

    def __init__(self, dim, *, heads, dim_head, kv_heads, causal, cross_attend, dim_context,
                 attn_dropout, ff_mult, ff_glu, ff_swish, ff_dropout, use_rmsnorm, attn_backend,
                 group, rng, init, num_layers, norm_bias=True, norm_eps=1e-5, ff_bias=True, sequence_parallel=False,
                 recompute_core=False):
        super().__init__()
        attn_kw = dict(heads=heads, dim_head=dim_head, dropout=attn_dropout, group=group, rng=rng,
                       backend=attn_backend, init=init, num_layers=num_layers, sequence_parallel=sequence_parallel,
                       recompute_core=recompute_core)
        norm = dict(rmsnorm=use_rmsnorm, bias=norm_bias, eps=norm_eps, group=group, sequence_parallel=sequence_parallel)
        self.attn_norm = make_norm(dim, **norm)
        self.attn = Attention(dim, kv_heads=kv_heads, causal=causal, **attn_kw)
        if cross_attend:
            self.cross_norm = make_norm(dim, **norm)
            self.cross_attn = Attention(dim, dim_context=dim_context or dim, **attn_kw)
        else:
            self.cross_norm = self.cross_attn = None
        self.ff_norm = make_norm(dim, **norm)
        self.ff = FeedForward(dim, mult=ff_mult, glu=ff_glu, swish=ff_swish, dropout=ff_dropout, bias=ff_bias,
                              group=group, rng=rng, init=init, num_layers=num_layers,
                              sequence_parallel=sequence_parallel)

    def forward(self, x, *, mask=None, context=None, context_mask=None, doc_ids=None, rotary=None, doc_layout=None,
                context_rotary=None, cache: BlockCache | None = None):
        x = x + self.attn(self.attn_norm(x), mask=mask, doc_ids=doc_ids, rotary=rotary, doc_layout=doc_layout,
                          cache=cache.self_attn if cache is not None else None)
        if self.cross_attn is not None:
            cross_cache = cache.cross_attn if cache is not None else None
            if context is None and (cross_cache is None or cross_cache.k is None):
                raise ValueError("this stack was built with cross_attend=True: pass context=[b, m, dim_context]")
            x = x + self.cross_attn(self.cross_norm(x), context=context, context_mask=context_mask, rotary=rotary,
                                    context_rotary=context_rotary, cache=cross_cache)
        return x + self.ff(self.ff_norm(x))


class AttentionLayers(nn.Module):
    """``depth`` pre-norm blocks and a final norm, tensor-parallel over ``groups.tp_group``.

    ``activation_checkpointing``: 0 off, 1 (or ``"full"``) every layer, k every k-th layer (layers 0,
    k, 2k, ...), ``"selective"`` only the attention cores (scores, softmax, dropout, weighted values:
    the activations that grow with n^2 / heads), in every layer, where a dense mask (key padding)
    gives them such state; the causal and packed (varlen) kernels keep none and are not recomputed.
    ``sequence_parallel``: at TP > 1, activations between the TP regions (residual stream, norms) are
    split along the sequence over the TP ranks (Megatron's sequence parallelism): the stack takes
    and returns full ``[b, n, dim]``, splits on entry and all-gathers on exit. Calls whose length
    does not divide by TP, and cached decoding, run without it (same results).
    ``rng`` (from ``xft_dist.parallel.seed_all``) is required for dropout at TP > 1.
    ``ff_no_bias=True`` (x-transformers' name): feed-forward projections without biases.
    ``norm_bias=False``: LayerNorms without a bias (x-transformers' LayerNorm); ``norm_eps``: the
    norms' epsilon (x-transformers' RMSNorm has none, i.e. 0).
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
        norm_bias: bool = True,
        ff_no_bias: bool = False,
        norm_eps: float = 1e-5,
        rotary_pos_emb: bool = True,
        rotary_emb_dim: int | None = None,
        rotary_theta: float = 10000.0,
        attn_backend: str = "auto",
        activation_checkpointing: int | str = 0,
        sequence_parallel: bool = False,
        init: str | InitScheme | None = None,
        groups: ParallelGroups | None = None,
        rng: RNGStreams | None = None,
        attn_flash: bool = True,
        **unsupported,
    ):
        super().__init__()
        reject_unsupported(type(self).__name__, unsupported, XT_LAYERS)
        # attn_flash (x-transformers): fused kernels are always on here (SDPA / varlen / flash-attn);
        # False keeps them too (the results are the same up to rounding).
        del attn_flash
        if depth < 1:
            raise ValueError(f"depth={depth}: expected at least one layer")
        activation_checkpointing = checkpoint_every(activation_checkpointing)
        self.groups = groups or ParallelGroups.single()
        self.rng = rng
        self.dim, self.depth, self.heads, self.causal = dim, depth, heads, causal
        self.dim_head, self.kv_heads = attn_dim_head, attn_kv_heads or heads
        self.cross_attend = cross_attend
        self.dim_context = cross_attn_dim_context or dim
        self.ff_inner, self.ff_glu = int(dim * ff_mult), ff_glu
        self.activation_checkpointing = activation_checkpointing
        self.sequence_parallel = bool(sequence_parallel)
        sp = self.sequence_parallel and group_size(self.groups.tp_group) > 1  # what the blocks are built for
        self.init = InitScheme.of(init)
        self.rotary = RotaryEmbedding(rotary_emb_dim or attn_dim_head, theta=rotary_theta) if rotary_pos_emb else None
        self.layers = nn.ModuleList(
            Block(dim, heads=heads, dim_head=attn_dim_head, kv_heads=attn_kv_heads, causal=causal,
                  cross_attend=cross_attend, dim_context=cross_attn_dim_context, attn_dropout=attn_dropout,
                  ff_mult=ff_mult, ff_glu=ff_glu, ff_swish=ff_swish, ff_dropout=ff_dropout,
                  use_rmsnorm=use_rmsnorm, attn_backend=attn_backend, group=self.groups.tp_group, rng=rng,
                  init=self.init, num_layers=depth, norm_bias=norm_bias, norm_eps=norm_eps, ff_bias=not ff_no_bias,
                  sequence_parallel=sp,
                  recompute_core=activation_checkpointing == "selective")
            for _ in range(depth)
        )
        self.final_norm = make_norm(dim, rmsnorm=use_rmsnorm, bias=norm_bias, eps=norm_eps, group=self.groups.tp_group,
                                    sequence_parallel=sp)
        self._split_built = sp
        # every module built for the split sequence: run unsplit (cached decoding, a length TP does not
        # divide) inside ``_unsplit`` only
        self._split_modules = [m for m in self.modules() if getattr(m, "sequence_parallel", False) and m is not self]

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
        pos: torch.Tensor | None = None,
        context_pos: torch.Tensor | None = None,
        cache: LayerIntermediates | None = None,
        return_hiddens: bool = False,
        input_not_include_cache: bool = False,
        **unsupported,
    ):
        """``x [b, n, dim]`` -> ``[b, n, dim]``. ``mask [b, n]`` True for real tokens; ``doc_ids``
        keeps packed documents apart and restarts their positions; ``context`` for cross-attention.
        ``positions`` (or x-transformers' name ``pos``) ``[b, n]`` or ``[n]``: rotary positions;
        ``context_pos [b, m]`` or ``[m]``: rotary positions of the context, which turns rotary on in
        cross-attention.

        Packed documents without a ``mask`` take the varlen path: their ``DocLayout`` (given, or built
        here from ``doc_ids``) is made once and shared by every layer; no ``n x n`` mask exists.

        ``return_hiddens=True`` returns ``(out, LayerIntermediates)`` with each block's input and
        the key/value caches; ``cache=`` (such an intermediates object) continues from them: ``x``
        and ``mask`` then cover the whole sequence so far, only the positions after
        ``cache.cache_length`` are computed, and ``out`` holds those. ``x`` may instead hold only the new
        positions (x-transformers' way: ``input_not_include_cache=True``, or ``x`` no longer than the
        cache); their rotary positions then continue from ``cache.cache_length``."""
        reject_unsupported(type(self).__name__ + ".forward", unsupported, {"cache_age": 1, "seq_start_pos": None})
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected embeddings [b, n, {self.dim}], got {tuple(x.shape)}")
        if pos is not None:
            if positions is not None:
                raise ValueError("pass positions= or pos=, not both")
            positions = pos
        caching = cache is not None or return_hiddens
        start = cache.cache_length if cache is not None else 0
        if caching and doc_ids is not None:
            raise ValueError("cache= / return_hiddens=True take one sequence per row: no doc_ids")
        new_only = cache is not None and (input_not_include_cache or x.shape[1] <= start)
        kw = self.layer_inputs(x.shape[0], x.shape[1], x.device, mask=mask, context=context, context_mask=context_mask,
                               doc_ids=doc_ids, positions=positions, doc_layout=doc_layout, context_pos=context_pos,
                               start=start, caching=caching, new_only=new_only)
        if not caching:
            x = self.enter(x, kw)
            for i in range(self.depth):
                x = self.run_layer(i, x, kw)
            return self.finish(x, kw)
        return self._cached(x if new_only else x[:, start:], kw, cache, start)

    def _cached(self, x: torch.Tensor, kw: dict, cache: LayerIntermediates | None, start: int):
        """``(out, intermediates)`` of the new positions ``x``, through the key/value caches of
        ``cache`` (a fresh one when None), which then hold ``start + n`` positions."""
        inter = cache or LayerIntermediates(attn_cache=[
            BlockCache(cross_attn=KVCache() if layer.cross_attn is not None else None) for layer in self.layers])
        kw = {k: v for k, v in kw.items() if k not in ("doc_ids", "doc_layout", "split")}
        hiddens = []
        for i, layer in enumerate(self.layers):
            hiddens.append(x)
            x = self._block(layer, x, unsplit=self._split_built, cache=inter.attn_cache[i], **kw)
        out = self._block(self.final_norm, x, unsplit=self._split_built)
        inter.hiddens, inter.last_hidden = [*hiddens, x], out
        inter.cache_length = start + x.shape[1]
        return out, inter

    def layer_inputs(self, b: int, n: int, device, *, mask=None, context=None, context_mask=None, doc_ids=None,
                     positions=None, doc_layout=None, context_pos=None, start: int = 0, caching: bool = False,
                     new_only: bool = False) -> dict:
        """What every block of a call takes besides ``x`` (rotary tables, document layout, context),
        made once per call (and once per micro-batch by a pipeline stage), and whether the call runs
        sequence-parallel (``"split"``)."""
        rotary = context_rotary = None
        if self.rotary is not None:
            if positions is None:
                positions = (document_positions(doc_ids) if doc_ids is not None
                             else torch.arange(start if new_only else 0, start + n if new_only else n,
                                               device=device).expand(b, -1))
            rotary = self.rotary(_rows(positions, b)[:, 0 if new_only else start:])
            if context_pos is not None:
                context_rotary = self.rotary(_rows(context_pos, b))
        if doc_layout is None and doc_ids is not None and not caching:
            doc_ids, mask, doc_layout = self._documents(doc_ids, mask)
        split = self._split_built and not caching and n % group_size(self.groups.tp_group) == 0
        return dict(mask=mask, context=context, context_mask=context_mask, doc_ids=doc_ids, rotary=rotary,
                    doc_layout=doc_layout, context_rotary=context_rotary, split=split)

    def enter(self, x: torch.Tensor, kw: dict) -> torch.Tensor:
        """The stack's input as its blocks take it: this rank's sequence chunk when split."""
        return scatter_to_tp(x, self.groups.tp_group, dim=1) if kw["split"] else x

    def run_layer(self, i: int, x: torch.Tensor, kw: dict) -> torch.Tensor:
        """Block ``i`` on ``x`` (as ``enter`` gave it), recomputed in the backward where
        ``activation_checkpointing`` says so."""
        kw = dict(kw)
        split = kw.pop("split")
        run = self._block if split == self._split_built else functools.partial(self._block, unsplit=True)
        k = self.activation_checkpointing
        if k != "selective" and k and i % k == 0 and torch.is_grad_enabled():
            return checkpoint(run, self.layers[i], x, rng=self.rng, **kw)  # the recompute runs as the forward did
        return run(self.layers[i], x, **kw)

    def finish(self, x: torch.Tensor, kw: dict) -> torch.Tensor:
        """The final norm, and the whole sequence again when split."""
        if kw["split"]:
            return gather_from_tp(self.final_norm(x), self.groups.tp_group, dim=1)
        return self._block(self.final_norm, x, unsplit=self._split_built)

    def _documents(self, doc_ids: torch.Tensor, mask: torch.Tensor | None):
        """``(doc_ids, mask, layout)`` for the layers: the varlen layout of packed documents, a
        key-padding mask folded into them as documents of its own where that is exact (the
        dense-mask backend, and compiled code, keep the mask)."""
        if mask is not None and self.layers[0].attn.backend != "sdpa" and not torch.compiler.is_compiling():
            merged = padding_as_documents(doc_ids, mask)
            if merged is not None:  # packed rows with padding stay on the varlen path
                doc_ids, mask = merged, None
        return doc_ids, mask, DocLayout.from_doc_ids(doc_ids) if mask is None else None

    def _block(self, module: nn.Module, x: torch.Tensor, *, unsplit: bool = False, **kwargs) -> torch.Tensor:
        """``module(x, **kwargs)``; ``unsplit``: with the stack's sequence-parallel modules running on
        the whole sequence for this call (they are built for the split one)."""
        if not unsplit:
            return module(x, **kwargs)
        for m in self._split_modules:
            m.sequence_parallel = False
        try:
            return module(x, **kwargs)
        finally:
            for m in self._split_modules:
                m.sequence_parallel = True


def checkpoint_every(value: int | str | bool) -> int | str:
    """``activation_checkpointing`` as the stack uses it: 0 off, k every k-th layer, "selective"."""
    if value is True or value == "full":
        return 1
    if value is False or value is None:
        return 0
    if value == "selective":
        return value
    if isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"activation_checkpointing={value!r}: expected 0 (off), 1 or 'full' (every layer), "
                     "k (every k-th layer) or 'selective' (attention cores only)")


def padding_as_documents(doc_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Document ids under which a key-padding ``mask`` is documents of its own: ``3 d + 1`` for the
    real tokens of document ``d``, ``3 d`` for padding before them, ``3 d + 2`` after. Attention
    within documents then sees, for every real query, exactly the keys the mask and ``doc_ids``
    allowed, provided no document resumes after padding (right- or left-padded rows, padding between
    documents); None where one does (the dense mask is exact there). Padded queries see only
    padding: their outputs differ, and nothing learns from them. One host sync, next to the
    layout's own."""
    real = mask.bool()
    count = real.long().cumsum(dim=1)  # real tokens up to here, in the row
    starts = torch.ones_like(real)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    before_doc = torch.where(starts, count - real.long(), torch.zeros_like(count)).cummax(dim=1).values
    # a real token right after padding of its own document, with real tokens of that document before
    resumes = real[:, 1:] & ~real[:, :-1] & ~starts[:, 1:] & (count[:, :-1] - before_doc[:, 1:] > 0)
    if bool(resumes.any()):
        return None
    seen = count - before_doc  # real tokens of this document up to here
    part = torch.where(real, 1, torch.where(seen == 0, 0, 2))  # padding before, the tokens, padding after
    return doc_ids * 3 + part


def _rows(positions: torch.Tensor, b: int) -> torch.Tensor:
    return positions.expand(b, -1) if positions.ndim == 1 else positions


def reject_unsupported(where: str, kwargs: dict, off: dict | None = None) -> None:
    """x-transformers arguments this package does not implement fail loudly, never silently; those
    in ``off`` (``models.xt_options``) pass when given at their off value, which changes nothing."""
    off = off or {}
    bad = {k: v for k, v in kwargs.items() if not (k in off and _same(v, off[k]))}
    if bad:
        names = ", ".join(f"{k}={v!r} (supported only at {off[k]!r})" if k in off else k
                          for k, v in sorted(bad.items()))
        raise TypeError(f"{where}: argument(s) {names} not supported by xft_dist "
                        "(see docs/xtransformers.md for what is)")


def _same(value, off) -> bool:
    return value is off or (type(value) in (bool, int, float, str) and type(off) in (bool, int, float, str)
                            and value == off and isinstance(value, bool) == isinstance(off, bool))


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
