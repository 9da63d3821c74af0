"""The model family at TP=2 against TP=1 on the same seed (2 gloo ranks): decoder LM and
encoder-decoder logits, losses and gradients; packed documents; activation checkpointing with
dropout replaying the TP-distinct RNG stream."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from xft_dist import AutoregressiveWrapper, Decoder, EncoderDecoder, TransformerWrapper
from xft_dist.parallel import ParallelGroups, capture_rng_state, restore_rng_state, seed_all

from .common import assert_close, assert_same_step, compare_grads, dense_backend, encdec_pair, tp_shard
from .harness import CheckSet

TP2 = CheckSet(world_size=2)
VOCAB = 61  # odd: the vocabulary is padded to 62 at TP=2


def _decoder_lm(groups=None, **kw):
    layers = Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, attn_kv_heads=2, ff_glu=True,
                     ff_swish=True, use_rmsnorm=True, groups=groups, **kw)
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=layers)


@TP2.check
def decoder_lm_tp2_matches_tp1():
    g = ParallelGroups.build(tp_size=2)
    torch.manual_seed(0)
    ref = _decoder_lm()
    torch.manual_seed(0)
    tp = _decoder_lm(g)
    seq = torch.randint(1, VOCAB, (3, 12))
    seq[1, 8:] = 0
    mask = seq != 0
    assert_close(tp(seq, mask=mask, gather_logits=True), ref(seq, mask=mask), "gathered logits")
    shard = tp(seq, mask=mask)
    assert shard.shape == (3, 12, 31), shard.shape  # this rank's slice of the 62 padded columns
    loss_ref = AutoregressiveWrapper(ref)(seq, mask=mask)
    loss_tp = AutoregressiveWrapper(tp)(seq, mask=mask)
    assert_close(loss_tp, loss_ref, "loss")
    loss_ref.backward()
    loss_tp.backward()
    compare_grads(ref, tp, g, "decoder LM")


@TP2.check
def every_init_scheme_draws_the_same_weights_at_tp1_and_tp2():
    from xft_dist.config.choices import INIT_SCHEMES

    g = ParallelGroups.build(tp_size=2)
    for scheme in INIT_SCHEMES:
        torch.manual_seed(3)
        ref = _decoder_lm(init=scheme)
        torch.manual_seed(3)
        tp = _decoder_lm(g, init=scheme)
        for (name, p_ref), (_, p_tp) in zip(ref.named_parameters(), tp.named_parameters()):
            assert_close(p_tp.detach(), tp_shard(p_ref.detach(), p_tp, g), f"init={scheme}: {name}", rtol=0, atol=0)


@TP2.check
def encoder_decoder_shared_embedding_wider_context_tp2():
    g = ParallelGroups.build(tp_size=2)
    ref, tp = encdec_pair(g, vocab=VOCAB)
    assert tp.encoder.token_emb is tp.decoder.net.token_emb is tp.token_emb
    src = torch.randint(1, VOCAB, (2, 9))
    src[0, 6:] = 0
    tgt = torch.randint(1, VOCAB, (2, 7))
    tgt[1, 4:] = 0
    enc_ref, enc_tp = ref.encode(src, src != 0), tp.encode(src, src != 0)
    assert enc_tp.shape == (2, 9, 64)
    assert_close(enc_tp, enc_ref, "encoder output (64 wide)")
    dec_in = dict(mask=tgt != 0, context=enc_ref.detach(), context_mask=src != 0)
    assert_close(tp.decoder.net(tgt, gather_logits=True, **dec_in), ref.decoder.net(tgt, **dec_in),
                 "decoder gathered logits")
    assert_same_step(ref, tp, g, (src, tgt), "encoder-decoder")


@TP2.check
def packed_documents_do_not_leak_tp2():
    g = ParallelGroups.build(tp_size=2)
    torch.manual_seed(2)
    tp = _decoder_lm(g).eval()
    doc_a, doc_b = torch.randint(1, VOCAB, (4,)), torch.randint(1, VOCAB, (8,))
    doc_ids = torch.tensor([[0] * 4 + [1] * 8])
    packed = tp(torch.cat([doc_a, doc_b])[None], doc_ids=doc_ids, gather_logits=True)[:, 4:]
    assert_close(packed, tp(doc_b[None], gather_logits=True), "doc B packed vs alone", rtol=1e-5, atol=1e-5)
    other = tp(torch.cat([torch.randint(1, VOCAB, (4,)), doc_b])[None], doc_ids=doc_ids, gather_logits=True)
    assert_close(other[:, 4:], packed, "doc B after another doc A", rtol=1e-5, atol=1e-5)


@TP2.check
def varlen_tp2_matches_dense_mask_tp1():
    g = ParallelGroups.build(tp_size=2)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
    seq = torch.randint(1, VOCAB, doc_ids.shape, generator=torch.Generator().manual_seed(4))
    results = []
    for groups, mask in ((None, torch.ones_like(seq, dtype=torch.bool)), (g, None)):  # dense at TP1, varlen at TP2
        torch.manual_seed(5)
        model = _decoder_lm(groups, activation_checkpointing=1).double()
        if mask is not None:  # the dense reference: a mask and the sdpa backend
            dense_backend(model)
        logits = model(seq, doc_ids=doc_ids, mask=mask, gather_logits=True)
        (logits.square().mean() + logits[..., 7].sum()).backward()
        results.append((model, logits))
    (ref, ref_logits), (tp, tp_logits) = results
    assert_close(tp_logits, ref_logits, "varlen TP2 vs dense TP1 logits", rtol=1e-9, atol=1e-12)
    for (name, p_ref), (_, p_tp) in zip(ref.named_parameters(), tp.named_parameters()):
        assert_close(p_tp.grad, tp_shard(p_ref.grad, p_tp, g), f"grad of {name}", rtol=1e-9, atol=1e-12)


def _dropout_run(g, streams, every):
    """One forward/backward with dropout; every run starts from the same RNG state."""
    torch.manual_seed(3)
    model = AutoregressiveWrapper(_decoder_lm(g, attn_dropout=0.3, ff_dropout=0.3, rng=streams,
                                              activation_checkpointing=every)).train()
    seq = torch.randint(1, VOCAB, (2, 10))
    loss = model(seq)
    loss.backward()
    return model, loss


@TP2.check
def activation_checkpointing_with_dropout_tp2():
    g = ParallelGroups.build(tp_size=2)
    streams = seed_all(7, tp_rank=g.tp_rank)
    start = capture_rng_state(streams)
    base, loss0 = _dropout_run(g, streams, 0)
    for every in (1, 2):
        restore_rng_state(start, streams)
        ck, loss = _dropout_run(g, streams, every)
        assert loss.item() == loss0.item(), f"every={every}: {loss.item()} != {loss0.item()}"
        for (name, a), b in zip(base.named_parameters(), ck.parameters()):
            assert torch.equal(a.grad, b.grad), f"every={every}: grad of {name} differs"
    # Dropout inside split regions differs across TP ranks (TP-distinct stream)...
    restore_rng_state(start, streams)
    with streams.fork():
        draw = torch.rand(4)
    peers = [torch.empty(4) for _ in range(2)]
    dist.all_gather(peers, draw, group=g.tp_group)
    assert not torch.equal(peers[0], peers[1])
    # ...and without replaying that stream the recomputed masks differ: the check above can fail.
    restore_rng_state(start, streams)
    torch.manual_seed(3)
    model = AutoregressiveWrapper(_decoder_lm(g, attn_dropout=0.3, ff_dropout=0.3, rng=streams,
                                              activation_checkpointing=1)).train()
    model.net.attn_layers.rng = None  # plain torch checkpoint: default generators only
    seq = torch.randint(1, VOCAB, (2, 10))
    model(seq).backward()
    differs = any(not torch.equal(a.grad, b.grad) for a, b in zip(base.parameters(), model.parameters()))
    assert differs, "gradients matched without replaying the TP stream: the test would not catch a bug"


@TP2.check
def split_region_dropout_is_tp_distinct():
    """Dropout on split hidden units / heads must draw different masks on each TP rank. Every
    rank's units (and heads) are made identical, so identical masks would show as equal outputs."""
    from xft_dist.nn import Attention, FeedForward

    g = ParallelGroups.build(tp_size=2)
    streams = seed_all(11, tp_rank=g.tp_rank)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    ff = FeedForward(16, mult=4, dropout=0.5, group=g.tp_group, rng=streams).train()
    attn = Attention(16, heads=4, dim_head=8, dropout=0.5, group=g.tp_group, rng=streams).train()
    with torch.no_grad():
        ff.up.weight.copy_(torch.ones_like(ff.up.weight))  # every hidden unit the same
        ff.up.bias.zero_()
        for lin in (attn.to_q, attn.to_k, attn.to_v):      # every head the same
            lin.weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(5)).repeat(2, 1))
    ff.down.register_forward_pre_hook(grab("ff"))
    attn.to_out.register_forward_pre_hook(grab("attn"))
    ff(x), attn(x)
    for name, local in seen.items():
        peers = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(peers, local.contiguous(), group=g.tp_group)
        assert not torch.equal(peers[0], peers[1]), f"{name}: identical dropout masks on both TP ranks"
        half = local.shape[-1] // 2
        if name == "attn":  # the two local heads on one rank draw different masks as well
            assert not torch.equal(local[..., :half], local[..., half:])


