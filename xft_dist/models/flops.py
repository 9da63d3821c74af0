"""Model FLOPs per token and MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): a multiply-add is 2 FLOPs; only matmuls count
(norms, softmax, activations and embedding lookups are left out); training is 3x the forward
(backward = 2x forward); attention scores and the weighted sum count over the full ``n x m``
(not halved for causal masks); recomputation by activation checkpointing is not counted (MFU
measures model FLOPs, not hardware FLOPs). The output head counts; the token embedding lookup does
not. With these rules a decoder LM is ``6 N + 12 L n d_attn`` per token.
"""

from __future__ import annotations

from .layers import AttentionLayers
from .wrappers import TransformerWrapper

# Dense bf16 tensor-core peaks (FLOP/s), for MFU. Pass your own for other hardware.
PEAK_FLOPS = {
    "H100-SXM": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def layers_forward_flops(layers: AttentionLayers, seq_len: int, context_len: int | None = None) -> float:
    """Forward FLOPs per (query) token of an ``AttentionLayers`` stack at sequence length ``seq_len``."""
    d, h, g, dh = layers.dim, layers.heads, layers.kv_heads, layers.dim_head
    attn_inner, kv_inner = h * dh, g * dh
    per_layer = 2 * d * attn_inner + 2 * 2 * d * kv_inner + 2 * attn_inner * d   # q, k, v, out
    per_layer += 2 * 2 * seq_len * attn_inner                                      # scores, values
    if layers.cross_attend:
        m = context_len if context_len is not None else seq_len
        per_layer += 2 * d * attn_inner + 2 * attn_inner * d                       # q, out
        per_layer += 2 * 2 * layers.dim_context * attn_inner * m / seq_len        # k, v of the context, per query token
        per_layer += 2 * 2 * m * attn_inner                                        # scores, values
    per_layer += (3 if layers.ff_glu else 2) * 2 * d * layers.ff_inner             # up (+ gate), down
    return float(layers.depth * per_layer)


def model_flops_per_token(model: TransformerWrapper, seq_len: int, *, context_len: int | None = None,
                          training: bool = True) -> float:
    """FLOPs per token of a ``TransformerWrapper`` (full model, all TP ranks together)."""
    flops = layers_forward_flops(model.attn_layers, seq_len, context_len)
    if model.project_emb is not None:
        flops += 2 * model.emb_dim * model.attn_layers.dim
    if model.head is not None:
        flops += 2 * model.attn_layers.dim * model.num_tokens
    return 3 * flops if training else flops


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (all devices)."""
    return tokens_per_second * flops_per_token / peak_flops


def estimate_parameters(*, vocab: int, dim: int, depth: int, heads: int, dim_head: int, kv_heads: int,
                        ff_mult: float, ff_glu: bool, tie_embedding: bool = True, enc_depth: int = 0,
                        enc_dim: int | None = None) -> int:
    """Parameter count from the shape alone (no weights built): for disk and memory estimates."""
    def stack(d: int, n_layers: int, cross_dim: int | None) -> int:
        inner = int(d * ff_mult)
        attn = 2 * d * heads * dim_head + 2 * d * kv_heads * dim_head
        cross = (2 * d * heads * dim_head + 2 * cross_dim * heads * dim_head + 2 * d) if cross_dim else 0
        ff = (3 if ff_glu else 2) * d * inner + (2 if ff_glu else 1) * inner + d
        return n_layers * (attn + cross + ff + 4 * d) + 2 * d

    total = vocab * dim * (1 if tie_embedding else 2)
    if enc_depth:
        e = enc_dim or dim
        total += stack(e, enc_depth, None) + (dim * e if e != dim else 0)
        return total + stack(dim, depth, e)
    return total + stack(dim, depth, None)
