"""The model family in one process: the five behaviours users rely on, packing isolation,
attention kernels against a float64 reference, activation checkpointing, FLOPs, and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from xft_dist import AutoregressiveWrapper, Decoder, Encoder, EncoderDecoder, TransformerWrapper
from xft_dist.models.flops import model_flops_per_token
from xft_dist.nn import Attention, RotaryEmbedding, VocabParallelEmbedding, document_positions
from xft_dist.nn.position import apply_rotary

SMALL = dict(attn_dim_head=8)


def _lm(num_tokens=40, dim=32, depth=2, heads=4, **kw):
    return TransformerWrapper(num_tokens=num_tokens, max_seq_len=64,
                              attn_layers=Decoder(dim=dim, depth=depth, heads=heads, **SMALL, **kw))


# ------------------------------------------------------------------------------ the five behaviours

def test_wrapper_loss_equals_manual_loss_with_padding():
    torch.manual_seed(0)
    net = _lm()
    model = AutoregressiveWrapper(net, pad_value=0)
    seq = torch.randint(1, 40, (3, 12))
    seq[0, 7:] = 0
    seq[2, 3:] = 0
    loss = model(seq)
    logits = net(seq[:, :-1])
    manual = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], ignore_index=0)
    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-7)
    # Same gradients as the manual path, too.
    g1 = torch.autograd.grad(loss, list(net.parameters()))
    g2 = torch.autograd.grad(manual, list(net.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_two_wrappers_share_one_token_embedding():
    torch.manual_seed(1)
    shared = VocabParallelEmbedding(40, 32)
    enc = TransformerWrapper(num_tokens=40, max_seq_len=64, token_emb=shared, return_only_embed=True,
                             attn_layers=Encoder(dim=32, depth=1, heads=4, **SMALL))
    dec = TransformerWrapper(num_tokens=40, max_seq_len=64, token_emb=shared, tie_embedding=True,
                             attn_layers=Decoder(dim=32, depth=1, heads=4, cross_attend=True, **SMALL))
    both = torch.nn.ModuleList([enc, dec])
    assert enc.token_emb is dec.token_emb is shared
    assert sum(p is shared.weight for p in both.parameters()) == 1  # one parameter, not two
    src, tgt = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 5))

    def tower_losses():
        ctx = enc(src)
        return ctx.square().mean(), dec(tgt, context=ctx).logsumexp(-1).mean()

    enc_loss, dec_loss = tower_losses()
    g_enc = torch.autograd.grad(enc_loss, shared.weight)[0]
    enc_loss, dec_loss = tower_losses()
    g_dec = torch.autograd.grad(dec_loss, shared.weight)[0]
    assert g_enc.abs().sum() > 0 and g_dec.abs().sum() > 0
    enc_loss, dec_loss = tower_losses()
    (enc_loss + dec_loss).backward()
    torch.testing.assert_close(shared.weight.grad, g_enc + g_dec)
    with pytest.raises(ValueError, match="token_emb has 40 tokens"):
        TransformerWrapper(num_tokens=41, max_seq_len=8, token_emb=shared,
                           attn_layers=Encoder(dim=32, depth=1, heads=4, **SMALL))


def test_encoder_runs_on_precomputed_embeddings_with_mask():
    torch.manual_seed(2)
    enc = Encoder(dim=32, depth=2, heads=4, **SMALL)
    emb = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = enc(emb, mask=mask)
    assert out.shape == (2, 7, 32)
    emb2 = emb.clone()
    emb2[1, 4:] = torch.randn(3, 32) * 10  # masked positions change: real outputs must not
    torch.testing.assert_close(enc(emb2, mask=mask)[1, :4], out[1, :4])
    assert not torch.allclose(enc(emb2)[1, :4], out[1, :4])  # without the mask they would
    # The wrapper takes embeddings too.
    wrapper = TransformerWrapper(num_tokens=40, max_seq_len=16, return_only_embed=True, attn_layers=enc)
    torch.testing.assert_close(wrapper(emb, mask=mask), out)


@pytest.mark.parametrize("dim_context", [512, 128])
def test_cross_attention_context_of_another_width(dim_context):
    torch.manual_seed(3)
    dec = TransformerWrapper(num_tokens=40, max_seq_len=64, attn_layers=Decoder(
        dim=256, depth=1, heads=4, cross_attend=True, cross_attn_dim_context=dim_context, attn_dim_head=32))
    ctx = torch.randn(2, 9, dim_context)
    ctx_mask = torch.ones(2, 9, dtype=torch.bool)
    ctx_mask[0, 5:] = False
    logits = dec(torch.randint(0, 40, (2, 6)), context=ctx, context_mask=ctx_mask)
    assert logits.shape == (2, 6, 40)
    ctx2 = ctx.clone()
    ctx2[0, 5:] += 5.0  # masked context positions are invisible
    torch.testing.assert_close(dec(torch.zeros(2, 6, dtype=torch.long) + 3, context=ctx2, context_mask=ctx_mask)[0],
                               dec(torch.zeros(2, 6, dtype=torch.long) + 3, context=ctx, context_mask=ctx_mask)[0])
    with pytest.raises(ValueError, match="cross_attend=True"):
        dec(torch.randint(0, 40, (2, 6)))


def test_padded_positions_are_masked_and_the_mean_is_over_real_tokens():
    torch.manual_seed(4)
    net = _lm()
    model = AutoregressiveWrapper(net, pad_value=0)
    seq = torch.randint(1, 40, (2, 10))
    seq[1, 4:] = 0
    logits = net(seq[:, :-1]).detach().requires_grad_()
    per_token = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")
    real = seq[:, 1:] != 0
    expected = per_token[real].sum() / real.sum()
    torch.testing.assert_close(model(seq), expected.detach(), rtol=1e-6, atol=1e-7)
    s, n = model(seq, return_sums=True)
    assert n.item() == real.sum().item() == 9 + 3
    # No gradient reaches the logits at positions whose target is pad.
    hook_grads = {}
    def keep(module, grad_in, grad_out):
        hook_grads["g"] = grad_out[0]

    net.attn_layers.final_norm.register_full_backward_hook(keep)
    model(seq).backward()
    assert torch.count_nonzero(hook_grads["g"][1, 3:]) == 0
    # Training on pad is opt-in, and says so once.
    loud = AutoregressiveWrapper(net, pad_value=0, mask_pad=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loud(seq)
        loud(seq)
    assert len([w for w in caught if "pad tokens (id 0)" in str(w.message)]) == 1


# --------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("abs_pos", [False, True])
def test_packed_documents_do_not_leak(abs_pos):
    torch.manual_seed(5)
    net = _lm(depth=2) if not abs_pos else TransformerWrapper(
        num_tokens=40, max_seq_len=64, use_abs_pos_emb=True,
        attn_layers=Decoder(dim=32, depth=2, heads=4, rotary_pos_emb=False, **SMALL))
    net.eval()
    doc_a, doc_b = torch.randint(1, 40, (5,)), torch.randint(1, 40, (7,))
    packed = torch.cat([doc_a, doc_b])[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    alone = net(doc_b[None])
    in_pack = net(packed, doc_ids=doc_ids)[:, 5:]
    torch.testing.assert_close(in_pack, alone, rtol=1e-5, atol=1e-5)
    other_a = torch.randint(1, 40, (5,))
    changed = net(torch.cat([other_a, doc_b])[None], doc_ids=doc_ids)[:, 5:]
    torch.testing.assert_close(changed, in_pack, rtol=1e-5, atol=1e-5)
    # Without doc ids the documents do see each other: the check above is not vacuous.
    assert not torch.allclose(net(packed)[:, 5:], alone, atol=1e-4)


def test_document_positions_restart():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_autoregressive_packing_drops_cross_document_targets():
    torch.manual_seed(6)
    model = AutoregressiveWrapper(_lm(), pad_value=0)
    seq = torch.randint(1, 40, (1, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6])
    _, n = model(seq, doc_ids=doc_ids, return_sums=True)
    assert n.item() == 8  # 9 targets, minus the first token of doc 1 predicted from doc 0


# ---------------------------------------------------------------------- attention vs float64 naive

def _naive(attn: Attention, x, *, context=None, mask=None, context_mask=None, doc_ids=None, rotary=None):
    """Float64 softmax(q k^T / sqrt(d) + mask) v from the module's own weights."""
    x = x.double()
    kv_in = x if context is None else context.double()
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    h, g, d = attn.heads, attn.kv_heads, attn.dim_head
    q = (x @ W["to_q.weight"].T).unflatten(-1, (h, d)).transpose(1, 2)
    k = (kv_in @ W["to_k.weight"].T).unflatten(-1, (g, d)).transpose(1, 2)
    v = (kv_in @ W["to_v.weight"].T).unflatten(-1, (g, d)).transpose(1, 2)
    if rotary is not None and context is None:
        rot = tuple(t.double() for t in rotary)
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
    k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    n, m = scores.shape[-2:]
    allowed = torch.ones(x.shape[0], 1, n, m, dtype=torch.bool)
    if attn.causal and context is None:
        allowed &= torch.ones(n, m, dtype=torch.bool).tril()
    km = context_mask if context is not None else mask
    if km is not None:
        allowed &= km[:, None, None, :]
    if doc_ids is not None:
        allowed &= doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return out @ W["to_out.weight"].T


