"""Multi-head attention with heads split over TP ranks, GQA, cross-attention from a context of any
width, and masks for causality, key padding and packed documents, over fused kernels.

Legend: b batch, n query length, m key length, h query heads (this rank), g kv heads (this rank),
d head dim.

Backends: ``"sdpa"`` is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-
efficient / cuDNN on GPU, the CPU flash kernel here); ``"flash_varlen"`` is flash-attn's varlen
kernel over packed documents (CUDA, fp16/bf16, flash-attn installed); ``"auto"`` takes varlen when
it applies and SDPA otherwise.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.distributed import ProcessGroup

from ..parallel import RNGStreams, group_size
from .init import InitScheme
from .linear import ColumnParallelLinear, RowParallelLinear
from .mlp import fork, split_region_rng
from .position import apply_rotary, document_starts

BACKENDS = ("auto", "sdpa", "flash_varlen")
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


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


def _cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of the documents of ``doc_ids [b, n]`` flattened row-major (rows never merge)."""
    b, n = doc_ids.shape
    start_idx = torch.nonzero(document_starts(doc_ids).flatten(), as_tuple=False).flatten()
    cu = torch.cat([start_idx, start_idx.new_tensor([b * n])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


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
    ):
        super().__init__()
        tp = group_size(group)
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        if heads % tp or kv_heads % tp:
            raise ValueError(f"heads={heads} and kv_heads={kv_heads} must both be divisible by the "
                             f"tensor-parallel size {tp}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        self.heads, self.kv_heads, self.dim_head = heads // tp, kv_heads // tp, dim_head
        self.causal, self.dropout, self.backend = causal, dropout, backend
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
                                        init_method=init.output(inner, dim=dim, num_layers=num_layers))
        self.rng = split_region_rng(rng, group, dropout, "Attention")

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x [b, n, dim]`` -> ``[b, n, dim]``. Self-attention masks keys with ``mask [b, n]``
        and documents with ``doc_ids``; cross-attention reads ``context [b, m, dim_context]`` with
        ``context_mask [b, m]``. ``rotary`` (cos, sin) applies to self-attention queries and keys."""
        cross = context is not None
        kv_in = context if cross else x
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_k(kv_in), "b m (g d) -> b g m d", g=self.kv_heads)
        v = rearrange(self.to_v(kv_in), "b m (g d) -> b g m d", g=self.kv_heads)
        if rotary is not None and not cross:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        causal = self.causal and not cross
        key_mask = context_mask if cross else mask
        dropout_p = self.dropout if self.training else 0.0
        with fork(self.rng if dropout_p > 0 else None):  # heads are split: TP-distinct masks
            if self._use_varlen(q, cross, key_mask, doc_ids):
                out = self._flash_varlen(q, k, v, doc_ids, causal, dropout_p)
            else:
                out = self._sdpa(q, k, v, causal, key_mask, None if cross else doc_ids, dropout_p)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _use_varlen(self, q, cross, key_mask, doc_ids) -> bool:
        if self.backend == "sdpa" or cross or doc_ids is None or key_mask is not None:
            return False
        ok = _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if self.backend == "flash_varlen" and not ok:
            raise RuntimeError("backend='flash_varlen' needs flash-attn installed, CUDA tensors and "
                               f"fp16/bf16 (got {q.device}, {q.dtype}, flash-attn installed: {_HAS_FLASH_ATTN})")
        return ok

    def _sdpa(self, q, k, v, causal, key_mask, doc_ids, dropout_p):
        n, m = q.shape[-2], k.shape[-2]
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask = attention_mask(n=n, m=m, causal=causal, key_mask=key_mask, doc_ids=doc_ids, device=q.device)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        # A row with no visible key would softmax over nothing (NaN). Let the kernel see every key
        # there, then zero that row: nothing leaks into it, and no gradient flows out of it.
        empty = ~mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout_p)
        return out.masked_fill(empty, 0.0)

    def _flash_varlen(self, q, k, v, doc_ids, causal, dropout_p):
        from flash_attn import flash_attn_varlen_func  # CUDA-only; imported when used

        b, _, n, _ = q.shape
        cu, max_len = _cu_seqlens(doc_ids)
        flat = lambda t: rearrange(t, "b h n d -> (b n) h d")  # noqa: E731
        out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, max_len, max_len,
                                     dropout_p=dropout_p, causal=causal)
        return rearrange(out, "(b n) h d -> b h n d", b=b)

