"""What only a GPU run would show, proved on the CPU: rotary angles exact at any module dtype, the
fused head + loss doing forward work only without autograd, bf16 decoding at long positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xft_dist import AutoregressiveWrapper, Decoder, TransformerWrapper
from xft_dist.nn import RotaryEmbedding, fused_head_cross_entropy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_angles_are_exact_after_a_cast_of_the_module(dtype):
    pos = torch.arange(4096).unsqueeze(0)
    ref_cos, ref_sin = RotaryEmbedding(64)(pos)
    cos, sin = RotaryEmbedding(64).to(dtype)(pos)  # what model.to(bf16) does to every submodule
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def _lm(vocab=101):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=vocab, max_seq_len=2048,
                             attn_layers=Decoder(dim=64, depth=2, heads=4, attn_dim_head=16))
    return AutoregressiveWrapper(net)


def test_bf16_decoding_at_long_positions_follows_the_fp32_model():
    """A bf16 copy of the model decodes at position ~1000 as the fp32 model does, up to bf16's
    rounding of the weights (0.006 mean relative error here); with the angle table rounded to bf16
    it was twice that (0.012)."""
    model = _lm()
    seq = torch.randint(1, 101, (1, 1040))
    with torch.no_grad():
        ref = model.net(seq)[:, -16:].float()
        low = model.to(torch.bfloat16).net(seq)[:, -16:].float()
    err = (low - ref).abs().mean() / ref.abs().mean()
    assert err < 0.009, err


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.aten.matmul,
                                   torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_fused_loss_without_autograd_does_only_the_forward_matmuls(mode):
    torch.manual_seed(1)
    hidden = torch.randn(96, 32, requires_grad=mode != "no_requires_grad")
    weight = torch.randn(50, 32, requires_grad=mode != "no_requires_grad")
    target = torch.randint(0, 50, (96,))
    ref = fused_head_cross_entropy(hidden.detach(), weight.detach(), target, chunk_tokens=32)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_requires_grad": torch.enable_grad}[mode]
    with ctx(), _CountMatmuls() as counter:
        losses = fused_head_cross_entropy(hidden, weight, target, chunk_tokens=32)
    assert counter.count == 3, f"{counter.count} matmuls for 3 chunks: gradient work without autograd"
    assert not losses.requires_grad
    torch.testing.assert_close(losses, ref, rtol=0, atol=0)


def test_fused_loss_with_autograd_still_makes_its_gradients_in_the_forward():
    hidden = torch.randn(96, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    with _CountMatmuls() as counter:
        losses = fused_head_cross_entropy(hidden, weight, torch.randint(0, 50, (96,)), chunk_tokens=32)
    assert counter.count == 9 and losses.requires_grad  # logits, grad_h, grad_w per chunk


def test_one_gpu_per_task_gives_every_local_rank_the_device_it_sees(monkeypatch):
    from xft_dist.runtime import DistEnv
    from xft_dist.runtime.world import rank_device

    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM --gpus-per-task=1: one visible GPU
    assert rank_device(env, "cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert rank_device(env, "cuda") == torch.device("cuda", 3)
    assert rank_device(env, "cpu") == torch.device("cpu")


def test_bf16_on_a_gpu_without_bf16_kernels_is_refused_naming_it(monkeypatch):
    from xft_dist.config import ConfigError, load_config
    from xft_dist.config.deepspeed import check_precision

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", ["train.precision=bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true there, by emulation
    with pytest.raises(ConfigError, match=r"train.precision=bf16: Tesla V100-SXM2-16GB \(compute capability 7.0\) "
                                          "has no bf16 kernels"):
        check_precision(cfg, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_precision(cfg, "cuda")


def test_tf32_for_fp32_matmuls_on_gpu_ranks_only():
    from xft_dist.runtime.world import matmul_precision

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        matmul_precision(torch.device("cpu"), allow_tf32=True)
        assert torch.get_float32_matmul_precision() == "highest"  # CPU ranks: untouched
        matmul_precision(torch.device("cuda", 0), allow_tf32=True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        matmul_precision(torch.device("cuda", 0), allow_tf32=False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_attention_reads_kv_heads_without_repeating_them(masked):
    from xft_dist.nn import Attention

    torch.manual_seed(2)
    attn = Attention(64, heads=8, dim_head=8, kv_heads=2, causal=True)
    x = torch.randn(2, 12, 64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    with _OpNames() as ops:
        out = attn(x, mask=mask if masked else None)
    assert not [n for n in ops.names if "repeat" in n or n == "expand"], ops.names
    # the same numbers as attention over repeated heads
    q = attn.to_q(x).view(2, 12, 8, 8).transpose(1, 2)
    k = attn.to_k(x).view(2, 12, 2, 8).transpose(1, 2).repeat_interleave(4, dim=1)
    v = attn.to_v(x).view(2, 12, 2, 8).transpose(1, 2).repeat_interleave(4, dim=1)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    full = causal & mask[:, None, None, :] if masked else causal
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full)
    ref = attn.to_out(ref.transpose(1, 2).reshape(2, 12, 64))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_the_fused_loss_chunk_rule():
    from xft_dist.nn.fused_loss import default_chunk

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert default_chunk(16384, 50304, gpu) == (1 << 27) // 50304 == 2668  # the 128 M-logit budget
    assert default_chunk(1000, 50304, gpu) == 1000                           # all tokens in one chunk
    assert default_chunk(16384, 50304, cpu) == 1024                          # 1/16 of the tokens on a CPU
    assert default_chunk(10, 8192, cpu) == 1 and default_chunk(1, 1 << 28, gpu) == 1


def _matmuls(fn) -> int:
    with _CountMatmuls() as counter:
        fn()
    return counter.count


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_q_k_and_v_are_one_gemm_and_gate_and_up_another(kv_heads, monkeypatch):
    """With the fusion on (CUDA's default; forced here): self-attention runs 2 GEMMs (q, k, v
    together; the output), cross-attention 3 (q; k and v together; the output), a GLU feed-forward
    2 (gate and up together; down); the parameters keep their names, and every output equals the
    separate GEMMs' (the CPU default)."""
    from xft_dist.nn import Attention, FeedForward, attention, mlp
    from xft_dist.nn.linear import fused_column

    torch.manual_seed(3)
    attn = Attention(32, heads=4, dim_head=8, kv_heads=kv_heads, causal=True)
    cross = Attention(32, heads=4, dim_head=8, kv_heads=kv_heads, dim_context=48)
    ff = FeedForward(32, glu=True, swish=True)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 48)
    separate = [attn(x), cross(x, context=ctx), ff(x)]
    assert [_matmuls(lambda: attn(x)), _matmuls(lambda: cross(x, context=ctx)), _matmuls(lambda: ff(x))] == [4, 4, 3]
    always = lambda x, layers: fused_column(x, layers, fuse=True)  # noqa: E731
    monkeypatch.setattr(attention, "fused_column", always)
    monkeypatch.setattr(mlp, "fused_column", always)
    assert [_matmuls(lambda: attn(x)), _matmuls(lambda: cross(x, context=ctx)), _matmuls(lambda: ff(x))] == [2, 3, 2]
    for got, want in zip([attn(x), cross(x, context=ctx), ff(x)], separate):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert {"to_q.weight", "to_k.weight", "to_v.weight"} <= set(attn.state_dict())
    assert {"gate.weight", "up.weight", "down.weight"} <= set(ff.state_dict())