CASES = {
    "causal": dict(causal=True),
    "padding": dict(causal=False, mask=True),
    "causal+padding": dict(causal=True, mask=True),
    "documents": dict(causal=True, docs=True),
    "gqa+documents": dict(causal=True, docs=True, kv_heads=2),
    "cross+context_mask": dict(causal=False, cross=True),
}


@pytest.mark.parametrize("kernel", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_kernels_match_float64_reference(case, kernel):
    c = CASES[case]
    torch.manual_seed(7)
    attn = Attention(32, heads=4, dim_head=8, kv_heads=c.get("kv_heads"), causal=c["causal"],
                     dim_context=48 if c.get("cross") else None, backend="sdpa")
    x = torch.randn(2, 10, 32)
    kw = {}
    if c.get("mask"):
        kw["mask"] = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    if c.get("docs"):
        kw["doc_ids"] = torch.tensor([[0] * 3 + [1] * 4 + [2] * 3, [0] * 10])
    if c.get("cross"):
        kw["context"] = torch.randn(2, 7, 48)
        kw["context_mask"] = torch.tensor([[True] * 7, [True] * 2 + [False] * 5])
    else:
        pos = document_positions(kw["doc_ids"]) if "doc_ids" in kw else torch.arange(10).expand(2, 10)
        kw["rotary"] = RotaryEmbedding(8)(pos)
    with sdpa_kernel([kernel]):
        out = attn(x, **kw)
    ref = _naive(attn, x, **kw)
    rows = torch.ones(2, 10, dtype=torch.bool)
    if "mask" in kw and not c["causal"]:
        rows = kw["mask"]  # padded query rows are free to hold anything finite
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[rows].double(), ref[rows], rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------- checkpointing, flops

@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_identical_loss_and_grads(every):
    def run(ckpt):
        torch.manual_seed(8)
        net = _lm(depth=3, attn_dropout=0.2, ff_dropout=0.2, activation_checkpointing=ckpt)
        model = AutoregressiveWrapper(net).train()
        seq = torch.randint(1, 40, (2, 12))
        loss = model(seq)
        loss.backward()
        return loss, [p.grad for p in net.parameters()]

    (l0, g0), (l1, g1) = run(0), run(every)
    assert l0.item() == l1.item()
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flops_per_token_follows_the_stated_convention():
    net = TransformerWrapper(num_tokens=1000, max_seq_len=256, tie_embedding=True,
                             attn_layers=Decoder(dim=64, depth=3, heads=4, attn_dim_head=16))
    n_matmul = sum(p.numel() for name, p in net.attn_layers.named_parameters()
                   if p.ndim == 2)  # q, k, v, out, up, down weights
    expected = 6 * (n_matmul + 64 * 1000) + 12 * 3 * 256 * 64
    assert model_flops_per_token(net, 256) == expected


def test_configuration_errors():
    with pytest.raises(ValueError, match="heads=6 must be a multiple of kv_heads=4"):
        Attention(32, heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="Encoder is not causal"):
        Encoder(dim=32, depth=1, causal=True)
    with pytest.raises(ValueError, match=r"expected embeddings \[b, n, 32\]"):
        Encoder(dim=32, depth=1, heads=4, **SMALL)(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="tie_embedding needs emb_dim"):
        TransformerWrapper(num_tokens=10, max_seq_len=8, emb_dim=16, tie_embedding=True,
                           attn_layers=Decoder(dim=32, depth=1, heads=4, **SMALL))


def test_encoder_decoder_pads_and_trains():
    torch.manual_seed(9)
    model = EncoderDecoder(num_tokens=30, dim=32, enc_dim=48, enc_depth=1, dec_depth=1, heads=4, **SMALL)
    src = torch.randint(1, 30, (2, 8))
    src[1, 5:] = 0
    tgt = torch.randint(1, 30, (2, 6))
    tgt[0, 4:] = 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = model(src, tgt)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
    assert sum(p is model.token_emb.weight for p in model.parameters()) == 1


def test_query_rows_with_no_visible_key_output_zero_and_leak_nothing():
    torch.manual_seed(10)
    attn = Attention(16, heads=2, dim_head=8, causal=True, backend="sdpa")
    x = torch.randn(1, 5, 16, requires_grad=True)
    mask = torch.tensor([[False, True, True, True, True]])  # position 0 (a pad start) sees no key at all
    out = attn(x, mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], torch.zeros(16))  # to_out has no bias: an all-zero row
    # Nothing from the future reaches row 0: its gradient w.r.t. later positions is zero.
    (g,) = torch.autograd.grad(out[0, 0].sum(), x)
    assert torch.count_nonzero(g[0, 1:]) == 0
