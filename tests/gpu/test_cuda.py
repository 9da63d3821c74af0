"""Checks that need CUDA (skipped without it): fused attention kernels in bf16 against the float64
reference, flash-attn varlen against SDPA on packed documents, the vocab-parallel loss in bf16,
and a training step of the decoder LM."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from xft_dist import AutoregressiveWrapper, Decoder, TransformerWrapper
from xft_dist.nn import Attention, RotaryEmbedding, document_positions, vocab_parallel_cross_entropy

from ..unit.test_models import _naive

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("docs", [False, True])
def test_sdpa_bf16_matches_float64_reference(docs):
    torch.manual_seed(0)
    attn = Attention(128, heads=4, dim_head=32, kv_heads=2, causal=True, backend="sdpa").cuda()
    x = torch.randn(2, 64, 128, device="cuda")
    doc_ids = torch.tensor([[0] * 20 + [1] * 44, [0] * 64], device="cuda") if docs else None
    pos = document_positions(doc_ids) if docs else torch.arange(64, device="cuda").expand(2, 64)
    rotary = RotaryEmbedding(32).cuda()(pos)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x, doc_ids=doc_ids, rotary=rotary)
    ref = _naive(attn.cpu(), x.cpu(), doc_ids=None if doc_ids is None else doc_ids.cpu(),
                 rotary=tuple(t.cpu() for t in rotary))
    torch.testing.assert_close(out.float().cpu().double(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_varlen_matches_sdpa_on_packed_documents():
    torch.manual_seed(1)
    attn = Attention(128, heads=4, dim_head=32, causal=True, backend="sdpa").cuda().bfloat16()
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16)
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64], device="cuda")
    ref = attn(x, doc_ids=doc_ids)
    attn.backend = "flash_varlen"
    torch.testing.assert_close(attn(x, doc_ids=doc_ids), ref, rtol=2e-2, atol=2e-2)


def test_vocab_parallel_cross_entropy_bf16_cuda():
    torch.manual_seed(2)
    logits = (torch.randn(4, 128, 1000, device="cuda") * 3).bfloat16().requires_grad_()
    target = torch.randint(0, 1000, (4, 128), device="cuda")
    target[0, :10] = -100
    ref_in = logits.detach().float().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target)
    ref = F.cross_entropy(ref_in.transpose(1, 2), target, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(logits.grad.float(), ref_in.grad, rtol=2e-2, atol=1e-3)


def test_decoder_lm_trains_on_cuda_in_bf16():
    torch.manual_seed(3)
    net = TransformerWrapper(num_tokens=256, max_seq_len=128,
                             attn_layers=Decoder(dim=128, depth=2, heads=4, attn_dim_head=32,
                                                 activation_checkpointing=1)).cuda()
    model = AutoregressiveWrapper(net)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = torch.randint(1, 256, (8, 129), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(seq)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5, losses
