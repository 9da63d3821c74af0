"""Packed documents on the varlen path (no n x n mask) equal the dense-mask path: logits and every
gradient, with GQA, rotary, learned positions, activation checkpointing, causal and bidirectional
stacks; a packed training step builds no mask; bad document ids are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xft_dist.nn.attention as attention
from xft_dist import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper
from xft_dist.data.batch import Batch, DocLayout
from xft_dist.nn import Attention

VOCAB = 50


def _doc_ids(b=3, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cuts = [sorted(torch.randperm(n - 1, generator=gen)[:3].add(1).tolist()) for _ in range(b)]
    ids = torch.zeros(b, n, dtype=torch.long)
    for r, row in enumerate(cuts):
        for c in row:
            ids[r, c:] += 1
    return ids


def _net(layers_cls=Decoder, **kw):
    torch.manual_seed(0)
    layers = layers_cls(dim=32, depth=2, heads=4, attn_dim_head=8, **kw)
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=layers)


def set_backend(net, backend: str) -> None:
    for m in net.modules():
        if isinstance(m, Attention):
            m.backend = backend


def _both(net, seq, doc_ids):
    """(varlen logits and grads, dense-mask logits and grads) of the same net and inputs."""
    out = []
    for mask in (None, torch.ones_like(seq, dtype=torch.bool)):  # a mask and the sdpa backend: the dense path
        net.zero_grad(set_to_none=True)
        set_backend(net, "auto" if mask is None else "sdpa")
        logits = net(seq, doc_ids=doc_ids, mask=mask)
        (logits.square().mean() + logits[:, :, 3].sum()).backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    return out


@pytest.mark.parametrize("kw", [
    {}, {"attn_kv_heads": 2}, {"rotary_pos_emb": False}, {"activation_checkpointing": 1, "attn_kv_heads": 1},
])
@pytest.mark.parametrize("layers_cls", [Decoder, Encoder])
def test_varlen_equals_dense_mask(layers_cls, kw):
    net = _net(layers_cls, **kw).double()  # fp64: the two paths agree to rounding, far inside 1e-5
    doc_ids = _doc_ids()
    seq = torch.randint(1, VOCAB, doc_ids.shape)
    (logits, grads), (ref_logits, ref_grads) = _both(net, seq, doc_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_a_packed_training_step_builds_no_n_by_n_mask(monkeypatch):
    net = _net()
    model = AutoregressiveWrapper(net, check_ids=False)
    doc_ids = _doc_ids(n=16)
    ids = torch.randint(1, VOCAB, (3, 17))
    batch = Batch.of("packed", ids[:, :-1], ids[:, 1:], doc_ids=doc_ids, positions=torch.zeros_like(doc_ids))

    def no_mask(*a, **kw):
        raise AssertionError("a dense attention mask was built for a packed batch")

    sdpa = F.scaled_dot_product_attention

    def checked_sdpa(q, k, v, attn_mask=None, **kw):
        assert attn_mask is None, "SDPA got a mask"
        assert q.shape[-2] < 16 or kw.get("is_causal"), "attention over a whole row without a mask"
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention, "attention_mask", no_mask)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", checked_sdpa)
    loss_sum, count = model(batch)
    loss_sum.backward()
    assert count > 0 and torch.isfinite(loss_sum)


def test_layout_of_a_batch():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    layout = DocLayout.from_doc_ids(doc_ids)
    assert layout.bounds == (0, 2, 5, 6, 8, 10)
    assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == list(layout.bounds)


def test_decreasing_document_ids_are_named():
    with pytest.raises(ValueError, match="doc_ids row 1 decreases"):
        DocLayout.from_doc_ids(torch.tensor([[0, 0, 1], [0, 1, 0]]))


@pytest.mark.parametrize("names", [
    frozenset({"window_size", "enable_gqa"}),  # torch 2.13
    frozenset({"is_causal"}),  # earlier releases: no GQA, no window
])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_kernel_arguments_for_either_torch_signature(names, causal):
    """The arguments handed to torch's varlen kernel give GQA attention under either signature."""
    torch.manual_seed(0)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    k2, v2, kwargs = attention.varlen_attn_args(names, q, k, v, causal)
    assert set(kwargs) <= names
    assert kwargs.get("window_size", (-1, 0 if causal else -1)) == ((-1, 0) if causal else (-1, -1))
    assert kwargs.get("is_causal", causal) == causal
    as_heads = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731 - [1, h, n, d]
    ref = F.scaled_dot_product_attention(as_heads(q), as_heads(k), as_heads(v), is_causal=causal, enable_gqa=True)
    out = F.scaled_dot_product_attention(as_heads(q), as_heads(k2), as_heads(v2), is_causal=causal,
                                         enable_gqa=kwargs.get("enable_gqa", False))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("layers_cls", [Decoder, Encoder])
def test_packed_rows_with_a_padding_mask_stay_on_the_varlen_path(layers_cls, monkeypatch):
    """doc_ids and a key-padding mask together (x-transformers' call with packed rows): padding is
    documents of its own, so no n x n mask is built, and every real position's logits and the
    gradients of a loss over them equal the dense path's. A document that resumes after padding
    falls back to the dense mask (exact everywhere)."""
    net = _net(layers_cls).double()
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7, [0] * 16])
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[0, 13:] = False  # right padding
    mask[1, 7:9] = False  # padding at the end of a document, before the next
    mask[2, :3] = False   # left padding
    seq = torch.randint(1, VOCAB, doc_ids.shape, generator=torch.Generator().manual_seed(3))
    runs = []
    for backend in ("sdpa", "auto"):
        set_backend(net, backend)
        net.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:
            if backend == "auto":
                m.setattr(attention, "attention_mask", lambda *a, **k: pytest.fail("a dense mask was built"))
            logits = net(seq, doc_ids=doc_ids, mask=mask)
        (logits[mask].square().mean() + logits[mask][:, 3].sum()).backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (ref, ref_grads), (out, grads) = runs
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-9, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=lambda msg: f"{name}: {msg}")
    holes = mask.clone()
    holes[2, 8] = False  # document 0 of row 2 resumes after padding: dense, exact at every position
    set_backend(net, "sdpa")
    dense = net(seq, doc_ids=doc_ids, mask=holes)
    set_backend(net, "auto")
    torch.testing.assert_close(net(seq, doc_ids=doc_ids, mask=holes), dense, rtol=1e-9, atol=1e-12)
