"""The model a run config describes, and its FLOPs per token.

This is the model part of ``xft_dist.train.setup.build_run``; it lives here, below ``ckpt``, so that
checkpoint conversion builds exactly the model the trainer built without importing the trainer.
The decoder LM is an ``AutoregressiveWrapper``, the encoder-only masked LM a ``MaskedLMWrapper`` and
the encoder-decoder an ``EncoderDecoder``: each takes a loader batch and returns ``(loss_sum,
num_tokens)`` (see ``contract.py``).
"""

from __future__ import annotations

from ..config import Config
from ..nn.init import InitScheme
from ..parallel import ParallelGroups, RNGStreams
from .encdec import EncoderDecoder
from .flops import layers_forward_flops, model_flops_per_token
from .layers import Decoder, Encoder
from .mlm import MaskedLMWrapper
from .wrappers import AutoregressiveWrapper, TransformerWrapper


def build_model(cfg: Config, groups: ParallelGroups, rng: RNGStreams | None, *, num_tokens: int, pad_id: int):
    m, loss = cfg.model, cfg.loss
    layer_kw = dict(attn_dim_head=m.head_dim, attn_kv_heads=m.kv_heads, ff_mult=m.ff_mult, ff_glu=m.ff_glu,
                    ff_swish=m.ff_swish, use_rmsnorm=m.use_rmsnorm, norm_bias=m.norm_bias, norm_eps=m.norm_eps,
                    rotary_pos_emb=m.rotary_pos_emb, rotary_theta=m.rotary_theta, ff_no_bias=not m.ff_bias,
                    attn_dropout=m.attn_dropout, ff_dropout=m.ff_dropout,
                    activation_checkpointing=m.activation_checkpointing,
                    sequence_parallel=cfg.parallel.sequence_parallel)
    init = InitScheme(name=m.init, std=m.init_std, emb_std=m.emb_init_std, head_std=m.head_init_std)
    # The trainer's loader has checked every id against the vocabulary: no host syncs to re-check.
    loss_kw = dict(ignore_index=loss.ignore_index, label_smoothing=loss.label_smoothing, z_loss=loss.z_loss,
                   fused_loss=m.fused_loss, loss_chunk_tokens=m.loss_chunk_tokens, check_ids=False)
    if m.kind in ("decoder", "encoder"):
        stack = Decoder if m.kind == "decoder" else Encoder
        net = TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=cfg.data.seq_len, tie_embedding=m.tie_embedding,
            pad_to_multiple_of=m.pad_vocab_to_multiple_of,
            attn_layers=stack(m.dim, m.depth, m.heads, groups=groups, rng=rng, init=init, **layer_kw))
        wrapper = AutoregressiveWrapper if m.kind == "decoder" else MaskedLMWrapper
        return wrapper(net, pad_value=pad_id, **loss_kw)
    return EncoderDecoder(num_tokens=num_tokens, dim=m.dim, enc_dim=m.enc_dim, enc_depth=m.enc_depth,
                          dec_depth=m.depth, heads=m.heads, enc_max_seq_len=cfg.data.enc_len,
                          dec_max_seq_len=cfg.data.seq_len + 1, pad_value=pad_id,
                          pad_to_multiple_of=m.pad_vocab_to_multiple_of, groups=groups, rng=rng,
                          loss_kwargs=loss_kw, init=init, **layer_kw)


def flops_per_token(cfg: Config, model) -> float:
    """Training FLOPs per (decoder) token of the whole model built by ``build_model`` (see flops.py)."""
    if cfg.model.kind in ("decoder", "encoder"):  # the masked LM's head runs on the chosen tokens only
        flops = model_flops_per_token(model.net, cfg.data.seq_len)
        if cfg.model.kind == "encoder":
            flops -= 6 * model.net.attn_layers.dim * model.net.num_tokens * (1 - cfg.data.mlm_probability)
        return flops
    enc, dec = model.encoder.attn_layers, model.decoder.net
    ratio = cfg.data.enc_len / (cfg.data.seq_len + 1)
    enc_flops = layers_forward_flops(enc, cfg.data.enc_len) * ratio
    return model_flops_per_token(dec, cfg.data.seq_len + 1, context_len=cfg.data.enc_len) + 3 * enc_flops