@TP2.check
def dropout_at_tp2_requires_rng_streams():
    g = ParallelGroups.build(tp_size=2)
    with pytest.raises(ValueError, match="needs rng="):
        _decoder_lm(g, attn_dropout=0.1)
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size 2"):
        Decoder(dim=32, depth=1, heads=3, attn_dim_head=8, groups=g)


@TP2.check
def generation_tp2_equals_tp1():
    """Greedy tokens at TP=2 are TP=1's, cached and not, ragged prompts, both model kinds; a seeded
    sample is the same on both TP ranks."""
    from xft_dist.parallel import all_gather_object

    g = ParallelGroups.build(tp_size=2)
    torch.manual_seed(4)
    ref = AutoregressiveWrapper(_decoder_lm()).eval()
    torch.manual_seed(4)
    tp = AutoregressiveWrapper(_decoder_lm(g)).eval()
    prompts = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 3)]
    want = ref.generate(prompts, 12, temperature=0)
    for cache_kv in (True, False):
        got = tp.generate(prompts, 12, temperature=0, cache_kv=cache_kv)
        assert torch.equal(got, want), (cache_kv, got, want)
    sampled = tp.generate(prompts, 12, top_k=5, seed=None)
    peers = all_gather_object(sampled.tolist(), g.tp_group)
    assert peers[0] == peers[1], peers

    kw = dict(num_tokens=VOCAB, dim=32, enc_dim=48, enc_depth=1, dec_depth=2, heads=4, attn_dim_head=8,
              enc_max_seq_len=16, dec_max_seq_len=16)
    torch.manual_seed(5)
    ed_ref = EncoderDecoder(**kw)
    torch.manual_seed(5)
    ed_tp = EncoderDecoder(groups=g, **kw)
    src = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    src[1, 5:] = 0
    start = torch.ones(2, 1, dtype=torch.long)
    assert torch.equal(ed_tp.generate(src, start, 10, temperature=0), ed_ref.generate(src, start, 10, temperature=0))


@TP2.check
def a_plain_token_embedding_is_refused_at_tp2():
    g = ParallelGroups.build(tp_size=2)
    for kw in ({"token_emb": torch.nn.Embedding(VOCAB, 32)}, {"to_logits": torch.nn.Linear(32, VOCAB)}):
        try:
            layers = Decoder(dim=32, depth=1, heads=4, groups=g)
            TransformerWrapper(num_tokens=VOCAB, max_seq_len=16, attn_layers=layers, **kw)
        except ValueError as e:
            assert "tensor-parallel size 1 only" in str(e) and "TP=2" in str(e), e
        else:
            raise AssertionError(f"{list(kw)} accepted at TP=2")


@pytest.fixture(scope="module")
def report():
    return TP2.run()


@pytest.mark.parametrize("name", TP2.names())
def test_models_tp2(report, name):
    report.assert_passed(name)
