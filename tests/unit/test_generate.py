"""Cached decoding and ``generate``: cached logits equal the full forward's, cached tokens equal
uncached ones (decoder LM, encoder-decoder, x-transformers' class, cross-attention to a context
of another width), ragged prompts get what they get alone, eos, sampling filters, bad input."""

from __future__ import annotations

import pytest
import torch

from xft_dist import AutoregressiveWrapper, Decoder, EncoderDecoder, TransformerWrapper, XTransformer

VOCAB = 40


def _lm(**kw):
    torch.manual_seed(0)
    layers = Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, **kw.pop("layers", {}))
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=48, attn_layers=layers, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"layers": {"attn_kv_heads": 2}}, {"layers": {"rotary_pos_emb": False}},
                                {"tie_embedding": True}])
@pytest.mark.parametrize("step", [1, 3])
def test_cached_logits_equal_the_full_forward(kw, step):
    net = _lm(**kw)
    seq = torch.randint(1, VOCAB, (3, 17))
    with torch.no_grad():
        full = net(seq)
        logits, cache = net(seq[:, :5], return_intermediates=True)
        parts = [logits]
        for end in range(5 + step, seq.shape[1] + step, step):
            end = min(end, seq.shape[1])
            logits, cache = net(seq[:, :end], cache=cache, return_intermediates=True)
            parts.append(logits)
    assert cache.cache_length == seq.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cross_attention_cache_with_a_context_of_another_width():
    torch.manual_seed(1)
    net = TransformerWrapper(num_tokens=VOCAB, max_seq_len=48, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_dim_head=8, cross_attend=True, cross_attn_dim_context=24)).eval()
    ctx, ctx_mask = torch.randn(2, 7, 24), torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    seq = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        full = net(seq, context=ctx, context_mask=ctx_mask)
        logits, cache = net(seq[:, :4], context=ctx, context_mask=ctx_mask, return_intermediates=True)
        parts = [logits]
        for end in range(5, 10):  # later calls reuse the cached context keys: no context needed
            logits, cache = net(seq[:, :end], context_mask=ctx_mask, cache=cache, return_intermediates=True)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    model = AutoregressiveWrapper(net)
    kw = dict(context=ctx, context_mask=ctx_mask, temperature=0)
    assert torch.equal(model.generate(seq[:, :3], 8, **kw), model.generate(seq[:, :3], 8, cache_kv=False, **kw))


@pytest.mark.parametrize("kw", [{}, {"layers": {"rotary_pos_emb": False}}])
def test_greedy_cached_equals_uncached_and_ragged_prompts_match_alone(kw):
    model = AutoregressiveWrapper(_lm(**kw))
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 2, 4)]
    cached = model.generate(prompts, 10, temperature=0)
    assert cached.shape == (3, 10)
    assert torch.equal(cached, model.generate(prompts, 10, temperature=0, cache_kv=False))
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 10, temperature=0)
        assert torch.equal(alone[0], cached[i]), (i, alone, cached[i])


def test_encoder_decoders_generate_cached_as_uncached():
    torch.manual_seed(2)
    ed = EncoderDecoder(num_tokens=VOCAB, dim=32, enc_dim=48, enc_depth=2, dec_depth=2, heads=4, attn_dim_head=8,
                        enc_max_seq_len=16, dec_max_seq_len=16)
    src = torch.randint(1, VOCAB, (2, 9))
    src[1, 6:] = 0
    start = torch.ones(2, 1, dtype=torch.long)
    a = ed.generate(src, start, 8, temperature=0)
    assert torch.equal(a, ed.generate(src, start, 8, temperature=0, cache_kv=False))
    xt = XTransformer(dim=32, enc_num_tokens=VOCAB, enc_depth=2, enc_heads=4, enc_max_seq_len=16,
                      dec_num_tokens=VOCAB, dec_depth=2, dec_heads=4, dec_max_seq_len=16, tie_token_emb=True)
    mask = src != 0
    a = xt.generate(src, start, 8, mask=mask, temperature=0)
    assert torch.equal(a, xt.generate(src, start, 8, mask=mask, temperature=0, cache_kv=False))


def test_eos_stops_each_row_and_pads_after_it():
    model = AutoregressiveWrapper(_lm())
    prompts = torch.randint(1, VOCAB, (4, 3))
    free = model.generate(prompts, 12, temperature=0)
    eos = int(free[0, 2])  # row 0 emits it at step 3 at the latest
    out = model.generate(prompts, 12, temperature=0, eos_token=eos)
    for row_free, row in zip(free, out):
        hits = (row_free == eos).nonzero()
        if len(hits):
            stop = int(hits[0])
            assert torch.equal(row[: stop + 1], row_free[: stop + 1]) and (row[stop + 1:] == 0).all()
        else:
            assert torch.equal(row, row_free)


@pytest.mark.parametrize("filt", [{"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.2}, {"filter_logits_fn": "top_p"},
                                  {}])
def test_sampling_is_seeded_and_filtered(filt):
    model = AutoregressiveWrapper(_lm())
    prompts = torch.randint(1, VOCAB, (2, 4))
    a = model.generate(prompts, 8, seed=5, **filt)
    assert torch.equal(a, model.generate(prompts, 8, seed=5, cache_kv=False, **filt))
    assert a.shape == (2, 8) and ((a >= 0) & (a < VOCAB)).all()
    outs = {tuple(model.generate(prompts, 8, seed=s, **filt).flatten().tolist()) for s in range(6)}
    assert len(outs) > 1  # the seed matters
    # with top_k=1 every sample is the greedy token
    assert torch.equal(model.generate(prompts, 8, seed=1, top_k=1), model.generate(prompts, 8, temperature=0))


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate([], 4), "empty list"),
    (lambda m: m.generate(torch.zeros(2, 0, dtype=torch.long), 4), "non-empty"),
    (lambda m: m.generate([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 4), r"prompts\[1\]"),
    (lambda m: m.generate(torch.ones(1, 49, dtype=torch.long), 4), "longer than max_seq_len=48"),
    (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), 0), "seq_len=0"),
    (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), 4, top_p=1.5), r"top_p=1.5.*\(0, 1\]"),
    (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), 4, top_p=0.0), r"top_p=0.0"),
    (lambda m: m.generate(torch.ones(1, 4, dtype=torch.long), 4, filter_logits_fn="top_z"), "top_z"),
])
def test_bad_generation_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(AutoregressiveWrapper(_lm()))


def test_absolute_positions_refuse_to_run_past_max_seq_len():
    model = AutoregressiveWrapper(_lm(layers={"rotary_pos_emb": False}))
    with pytest.raises(ValueError, match="absolute positional"):
        model.generate(torch.ones(1, 40, dtype=torch.long), 9)
