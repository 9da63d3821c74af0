"""Multi-head attention with heads split over TP ranks, GQA, cross-attention from a context of any
width, and masks for causality, key padding and packed documents, over fused kernels.

Legend: b batch, n query length, m key length, h query heads (this rank), g kv heads (this rank),
d head dim.

Backends: ``"sdpa"`` is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-
efficient / cuDNN on GPU, the CPU flash kernel here) with a dense mask where one is needed;
``"flash_varlen"`` insists on a varlen kernel for packed documents; ``"auto"`` takes the varlen
path whenever self-attention runs on packed documents without a key-padding mask (under
``torch.compile`` only where a varlen kernel runs: the CPU twin's per-document loop reads host
offsets, so compiled CPU code takes the dense document mask instead).

The varlen path never builds an ``n x n`` mask: the documents of the flattened batch are described
once per batch by a ``DocLayout`` (cumulative lengths, ``cu_seqlens``) that every layer shares. On
CUDA in fp16 / bf16 it runs ``torch.nn.attention.varlen.varlen_attn`` (flash-attn's
``flash_attn_varlen_func`` when installed, which also does dropout); elsewhere, one SDPA call per
document (causal where the stack is), which computes the same thing.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.distributed import ProcessGroup

from ..data.batch import DocLayout  # a torch-only leaf: the batch's document layout
from ..parallel import RNGStreams, copy_to_tp, group_size, tp_region_input
from .checkpoint import checkpoint
from .init import InitScheme
from .linear import ColumnParallelLinear, RowParallelLinear, fused_column
from .mlp import fork, split_region_rng
from .position import apply_rotary

BACKENDS = ("auto", "sdpa", "flash_varlen")
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _parameter_names(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _fast_varlen(q: torch.Tensor) -> bool:
    """A varlen kernel takes these queries (CUDA, fp16 / bf16): ``cu_seqlens`` on the device, no host loop."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_attn_args(names: frozenset[str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """``(k, v, kwargs)`` for torch's ``varlen_attn`` whose keyword names are ``names``: torch 2.13
    takes ``window_size`` and ``enable_gqa``; earlier releases ``is_causal`` and equal head counts
    (grouped keys and values are then repeated per query head, as ``enable_gqa`` would read them)."""
    kwargs: dict = {}
    if k.shape[-2] != q.shape[-2]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[-2] // k.shape[-2]
            k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    return k, v, kwargs


def attention_mask(
    *,
    n: int,
    m: int,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor | None:
    """Boolean ``[b or 1, 1, n, m]`` mask, True where a query may attend to a key; None when only
    ``causal`` (or nothing) applies, so kernels can take their unmasked / ``is_causal`` paths.

    ``key_mask [b, m]``: True for real keys. ``doc_ids [b, n]`` (self-attention): attend only
    within the same document. A query row may be left with no key at all (a fully padded row);
    ``Attention`` outputs zeros there.
    """
    if key_mask is None and doc_ids is None:
        return None
    allowed = torch.ones(1, 1, n, m, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(diagonal=m - n)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return allowed


@dataclass
class KVCache:
    """One attention's keys and values ``[b, kv_heads / tp, m, dim_head]`` (this rank's heads) for
    cached decoding: self-attention appends each call's keys; cross-attention fills it once."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        dim_context: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
        group: ProcessGroup | None = None,
        rng: RNGStreams | None = None,
        backend: str = "auto",
        init: InitScheme | str | None = None,
        num_layers: int = 1,
        sequence_parallel: bool = False,
        recompute_core: bool = False,
    ):
        """``sequence_parallel=True``: ``x`` is this rank's sequence chunk ``[b, n / tp, dim]`` (and
        so is the output); it is all-gathered on entry and the output reduce-scattered.
        ``recompute_core``: the attention core (scores, softmax, dropout, weighted values) is
        recomputed in the backward instead of keeping its activations (selective activation
        checkpointing) where it builds a dense mask; the causal and varlen kernels keep no n^2
        state, and are not recomputed."""
        super().__init__()
        tp = group_size(group)
        kv_heads = kv_heads or heads
        self.sequence_parallel, self.recompute_core = sequence_parallel, recompute_core
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        if heads % tp or kv_heads % tp:
            raise ValueError(f"heads={heads} and kv_heads={kv_heads} must both be divisible by the "
                             f"tensor-parallel size {tp}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        self.heads, self.kv_heads, self.dim_head = heads // tp, kv_heads // tp, dim_head
        self.causal, self.dropout, self.backend = causal, dropout, backend
        self.is_cross = dim_context is not None  # built for cross-attention (given a context width)
        dim_kv = dim_context or dim
        init = InitScheme.of(init)
        inner = heads * dim_head

        def col(fan_in, out):
            return ColumnParallelLinear(fan_in, out, bias=bias, group=group, init_method=init.matrix(fan_in, dim=dim),
                                        bias_init=init.bias(fan_in))

        self.to_q = col(dim, inner)
        self.to_k = col(dim_kv, kv_heads * dim_head)
        self.to_v = col(dim_kv, kv_heads * dim_head)
        # writes into the residual stream: the scheme's output init (depth-scaled where it is)
        self.to_out = RowParallelLinear(inner, dim, bias=bias, group=group, bias_init=init.bias(inner),
                                        init_method=init.output(inner, dim=dim, num_layers=num_layers),
                                        sequence_parallel=sequence_parallel)
        self.rng = split_region_rng(rng, group, dropout, "Attention")
        self.group = group

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        doc_layout: DocLayout | None = None,
        context_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``x [b, n, dim]`` -> ``[b, n, dim]``. Self-attention masks keys with ``mask [b, n]``
        and documents with ``doc_ids``; cross-attention reads ``context [b, m, dim_context]`` with
        ``context_mask [b, m]``. ``rotary`` (cos, sin) applies to self-attention queries and keys;
        in cross-attention, given with ``context_rotary``, to the queries and the context's keys.
        ``doc_layout`` (self-attention, no ``mask``): packed documents on the varlen path.

        ``cache``: cached decoding. Self-attention appends this call's keys and values to it and
        attends over all of them (``mask [b, cached + n]`` then covers every key; the ``n`` queries
        are the last positions); cross-attention fills it from ``context`` once and reuses it.

        The queries' input enters the TP region once for q, k and v (self-attention), and the context
        once for k and v (cross-attention): one backward all-reduce each."""
        if cache is not None:
            return self._cached(x, cache, context=context, mask=mask, context_mask=context_mask,
                                rotary=rotary, context_rotary=context_rotary, doc_ids=doc_ids)
        cross = context is not None
        q, k, v = self._project(x, context)
        if rotary is not None and not cross:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        elif cross and rotary is not None and context_rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, context_rotary)
        causal = self.causal and not cross
        key_mask = context_mask if cross else mask
        dropout_p = self.dropout if self.training else 0.0
        varlen = not cross and key_mask is None and (doc_layout is not None or doc_ids is not None)
        if varlen and doc_ids is not None and torch.compiler.is_compiling() and not _fast_varlen(q):
            varlen = False  # compiled, without a varlen kernel: the per-document loop would not trace
        if varlen and self.backend != "sdpa":
            layout = doc_layout or DocLayout.from_doc_ids(doc_ids)
            core = functools.partial(self._varlen_core, layout=layout, causal=causal, dropout_p=dropout_p)
            pattern = "(b n) h d -> b n (h d)"
        else:
            core = functools.partial(self._sdpa_core, causal=causal, key_mask=key_mask,
                                     doc_ids=None if cross else doc_ids, dropout_p=dropout_p)
            pattern = "b h n d -> b n (h d)"
        # Only a dense mask gives the core state that grows with n^2 (the mask and the masked kernel's
        # buffers, per layer); the causal / unmasked and varlen kernels keep O(n): nothing to recompute.
        dense = pattern.startswith("b h") and (key_mask is not None or (doc_ids is not None and not cross))
        if self.recompute_core and dense and torch.is_grad_enabled():
            out = checkpoint(core, q, k, v, rng=self.rng if dropout_p > 0 else None)
        else:
            out = core(q, k, v)
        out = rearrange(out, pattern, b=q.shape[0])
        return self.to_out(out)

    def _project(self, x, context):
        """``(q [b, h, n, d], k, v [b, g, m, d])``: one entry into the TP region and one GEMM for q,
        k and v (self-attention), or for the context's k and v (cross-attention)."""
        with tp_region_input(x, self.group, self.sequence_parallel) as x:
            if context is not None:
                q = self.to_q(x, tp_input=True)
            else:
                q, k, v = fused_column(x, [self.to_q, self.to_k, self.to_v])
        if context is not None:  # the context (another stack's output, never sequence-split) enters once
            k, v = fused_column(copy_to_tp(context, self.group), [self.to_k, self.to_v])
        return (rearrange(q, "b n (h d) -> b h n d", h=self.heads),
                rearrange(k, "b m (g d) -> b g m d", g=self.kv_heads),
                rearrange(v, "b m (g d) -> b g m d", g=self.kv_heads))

    def _varlen_core(self, q, k, v, *, layout, causal, dropout_p):
        with fork(self.rng if dropout_p > 0 else None):  # heads are split: TP-distinct masks
            return self._varlen(q, k, v, layout, causal, dropout_p)

    def _sdpa_core(self, q, k, v, *, causal, key_mask, doc_ids, dropout_p):
        with fork(self.rng if dropout_p > 0 else None):  # heads are split: TP-distinct masks
            return self._sdpa(q, k, v, causal, key_mask, doc_ids, dropout_p)

    def _cached(self, x, cache: KVCache, *, context, mask, context_mask, rotary, context_rotary, doc_ids):
        if doc_ids is not None:
            raise ValueError("cached decoding does not take doc_ids (one sequence per row)")
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        if self.is_cross:  # cross-attention: keys and values of the context, made once
            if cache.k is None:
                if context is None:
                    raise ValueError("cross-attention cache is empty: the first cached call needs context=")
                k = rearrange(self.to_k(context), "b m (g d) -> b g m d", g=self.kv_heads)
                v = rearrange(self.to_v(context), "b m (g d) -> b g m d", g=self.kv_heads)
                if rotary is not None and context_rotary is not None:
                    k = apply_rotary(k, context_rotary)
                cache.k, cache.v = k, v
            if rotary is not None and context_rotary is not None:
                q = apply_rotary(q, rotary)
            causal, key_mask = False, context_mask
        else:
            k = rearrange(self.to_k(x), "b n (g d) -> b g n d", g=self.kv_heads)
            v = rearrange(self.to_v(x), "b n (g d) -> b g n d", g=self.kv_heads)
            if rotary is not None:
                q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=-2), torch.cat([cache.v, v], dim=-2)
            cache.k, cache.v = k, v
            causal, key_mask = self.causal, mask
        b, m = x.shape[0], cache.k.shape[-2]
        if key_mask is None:  # an explicit mask: SDPA's is_causal aligns top-left when n != m
            key_mask = torch.ones(b, m, dtype=torch.bool, device=x.device)
        elif key_mask.shape != (b, m):
            raise ValueError(f"cached attention over {m} keys: mask must be [{b}, {m}], got {tuple(key_mask.shape)}")
        dropout_p = self.dropout if self.training else 0.0
        with fork(self.rng if dropout_p > 0 else None):  # heads are split: TP-distinct masks
            out = self._sdpa(q, cache.k, cache.v, causal, key_mask, None, dropout_p)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _varlen(self, q, k, v, layout: DocLayout, causal: bool, dropout_p: float) -> torch.Tensor:
        """Attention within each packed document: ``[b, h, n, d] -> [(b n), h, d]``."""
        if tuple(q.shape[:1] + q.shape[2:3]) != layout.shape:
            raise ValueError(f"doc layout of a {layout.shape} batch, queries {tuple(q.shape)}")
        flat = lambda t: rearrange(t, "b h n d -> (b n) h d")  # noqa: E731
        q, k, v = flat(q), flat(k), flat(v)
        cu, n = layout.cu_seqlens, layout.max_len
        fast = _fast_varlen(q)
        if fast and _HAS_FLASH_ATTN:
            from flash_attn import flash_attn_varlen_func  # CUDA-only; imported when used

            return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout_p, causal=causal)
        if fast and dropout_p == 0:
            from torch.nn.attention.varlen import varlen_attn

            k, v, kwargs = varlen_attn_args(_parameter_names(varlen_attn), q, k, v, causal)
            return varlen_attn(q, k, v, cu, cu, n, n, **kwargs)
        if self.backend == "flash_varlen":
            raise RuntimeError("backend='flash_varlen' needs CUDA tensors in fp16/bf16 (and flash-attn for "
                               f"dropout); got {q.device}, {q.dtype}, dropout {dropout_p}")
        return self._per_document(q, k, v, layout.host_bounds(), causal, dropout_p)

    def _per_document(self, q, k, v, bounds, causal, dropout_p):
        """The varlen path's CPU twin: one SDPA call per document, on ``[(b n), h, d]``."""
        gqa, outs = self.kv_heads != self.heads, []
        for start, end in zip(bounds[:-1], bounds[1:]):
            part = lambda t: t[start:end].transpose(0, 1).unsqueeze(0)  # noqa: E731 - [1, h, len, d]
            o = F.scaled_dot_product_attention(part(q), part(k), part(v), dropout_p=dropout_p, is_causal=causal,
                                               enable_gqa=gqa)
            outs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outs, dim=0)

    def _sdpa(self, q, k, v, causal, key_mask, doc_ids, dropout_p):
        n, m = q.shape[-2], k.shape[-2]
        gqa = self.kv_heads != self.heads  # the kernel reads each kv head for its group: no repeated copy
        mask = attention_mask(n=n, m=m, causal=causal, key_mask=key_mask, doc_ids=doc_ids, device=q.device)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa)
        # A row with no visible key would softmax over nothing (NaN). Let the kernel see every key
        # there, then zero that row: nothing leaks into it, and no gradient flows out of it.
        empty = ~mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout_p, enable_gqa=gqa)
        return out.masked_fill(empty, 0.0)
