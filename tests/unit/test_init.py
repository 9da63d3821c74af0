"""Initialisation schemes: every tensor's spread matches its formula (std within 5 %), overrides for
the embedding and the head, cross-attention outputs scaled like the others, bad names and stds refused."""

from __future__ import annotations

import math

import pytest
import torch

from xft_dist import Decoder, EncoderDecoder, TransformerWrapper
from xft_dist.config import ConfigError
from xft_dist.config.load import validate
from xft_dist.nn.init import InitScheme

D, DEPTH, HEADS, DH, VOCAB, FF = 256, 3, 4, 64, 4096, 4


def _model(init):
    torch.manual_seed(0)
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(
        dim=D, depth=DEPTH, heads=HEADS, attn_dim_head=DH, ff_mult=FF, init=init))


def _uniform(bound):
    return bound / math.sqrt(3)


EXPECTED = {  # std of: q, attn out, ff up, ff up bias, ff down, token embedding, head
    "normal": dict(q=0.02, out=0.02 / math.sqrt(2 * DEPTH), up=0.02, up_bias=0.0, down=0.02 / math.sqrt(2 * DEPTH),
                   emb=0.02, head=0.02),
    "small_init": dict(q=math.sqrt(2 / (5 * D)), out=2 / (DEPTH * math.sqrt(D)), up=math.sqrt(2 / (5 * D)),
                       up_bias=0.0, down=2 / (DEPTH * math.sqrt(D)), emb=math.sqrt(2 / (5 * D)),
                       head=math.sqrt(2 / (5 * D))),
    "xtransformers": dict(q=_uniform(D ** -0.5), out=_uniform((HEADS * DH) ** -0.5), up=_uniform(D ** -0.5),
                          up_bias=_uniform(D ** -0.5), down=_uniform((D * FF) ** -0.5), emb=math.sqrt(2 / D),
                          head=_uniform(D ** -0.5)),
}


def _tensors(model):
    layer = model.attn_layers.layers[1]
    return dict(q=layer.attn.to_q.weight, out=layer.attn.to_out.weight, up=layer.ff.up.weight,
                up_bias=layer.ff.up.bias, down=layer.ff.down.weight, emb=model.token_emb.weight,
                head=model.to_logits.weight)


@pytest.mark.parametrize("scheme", sorted(EXPECTED))
def test_every_tensor_has_the_spread_of_its_formula(scheme):
    got = _tensors(_model(scheme))
    for name, want in EXPECTED[scheme].items():
        std = got[name].detach().std().item()
        if want == 0.0:
            assert got[name].abs().max() == 0, f"{scheme}: {name} should be zero"
            continue
        assert abs(std / want - 1) < 0.05, f"{scheme}: {name} std {std:.5f}, formula {want:.5f}"
        mean = got[name].detach().mean().item()  # centred: within 5 standard errors of 0
        assert abs(mean) < 5 * want / math.sqrt(got[name].numel()), f"{scheme}: {name} mean {mean}"
    model = _model(scheme)
    for norm in (model.attn_layers.final_norm, model.attn_layers.layers[0].attn_norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_embedding_and_head_stds_override_the_scheme():
    model = _model(InitScheme("small_init", emb_std=0.5, head_std=0.001))
    assert abs(model.token_emb.weight.std().item() / 0.5 - 1) < 0.05
    assert abs(model.to_logits.weight.std().item() / 0.001 - 1) < 0.05


def test_encoder_decoder_cross_attention_outputs_are_scaled_like_the_others():
    torch.manual_seed(0)
    model = EncoderDecoder(num_tokens=VOCAB, dim=D, enc_depth=2, dec_depth=4, heads=HEADS, attn_dim_head=DH,
                           init=InitScheme("normal", std=0.02))
    dec = model.decoder.net.attn_layers.layers[2]
    want = 0.02 / math.sqrt(2 * 4)
    for t in (dec.cross_attn.to_out.weight, dec.attn.to_out.weight, dec.ff.down.weight):
        assert abs(t.std().item() / want - 1) < 0.05
    enc = model.encoder.attn_layers.layers[0]
    assert abs(enc.attn.to_out.weight.std().item() / (0.02 / math.sqrt(2 * 2)) - 1) < 0.05


@pytest.mark.parametrize("override, key", [("model.init=gaussian", "model.init='gaussian'"),
                                           ("model.init_std=-0.02", "model.init_std=-0.02"),
                                           ("model.emb_init_std=0", "model.emb_init_std=0")])
def test_bad_scheme_or_std_is_a_config_error_naming_the_key(override, key):
    from xft_dist.config.load import apply_override

    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("'", "'")):
        validate(apply_override({"data": {"shards": "x"}}, override))


def test_bad_scheme_at_the_model_api_is_a_value_error():
    with pytest.raises(ValueError, match="init='gaussian'"):
        Decoder(dim=32, depth=1, heads=2, init="gaussian")
    with pytest.raises(ValueError, match="std=-1"):
        InitScheme("normal", std=-1)
