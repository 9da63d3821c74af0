"""Small TP models and helpers shared by the distributed tests (single-process references included)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from xft_dist.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    masked_loss_sum,
    vocab_parallel_cross_entropy,
)
from xft_dist.parallel import ParallelGroups


class TPMLP(nn.Module):
    """Column -> GELU -> Row, the Megatron MLP; ``group=None`` is the unsplit reference."""

    def __init__(self, dim: int, hidden: int, group=None):
        super().__init__()
        self.up = ColumnParallelLinear(dim, hidden, group=group)
        self.down = RowParallelLinear(hidden, dim, group=group)
        # Nonzero biases (zero at init) so the test sees how each kind of bias is handled.
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            self.up.bias.copy_(tp_shard(torch.randn(hidden, generator=gen) * 0.1, self.up.bias, group))
            self.down.bias.copy_(torch.randn(dim, generator=gen) * 0.1)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> TP MLP (residual) -> tied vocab-parallel head."""

    def __init__(self, vocab: int, dim: int, hidden: int, group=None):
        super().__init__()
        self.group = group
        self.emb = VocabParallelEmbedding(vocab, dim, group=group)
        self.norm = nn.LayerNorm(dim)
        self.up = ColumnParallelLinear(dim, hidden, group=group)
        self.down = RowParallelLinear(hidden, dim, group=group)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        return self.emb.logits(h)

    def loss_sums(self, ids, targets, ignore_index=-100):
        losses = vocab_parallel_cross_entropy(self(ids), targets, group=self.group,
                                              vocab_size=self.emb.num_embeddings,
                                              ignore_index=ignore_index)
        return masked_loss_sum(losses, targets, ignore_index=ignore_index)


def tp_shard(full: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of a reference tensor, split the way ``param`` is (rows may be padded).

    ``group`` is the TP process group (or a ``ParallelGroups``); replicated params get ``full``.
    """
    if isinstance(group, ParallelGroups):
        group = group.tp_group
    if group is None or not getattr(param, "tensor_model_parallel", False):
        return full
    tp_rank, tp_size = dist.get_rank(group), dist.get_world_size(group)
    dim = param.partition_dim
    local = param.shape[dim]
    padded = local * tp_size
    if full.shape[dim] < padded:  # zero-padded vocabulary rows
        pad = list(full.shape)
        pad[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return full.narrow(dim, tp_rank * local, local)


def assert_close(actual, expected, what, rtol=1e-5, atol=1e-6):
    __tracebackhide__ = True
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        raise AssertionError(f"{what} (rank {dist.get_rank()}): {e}") from None


def compare_grads(ref: nn.Module, tp: nn.Module, groups, what: str, rtol=1e-4, atol=1e-6) -> None:
    """Every parameter's gradient in ``tp`` is this rank's slice of the reference's."""
    for (name, p_ref), (name_tp, p_tp) in zip(ref.named_parameters(), tp.named_parameters()):
        assert name == name_tp, (name, name_tp)
        assert p_tp.grad is not None, f"{what}: no gradient for {name}"
        assert_close(p_tp.grad, tp_shard(p_ref.grad, p_tp, groups), f"{what}: grad of {name}", rtol=rtol, atol=atol)


def assert_same_step(ref: nn.Module, tp: nn.Module, groups, inputs: tuple, what: str) -> None:
    """The same loss on ``inputs`` and, after the backward, the same gradients (sliced)."""
    loss_ref, loss_tp = ref(*inputs), tp(*inputs)
    assert_close(loss_tp, loss_ref, f"{what}: loss")
    loss_ref.backward()
    loss_tp.backward()
    compare_grads(ref, tp, groups, what)


def encdec_pair(groups, seed: int = 1, vocab: int = 61, **extra):
    """The TP=1 reference and the ``groups`` copy of one small encoder-decoder (a 64-wide encoder
    feeding a 32-wide decoder), drawn from the same seed."""
    from xft_dist import EncoderDecoder

    kw = dict(num_tokens=vocab, dim=32, enc_dim=64, enc_depth=2, dec_depth=2, heads=4, attn_dim_head=8,
              enc_max_seq_len=16, dec_max_seq_len=16)
    torch.manual_seed(seed)
    ref = EncoderDecoder(**kw)
    torch.manual_seed(seed)
    return ref, EncoderDecoder(groups=groups, **kw, **extra)


def dense_backend(model: nn.Module) -> nn.Module:
    """Every attention of ``model`` on the dense-mask SDPA path (the reference for the varlen one)."""
    from xft_dist.nn import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = "sdpa"
    return model
