"""Export to Hugging Face at TP=1: the transformers model built from our exported config loads the
renamed weights with nothing missing or left over and gives our logits and greedy continuation, for
each architecture (Llama, GPT-NeoX, GPT-2); what no class expresses is refused by config key.
(tests/distributed/test_convert.py does the same through tools/export.py from TP=2 ZeRO-3 runs.)"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from xft_dist.ckpt.hf import greedy_agrees, hf_architecture, hf_config, hf_state_dict  # noqa: E402
from xft_dist.ckpt.xtransformers import NotExportable  # noqa: E402
from xft_dist.config.load import validate  # noqa: E402
from xft_dist.models.factory import build_model  # noqa: E402
from xft_dist.parallel import ParallelGroups  # noqa: E402

VOCAB = 61
LLAMA = {"use_rmsnorm": True, "ff_glu": True, "ff_swish": True}
VARIANTS = {
    "gpt_neox default": ({}, "gpt_neox"),
    "gpt_neox untied, bias-free LayerNorm, eps": ({"tie_embedding": False, "norm_bias": False, "norm_eps": 1e-6},
                                                  "gpt_neox"),
    "llama GQA untied, own head width": ({**LLAMA, "kv_heads": 2, "dim_head": 12, "tie_embedding": False},
                                         "llama"),
    "llama tied": ({**LLAMA, "norm_eps": 1e-6}, "llama"),
    "llama 3 style: no feed-forward bias, rotary base 500000": ({**LLAMA, "ff_bias": False, "rotary_theta": 5e5},
                                                               "llama"),
    "gpt_neox without feed-forward bias": ({"ff_bias": False}, "gpt_neox"),
    "gpt2 learned positions": ({"rotary_pos_emb": False}, "gpt2"),
}


def _cfg(kind="decoder", **model):
    model = {"kind": kind, "dim": 32, "depth": 2, "heads": 4, "enc_depth": 1} | model
    data = {"shards": "unused", "seq_len": 24, "enc_len": 16, "mode": "span" if kind != "decoder" else "packed"}
    return validate({"model": model, "data": data})


def _ours(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, ParallelGroups.single(), None, num_tokens=VOCAB, pad_id=0).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 starts, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_model_gives_our_logits_and_greedy_continuation(variant):
    overrides, arch = VARIANTS[variant]
    cfg = _cfg(**overrides)
    assert hf_architecture(cfg) == arch
    ours = _ours(cfg)
    config = hf_config(cfg, arch, num_tokens=VOCAB, eos_id=1, pad_id=0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    weights = hf_state_dict(ours.state_dict(), cfg, arch)
    missing, unexpected = theirs.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embedding else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    theirs.tie_weights()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.net(ids, gather_logits=True), rtol=1e-4, atol=1e-5)
        mine = ours.generate(ids, 6, temperature=0.0)  # our cached decoding
        hf = theirs.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[:, 10:]
        assert greedy_agrees(ours, theirs, ids, new=6)
    assert torch.equal(mine, hf)  # these weights (norms and biases moved) leave no near-ties


REFUSED = {
    "encoder-decoder": (dict(kind="encoder_decoder"), "model.kind=encoder_decoder: no transformers class"),
    "LayerNorm + GLU": (dict(ff_glu=True), "model.use_rmsnorm=false: Llama's norms are RMSNorm"),
    "RMSNorm + GELU": (dict(use_rmsnorm=True), "model.ff_glu / model.ff_swish: Llama's feed-forward is SwiGLU"),
    "GPT-NeoX head width": (dict(dim_head=12), "model.dim_head=12: GPT-NeoX and GPT-2 need dim / heads = 8"),
    "GPT-NeoX GQA": (dict(kv_heads=2), "model.kv_heads=2: GPT-NeoX and GPT-2 have no grouped-query attention"),
    "Llama without rotary": (dict(**LLAMA, rotary_pos_emb=False), "model.rotary_pos_emb=false: Llama's positions"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_no_class_expresses_is_refused_by_name(case):
    overrides, words = REFUSED[case]
    with pytest.raises(NotExportable, match="no transformers equivalent") as e:
        hf_architecture(_cfg(**overrides))
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_init_from_a_saved_transformers_model_gives_its_logits(variant, tmp_path):
    """``model.init_from``'s two halves in process: the architecture read from config.json (the run
    sets no model keys) and the weights loaded into our model (TP=1), which then computes its logits."""
    from xft_dist.ckpt.init_from import check_init_shapes, load_init_weights, resolve_init_from

    overrides, arch = VARIANTS[variant]
    cfg = _cfg(**overrides)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, arch, num_tokens=VOCAB, eos_id=1,
                                                                     pad_id=0)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    run = validate({"model": {"init_from": str(tmp_path / "hf")}, "data": {"shards": "unused", "seq_len": 24}})
    run = resolve_init_from(run)
    check_init_shapes(run, VOCAB)
    ours = build_model(run, ParallelGroups.single(), None, num_tokens=VOCAB, pad_id=0).eval()
    load_init_weights(ours, run, ParallelGroups.single())
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.net(ids, gather_logits=True), theirs(ids).logits, rtol=1e-4, atol=1e-5)
