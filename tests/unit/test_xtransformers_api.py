"""x-transformers programs, written as its users write them, run after the import swap
(``from x_transformers import ...`` -> ``from xft_dist import ...``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xft_dist import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper, XTransformer


def test_xtransformer_encoder_decoder_trains_and_generates():
    torch.manual_seed(0)
    model = XTransformer(
        dim=64,
        enc_num_tokens=64,
        enc_depth=2,
        enc_heads=4,
        enc_max_seq_len=32,
        dec_num_tokens=64,
        dec_depth=2,
        dec_heads=4,
        dec_max_seq_len=32,
        tie_token_emb=True,
    )
    src = torch.randint(1, 64, (2, 16))
    src_mask = torch.ones_like(src).bool()
    tgt = torch.randint(1, 64, (2, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(src, tgt, mask=src_mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.decoder.net.token_emb is model.encoder.token_emb  # tie_token_emb
    start_tokens = tgt[:, :1]
    sample = model.generate(src, start_tokens, 15, mask=src_mask, temperature=0.0)
    assert sample.shape == (2, 15)
    assert torch.equal(sample[:, :8], tgt[:, 1:9])  # it learnt the pairs


def test_decoder_lm_with_a_plain_embedding_and_token_emb_kwargs():
    class ScaledEmbedding(nn.Module):
        def __init__(self, num_tokens, dim):
            super().__init__()
            self.emb = nn.Embedding(num_tokens, dim)

        def forward(self, x, scale=1.0):
            return self.emb(x) * scale

    model = TransformerWrapper(
        num_tokens=50, max_seq_len=64, token_emb=ScaledEmbedding(50, 32),
        attn_layers=Decoder(dim=32, depth=2, heads=4, attn_flash=True),
    )
    x = torch.randint(0, 50, (2, 10))
    logits = model(x)
    assert logits.shape == (2, 10, 50)
    scaled = model(x, token_emb_kwargs=dict(scale=2.0))
    assert not torch.allclose(scaled, logits)

    plain = TransformerWrapper(num_tokens=50, max_seq_len=64, token_emb=nn.Embedding(50, 32), tie_embedding=True,
                               attn_layers=Decoder(dim=32, depth=1, heads=4))
    assert plain(x).shape == (2, 10, 50)
    loss = AutoregressiveWrapper(plain)(x)
    loss.backward()
    assert plain.token_emb.weight.grad is not None


def test_return_intermediates_and_cache():
    model = TransformerWrapper(num_tokens=50, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=4)).eval()
    x = torch.randint(0, 50, (1, 12))
    logits, cache = model(x, return_intermediates=True)
    assert logits.shape == (1, 12, 50) and cache.cache_length == 12
    x = torch.cat((x, logits[:, -1:].argmax(dim=-1)), dim=-1)
    next_logits, cache = model(x, cache=cache, return_intermediates=True)
    assert next_logits.shape == (1, 1, 50)
    torch.testing.assert_close(next_logits[:, -1], model(x)[:, -1], rtol=1e-5, atol=1e-5)
    assert len(cache.hiddens) == 3 and cache.last_hidden.shape == (1, 1, 32)


def test_attention_layers_with_pos_context_pos_cache_and_hiddens():
    layers = Decoder(dim=32, depth=2, heads=4, cross_attend=True, rotary_pos_emb=True).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    pos, context_pos = torch.arange(10), torch.arange(6)
    out, inter = layers(x, context=context, pos=pos, context_pos=context_pos, return_hiddens=True)
    assert out.shape == (2, 10, 32) and len(inter.hiddens) == 3
    plain = layers(x, context=context, pos=pos)
    assert not torch.allclose(out, plain)  # context_pos turns rotary on in cross-attention
    torch.testing.assert_close(layers(x, context=context, pos=pos, context_pos=context_pos), out)
    # continue from the cache with one more position
    x2 = torch.cat([x, torch.randn(2, 1, 32)], dim=1)
    step, _ = layers(x2, context=context, pos=torch.arange(11), context_pos=context_pos, cache=inter,
                     return_hiddens=True)
    full = layers(x2, context=context, pos=torch.arange(11), context_pos=context_pos)
    torch.testing.assert_close(step, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_encoder_on_precomputed_embeddings_and_a_custom_head():
    enc = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=4),
                             to_logits=nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 20)))
    emb = torch.randn(3, 8, 32)
    assert enc(emb).shape == (3, 8, 20)
    ids = torch.randint(0, 20, (3, 8))
    assert enc(ids).shape == (3, 8, 20)
    loss = AutoregressiveWrapper(TransformerWrapper(num_tokens=20, max_seq_len=16, to_logits=nn.Linear(32, 20),
                                                    attn_layers=Decoder(dim=32, depth=1, heads=4)))(ids)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("build, name", [
    (lambda: Decoder(dim=32, depth=1, heads=4, alibi_pos_bias=True), "alibi_pos_bias"),
    (lambda: TransformerWrapper(num_tokens=10, max_seq_len=8, num_memory_tokens=4,
                                attn_layers=Decoder(dim=32, depth=1)), "num_memory_tokens"),
    (lambda: XTransformer(dim=32, enc_num_tokens=10, enc_depth=1, enc_max_seq_len=8, dec_num_tokens=10,
                          dec_depth=1, dec_max_seq_len=8, cross_attn_tokens_dropout=0.1), "cross_attn_tokens_dropout"),
    (lambda: TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1))(
        torch.ones(1, 4, dtype=torch.long), return_mems=True), "return_mems"),
])
def test_unsupported_arguments_are_named_not_ignored(build, name):
    with pytest.raises(TypeError, match=f"{name}.*not supported by xft_dist"):
        build()


# x-transformers' documented API, as its README and its users write it (import swapped)

def test_readme_decoder_lm_and_autoregressive_wrapper_with_list_prompts():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=256, max_seq_len=64, attn_layers=Decoder(dim=64, depth=2, heads=4))
    x = torch.randint(0, 256, (1, 64))
    assert model(x).shape == (1, 64, 256)
    model = AutoregressiveWrapper(model)
    loss = model(torch.randint(0, 256, (2, 33)))
    loss.backward()
    out = model.generate(torch.randint(0, 256, (2, 4)), 8)
    assert out.shape == (2, 8)
    listed = model.generate([torch.randint(0, 256, (3,)), torch.randint(0, 256, (5,))], 6, temperature=0.0)
    assert listed.shape == (2, 6)


def test_kv_cache_with_cross_attention_gives_the_uncached_tokens():
    torch.manual_seed(0)
    model = AutoregressiveWrapper(TransformerWrapper(
        num_tokens=50, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=4, cross_attend=True)))
    context = torch.randn(2, 7, 32)
    start = torch.randint(0, 50, (2, 3))
    cached = model.generate(start, 10, temperature=0.0, context=context, cache_kv=True)
    uncached = model.generate(start, 10, temperature=0.0, context=context, cache_kv=False)
    assert torch.equal(cached, uncached)


def test_beam_search_signature_one_beam_is_greedy_and_scores_are_log_probs():
    torch.manual_seed(0)
    model = AutoregressiveWrapper(TransformerWrapper(num_tokens=40, max_seq_len=64,
                                                     attn_layers=Decoder(dim=32, depth=2, heads=4)))
    prompt = torch.randint(0, 40, (2, 5))
    assert torch.equal(model.beam_search(prompt, 6, beams=1), model.generate(prompt, 6, temperature=0.0))
    best = model.beam_search(prompt, 6, beams=4)
    beams, scores = model.beam_search(prompt, 6, beams=4, return_beams_and_scores=True)
    assert best.shape == (2, 6) and beams.shape == (4, 2, 6) and scores.shape == (4, 2)
    assert torch.equal(beams[0], best) and bool((scores[:-1] >= scores[1:]).all())
    with torch.no_grad():  # a beam's score is the sum of its tokens' log-probabilities
        seq = torch.cat([prompt, beams[1]], dim=1)
        logp = model.net(seq[:, :-1]).log_softmax(-1)[:, 4:].gather(-1, beams[1][..., None]).sum((1, 2))
    torch.testing.assert_close(logp, scores[1], rtol=1e-4, atol=1e-4)
    single = model.beam_search(prompt[0], 6, beams=4)  # a 1-D prompt: no batch dimension, as x-transformers
    assert single.shape == (6,) and torch.equal(single, best[0])


@pytest.mark.parametrize("layers", [Decoder, Encoder])
def test_cache_fed_only_the_new_positions_equals_the_parallel_forward(layers):
    torch.manual_seed(0)
    stack = layers(dim=32, depth=2, heads=4, rotary_pos_emb=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        whole = stack(x)
        if layers is Encoder:  # bidirectional: only the first call's positions compare
            out, cache = stack(x, return_hiddens=True)
            torch.testing.assert_close(out, whole)
            return
        out, cache = stack(x[:, :4], return_hiddens=True)
        outs = [out]
        for i in range(4, 9):
            out, cache = stack(x[:, i:i + 1], cache=cache, return_hiddens=True)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_float_token_ids_are_ids():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=30, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=4))
    ids = torch.randint(0, 30, (2, 8))
    torch.testing.assert_close(model(ids.float()), model(ids))
    torch.testing.assert_close(AutoregressiveWrapper(model)(ids.float()), AutoregressiveWrapper(model)(ids))


def test_xtransformers_options_at_their_off_values_are_accepted_and_refused_when_on():
    layers = Decoder(dim=32, depth=1, heads=4, alibi_pos_bias=False, rel_pos_bias=False, use_scalenorm=False,
                     attn_qk_norm=False, ff_relu_squared=False, macaron=False, pre_norm=True, shift_tokens=0)
    model = TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=layers, l2norm_embed=False,
                               post_emb_norm=False, num_memory_tokens=None, emb_frac_gradient=1.0)
    AutoregressiveWrapper(model, mask_prob=0.0, add_attn_z_loss=False)
    for build, name in ((lambda: Decoder(dim=32, depth=1, attn_qk_norm=True), "attn_qk_norm=True"),
                        (lambda: Decoder(dim=32, depth=1, pre_norm=False), "pre_norm=False"),
                        (lambda: AutoregressiveWrapper(model, mask_prob=0.15), "mask_prob=0.15")):
        with pytest.raises(TypeError, match=f"{name} .supported only at .*not supported by xft_dist"):
            build()
