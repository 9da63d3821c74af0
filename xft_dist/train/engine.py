"""Model from the config, and ``deepspeed.initialize`` with the tensor-parallel mpu."""

from __future__ import annotations

from ..config import Config, deepspeed_config
from ..dist import ParallelGroups, RNGStreams
from ..models import Decoder, EncoderDecoder, TransformerWrapper
from ..models.flops import layers_forward_flops, model_flops_per_token


def build_model(cfg: Config, groups: ParallelGroups, rng: RNGStreams, *, num_tokens: int, pad_id: int):
    m = cfg.model
    layer_kw = dict(attn_dim_head=m.head_dim, attn_kv_heads=m.kv_heads, ff_mult=m.ff_mult, ff_glu=m.ff_glu,
                    ff_swish=m.ff_swish, use_rmsnorm=m.use_rmsnorm, rotary_pos_emb=m.rotary_pos_emb,
                    attn_dropout=m.attn_dropout, ff_dropout=m.ff_dropout,
                    activation_checkpointing=m.activation_checkpointing)
    if m.kind == "decoder":
        return TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=cfg.data.seq_len, tie_embedding=m.tie_embedding,
            pad_to_multiple_of=m.pad_vocab_to_multiple_of,
            attn_layers=Decoder(m.dim, m.depth, m.heads, groups=groups, rng=rng, **layer_kw))
    return EncoderDecoder(num_tokens=num_tokens, dim=m.dim, enc_dim=m.enc_dim, enc_depth=m.enc_depth,
                          dec_depth=m.depth, heads=m.heads, enc_max_seq_len=cfg.data.enc_len,
                          dec_max_seq_len=cfg.data.seq_len + 1, pad_value=pad_id,
                          pad_to_multiple_of=m.pad_vocab_to_multiple_of, groups=groups, rng=rng, **layer_kw)


def flops_per_token(cfg: Config, model) -> float:
    """Training FLOPs per (decoder) token of the whole model (see models/flops.py)."""
    if cfg.model.kind == "decoder":
        return model_flops_per_token(model, cfg.data.seq_len)
    enc, dec = model.encoder.attn_layers, model.decoder.net
    ratio = cfg.data.enc_len / (cfg.data.seq_len + 1)
    enc_flops = layers_forward_flops(enc, cfg.data.enc_len) * ratio
    return model_flops_per_token(dec, cfg.data.seq_len + 1, context_len=cfg.data.enc_len) + 3 * enc_flops


def initialize(cfg: Config, model, groups: ParallelGroups):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, groups.dp_size), mpu=groups.mpu())
    return engine
