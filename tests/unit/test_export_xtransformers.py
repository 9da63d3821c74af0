"""Export to x-transformers at TP=1: the x-transformers model built from the constructor call loads
the renamed weights with strict=True and gives our logits, for every option it can express; the
others are refused by config key. (tests/distributed/test_convert.py does the same from TP=2 ZeRO-3
checkpoints through tools/export.py.)"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("x_transformers")

from xft_dist.ckpt.xtransformers import (  # noqa: E402
    NotExportable,
    build_xtransformers,
    spec_path,
    unsupported_options,
    xtransformers_spec,
    xtransformers_state_dict,
)
from xft_dist.config.load import validate  # noqa: E402
from xft_dist.models.factory import build_model  # noqa: E402
from xft_dist.parallel import ParallelGroups  # noqa: E402

EXPORTABLE = {"use_rmsnorm": True, "norm_eps": 0.0}


def _cfg(kind="decoder", **model):
    model = {"kind": kind, "dim": 32, "depth": 2, "heads": 4, "dim_head": 8, "enc_depth": 2} | model
    data = {"shards": "unused", "seq_len": 12, "enc_len": 16, "mode": "span" if kind != "decoder" else "packed"}
    return validate({"model": model, "data": data})


def _ours(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, ParallelGroups.single(), None, num_tokens=61, pad_id=0).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 starts, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _logits(ours, xt, kind):
    gen = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(1, 61, (2, 16), generator=gen), torch.randint(1, 61, (2, 12), generator=gen)
    with torch.no_grad():
        if kind == "decoder":
            return ours.net(tgt, gather_logits=True), xt(tgt)
        return (ours.decoder.net(tgt, context=ours.encode(src), gather_logits=True),
                xt.decoder.net(tgt, context=xt.encoder(src, return_embeddings=True)))


VARIANTS = {
    "tied-rotary-rmsnorm": ("decoder", EXPORTABLE),
    "gqa-swiglu": ("decoder", EXPORTABLE | {"kv_heads": 2, "ff_glu": True, "ff_swish": True}),
    "geglu-mqa": ("decoder", EXPORTABLE | {"kv_heads": 1, "ff_glu": True}),
    "untied-absolute-layernorm": ("decoder", {"tie_embedding": False, "rotary_pos_emb": False,
                                              "norm_bias": False}),
    "encdec": ("encoder_decoder", EXPORTABLE),
    "encdec-wider-context-gqa": ("encoder_decoder", EXPORTABLE | {"enc_dim": 48, "kv_heads": 2, "ff_glu": True}),
    "encdec-wider-absolute-layernorm": ("encoder_decoder", {"enc_dim": 48, "rotary_pos_emb": False,
                                                            "norm_bias": False}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_xtransformers_model_gives_our_logits(variant, tmp_path):
    kind, model = VARIANTS[variant]
    cfg = _cfg(kind, **model)
    ours = _ours(cfg)
    spec = xtransformers_spec(cfg, num_tokens=61, pad_id=0)
    (tmp_path / "m.json").write_text(json.dumps(spec))  # plain JSON: the file round-trips
    xt = build_xtransformers(tmp_path / "m.json").eval()
    xt.load_state_dict(xtransformers_state_dict(ours.state_dict(), cfg), strict=True)
    a, b = _logits(ours, xt, kind)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if "wider" in variant:
        assert spec["encoder"]["kwargs"]["attn_layers"]["kwargs"]["dim"] == 48
        assert xt.decoder.net.token_emb is xt.encoder.token_emb  # one embedding, as ours


@pytest.mark.parametrize("model, key", [
    ({"norm_bias": True}, "model.norm_bias=true"),
    ({"norm_bias": False, "norm_eps": 1e-6}, "model.norm_eps=1e-06"),
    ({"use_rmsnorm": True}, "model.norm_eps=1e-05"),
])
def test_options_without_an_xtransformers_equivalent_are_refused_by_name(model, key):
    cfg = _cfg(**model)
    assert any(p.startswith(key) for p in unsupported_options(cfg)), unsupported_options(cfg)
    with pytest.raises(NotExportable, match=key.replace(".", r"\.")):
        xtransformers_spec(cfg, num_tokens=61, pad_id=0)


def test_the_constructor_call_goes_beside_the_weights():
    assert spec_path("out/model.pt").name == "model.json"
    with pytest.raises(ValueError, match="suffix .json"):
        spec_path("model.json")


def test_layernorm_without_bias_and_norm_eps_are_model_options():
    model = build_model(_cfg(norm_bias=False, norm_eps=1e-3), ParallelGroups.single(), None, num_tokens=61,
                        pad_id=0)
    norm = model.net.attn_layers.final_norm
    assert norm.bias is None and norm.eps == 1e-3
    assert not any("norm.bias" in n for n, _ in model.named_parameters())
