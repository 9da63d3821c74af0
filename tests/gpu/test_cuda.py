"""Checks that need CUDA (skipped without it): fused attention kernels in bf16 against the float64
reference, flash-attn varlen against SDPA on packed documents, the vocab-parallel loss in bf16,
and a training step of the decoder LM."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from xft_dist import AutoregressiveWrapper, Decoder, TransformerWrapper
from xft_dist.data import Batch
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


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_kernel_matches_dense_mask_on_cuda(kv_heads):
    """torch's varlen_attn (or flash-attn) on packed documents == the dense-mask SDPA path, bf16."""
    torch.manual_seed(4)
    attn = Attention(128, heads=4, dim_head=32, kv_heads=kv_heads, causal=True).cuda().bfloat16()
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64], device="cuda")
    out = attn(x, doc_ids=doc_ids)  # no mask: the varlen path
    out.float().square().sum().backward()
    grad, x.grad = x.grad.clone(), None
    ref = attn(x, doc_ids=doc_ids, mask=torch.ones(2, 64, dtype=torch.bool, device="cuda"))  # dense mask
    ref.float().square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, x.grad, rtol=5e-2, atol=5e-2)


def test_fused_head_loss_matches_unfused_on_cuda():
    from xft_dist.nn import fused_head_cross_entropy

    torch.manual_seed(5)
    hidden = torch.randn(512, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(1000, 256, device="cuda") * 0.05).requires_grad_()
    target = torch.randint(0, 1000, (512,), device="cuda")
    target[:30] = -100
    losses = fused_head_cross_entropy(hidden, weight, target, chunk_tokens=100, label_smoothing=0.1, z_loss=1e-3)
    losses.mean().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = vocab_parallel_cross_entropy(F.linear(hidden, weight), target, label_smoothing=0.1, z_loss=1e-3)
    ref.mean().backward()
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-5)


def test_cuda_rng_streams_differ_across_tp_ranks():
    from xft_dist.parallel import seed_all

    draws = []
    for tp_rank in (0, 1):
        streams = seed_all(11, tp_rank=tp_rank)
        with streams.fork():
            draws.append(torch.rand(8, device="cuda"))
    assert not torch.equal(draws[0], draws[1])
    seed_all(11, tp_rank=0)
    outside = torch.rand(8, device="cuda")
    seed_all(11, tp_rank=1)
    assert torch.equal(torch.rand(8, device="cuda"), outside)  # the default stream is shared


def _nccl_tp2_step(rank: int, port: int, out, sp: bool = False):
    import os

    from xft_dist.config.load import validate
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import VocabFacts, build_run
    from xft_dist.train.step import train_step

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = validate({"model": {"dim": 64, "depth": 2, "heads": 4},
                    "data": {"shards": "unused", "seq_len": 32},
                    "parallel": {"tp": 2, "zero_stage": 1, "sequence_parallel": sp},
                    "train": {"global_batch": 4, "micro_batch": 4, "precision": "bf16"}})
    run = build_run(cfg, DistEnv.from_environ(), upto="engine",
                    vocab=VocabFacts(num_tokens=128, pad_id=0, tokenizer_vocab=128, num_sentinels=0))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (4, 33), generator=gen)
    doc_ids = torch.zeros(4, 32, dtype=torch.long)
    doc_ids[:, 20:] = 1
    batch = Batch.of("packed", ids[:, :-1], ids[:, 1:], doc_ids=doc_ids, positions=torch.zeros_like(doc_ids))
    result = train_step(run.engine, batch, groups=run.groups, micro_batch=4, step=1)
    out.put((rank, result.loss))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_tp2_training_step_over_nccl(sp):
    """Every collective on CUDA tensors under NCCL (sequence parallelism's all-gathers and
    reduce-scatters, and its backward re-gather, included)."""
    import torch.multiprocessing as mp

    from ..helpers import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_nccl_tp2_step, args=(r, port, out, sp)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    losses = dict(out.get(timeout=5) for _ in range(2))
    assert losses[0] == losses[1] and 4.0 < losses[0] < 6.0, losses  # TP peers agree; ~ln(128) untrained


def test_bf16_cached_decoding_follows_the_fp32_model_at_long_positions():
    """A bf16 copy decodes positions ~1000 with the KV cache as the fp32 model's full forward does:
    the rotary angles come from integer positions in fp32 whatever ``.to(bf16)`` did."""
    torch.manual_seed(7)
    ref_net = TransformerWrapper(num_tokens=256, max_seq_len=2048, attn_layers=Decoder(
        dim=128, depth=2, heads=4, attn_dim_head=32, attn_kv_heads=2)).cuda().eval()
    seq = torch.randint(1, 256, (2, 1040), device="cuda")
    with torch.no_grad():
        ref = ref_net(seq)[:, -8:].float()
        net = ref_net.to(torch.bfloat16)
        _, cache = net(seq[:, :-8], return_intermediates=True)
        parts = []
        for end in range(seq.shape[1] - 7, seq.shape[1] + 1):
            logits, cache = net(seq[:, :end], cache=cache, return_intermediates=True)
            parts.append(logits.float())
    err = (torch.cat(parts, dim=1) - ref).abs().mean() / ref.abs().mean()
    assert err < 0.02, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_generation_on_cuda(dtype):
    """KV-cached decoding on the GPU: per-position logits equal the full forward's; greedy tokens
    equal uncached ones (fp32); sampling with a CUDA generator is reproducible."""
    torch.manual_seed(6)
    net = TransformerWrapper(num_tokens=256, max_seq_len=128, attn_layers=Decoder(
        dim=128, depth=2, heads=4, attn_dim_head=32, attn_kv_heads=2)).cuda().to(dtype).eval()
    seq = torch.randint(1, 256, (3, 40), device="cuda")
    with torch.no_grad():
        full = net(seq).float()
        logits, cache = net(seq[:, :10], return_intermediates=True)
        parts = [logits]
        for end in range(11, 41):
            logits, cache = net(seq[:, :end], cache=cache, return_intermediates=True)
            parts.append(logits)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(torch.cat(parts, dim=1).float(), full, rtol=tol, atol=tol)
    model = AutoregressiveWrapper(net)
    prompts = [torch.randint(1, 256, (n,), device="cuda") for n in (9, 4)]
    if dtype == torch.float32:
        assert torch.equal(model.generate(prompts, 20, temperature=0),
                           model.generate(prompts, 20, temperature=0, cache_kv=False))
    a = model.generate(prompts, 20, top_p=0.9, seed=3)
    assert a.is_cuda and torch.equal(a, model.generate(prompts, 20, top_p=0.9, seed=3))


def test_fused_projections_are_the_default_on_cuda():
    """On CUDA q, k and v run as one GEMM, and so do a GLU's gate and up (CPUs keep separate GEMMs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xft_dist.nn import Attention, FeedForward

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 16, 64, device="cuda")
    for module, gemms in ((Attention(64, heads=4, dim_head=16, kv_heads=2, causal=True), 2),
                          (FeedForward(64, glu=True, swish=True), 2)):
        Count.n = 0
        with Count():
            module.cuda()(x)
        assert Count.n == gemms, (type(module).__name__, Count.n)
