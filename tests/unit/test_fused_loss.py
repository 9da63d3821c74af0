"""The fused, chunked head + cross-entropy equals the unfused head + ``vocab_parallel_cross_entropy``:
values and gradients (hidden, weight), with ignore_index, label smoothing, z-loss, padded vocab
columns, an upstream gradient uniform over counted tokens (the precomputed path) and not (recompute)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xft_dist.nn import fused_head_cross_entropy, masked_loss_sum, vocab_parallel_cross_entropy

N, D, V, REAL = 37, 16, 24, 21  # 24 head rows, the last 3 are vocab padding


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64).view(1, N, D).repeat(2, 1, 1)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.5
    target = torch.randint(0, REAL, (2, N), generator=gen)
    target[0, :5] = -100
    target[1, 30:] = -100
    mask = (torch.rand(2, N, generator=gen) > 0.3).double()
    return hidden, weight, target, mask


def _run(fused: bool, *, reduce: str, chunk=None, **kw):
    hidden, weight, target, mask = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    if fused:
        losses = fused_head_cross_entropy(hidden, weight, target, vocab_size=REAL, chunk_tokens=chunk, **kw)
    else:
        losses = vocab_parallel_cross_entropy(F.linear(hidden, weight), target, vocab_size=REAL, **kw)
    if reduce == "mean":
        total, count = masked_loss_sum(losses, target)
        out = total / count
    else:  # a float loss mask: a different upstream gradient per token
        total, count = masked_loss_sum(losses, target, loss_mask=mask * torch.linspace(0.5, 1.5, N))
        out = total / count
    out.backward()
    return losses.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("reduce", ["mean", "weighted"])
@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3, "label_smoothing": 0.2}])
def test_fused_equals_unfused(reduce, chunk, kw):
    want = _run(False, reduce=reduce, **kw)
    got = _run(True, reduce=reduce, chunk=chunk, **kw)
    for name, a, b in zip(("losses", "hidden grad", "weight grad"), got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    assert got[2][REAL:].abs().max() == 0  # padded vocab rows get no gradient


def test_fp32_and_bf16_follow_the_unfused_path():
    hidden, weight, target, _ = _inputs()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        h, w = hidden.to(dtype), weight.to(dtype)
        fused = fused_head_cross_entropy(h, w, target, vocab_size=REAL, chunk_tokens=5)
        plain = vocab_parallel_cross_entropy(F.linear(h, w), target, vocab_size=REAL)
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matrix product that reaches the kernels (after autocast)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.ndim == 2)
        return func(*args, **(kwargs or {}))


def test_under_autocast_the_matmuls_run_in_its_dtype_and_match_f_linear():
    """fp32 parameters under bf16 autocast: the head's three matmuls are bf16 (as F.linear's would
    be: tensor cores on a GPU), the gradients come back fp32 and match the unfused path's."""
    hidden, weight, target, _ = _inputs()
    grads, seen = [], set()
    for fused in (True, False):
        h = hidden.float().requires_grad_(True)
        w = weight.float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                with _MatmulDtypes() as spy:
                    losses = fused_head_cross_entropy(h, w, target, vocab_size=REAL, chunk_tokens=9)
                seen = spy.seen
            else:
                losses = vocab_parallel_cross_entropy(F.linear(h, w), target, vocab_size=REAL)
        total, count = masked_loss_sum(losses, target)
        (total / count).backward()
        grads.append((losses.detach(), h.grad, w.grad))
    assert seen == {torch.bfloat16}, seen  # forward and both gradient matmuls
    for got, ref in zip(*grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)


def test_bad_input_is_named():
    hidden, weight, target, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        fused_head_cross_entropy(hidden, weight, target, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"weight \(24, 8\): expected \[vocab shard, 16\]"):
        fused_head_cross_entropy(hidden, weight[:, :8], target)
    with pytest.raises(ValueError, match="target id 30 is outside the vocabulary"):
        fused_head_cross_entropy(hidden, weight, torch.full_like(target, 30), vocab_size=REAL)


@pytest.mark.parametrize("tie", [True, False])
def test_wrapper_fused_loss_equals_unfused_tied_and_untied(tie):
    from xft_dist import AutoregressiveWrapper, Decoder, TransformerWrapper

    seq = torch.randint(1, 40, (3, 19), generator=torch.Generator().manual_seed(1))
    seq[2, 12:] = 0  # padding: never trained on
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        net = TransformerWrapper(num_tokens=40, max_seq_len=32, tie_embedding=tie,
                                 attn_layers=Decoder(dim=16, depth=1, heads=2, attn_dim_head=8))
        model = AutoregressiveWrapper(net, fused_loss=fused, loss_chunk_tokens=7, label_smoothing=0.1, z_loss=1e-3)
        loss = model(seq)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
