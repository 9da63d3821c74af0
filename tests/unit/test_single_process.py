"""The TP building blocks without a process group (``group=None``) are plain torch math."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xft_dist.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    masked_loss_sum,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)
from xft_dist.parallel import ParallelGroups, RNGStreams, capture_rng_state, restore_rng_state, seed_all


def test_unsplit_layers_are_linear_and_embedding():
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(5, 7), RowParallelLinear(7, 3, bias=False)
    emb = VocabParallelEmbedding(9, 5)
    x = torch.randn(2, 5)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
    assert torch.equal(row(col(x)), F.linear(col(x), row.weight))
    ids = torch.tensor([[0, 8, 3]])
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    assert not any(getattr(p, "tensor_model_parallel", False) for m in (col, row, emb) for p in m.parameters())
    assert row.bias is None and col.bias.abs().sum() == 0


def test_default_init_is_seeded_normal():
    torch.manual_seed(0)
    a = ColumnParallelLinear(64, 64).weight
    torch.manual_seed(0)
    b = ColumnParallelLinear(64, 64).weight
    assert torch.equal(a, b)
    assert 0.015 < a.std().item() < 0.025


def test_padded_vocab_size():
    assert padded_vocab_size(11, 2) == 12
    assert padded_vocab_size(11, 1) == 11
    assert padded_vocab_size(50257, 2, pad_to_multiple_of=64) == 50304
    with pytest.raises(ValueError, match="num_embeddings=0"):
        padded_vocab_size(0, 2)


def test_embedding_rejects_bad_ids():
    emb = VocabParallelEmbedding(9, 4)
    with pytest.raises(ValueError, match=r"token id 9 is outside the vocabulary \[0, 9\)"):
        emb(torch.tensor([1, 9]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([1.0]))
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 4)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_unsplit_cross_entropy_matches_torch_and_ignores_padding_columns(smoothing):
    torch.manual_seed(1)
    full = torch.randn(3, 4, 10)
    target = torch.randint(0, 10, (3, 4))
    target[0, 0] = -100
    padded = torch.cat([full, torch.full((3, 4, 2), 30.0)], -1).requires_grad_()
    ref_in = full.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(padded, target, vocab_size=10, label_smoothing=smoothing)
    ref = F.cross_entropy(ref_in.transpose(1, 2), target, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(padded.grad[..., :10], ref_in.grad)
    assert torch.count_nonzero(padded.grad[..., 10:]) == 0


def test_cross_entropy_errors():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss=-1"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), z_loss=-1)
    with pytest.raises(ValueError, match="target id 5"):
        vocab_parallel_cross_entropy(logits, torch.full((2, 3), 5))
    loss = vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_cross_entropy_does_not_modify_fp32_logits():
    logits = torch.randn(4, 7)
    before = logits.clone()
    vocab_parallel_cross_entropy(logits, torch.arange(4))
    assert torch.equal(logits, before)


def test_masked_loss_sum():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]])
    target = torch.tensor([[1, 1, 1], [1, -100, 1]])
    mask = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    s, n = masked_loss_sum(losses, target, loss_mask=mask)
    assert s.item() == 1 + 1 + 4 + 6 and n.item() == 1 + 0.5 + 1 + 1
    with pytest.raises(ValueError, match="loss_mask"):
        masked_loss_sum(losses, loss_mask=torch.ones(3))


def test_single_groups_and_build_without_world():
    g = ParallelGroups.single()
    assert (g.tp_size, g.dp_size, g.tp_group, g.dp_group) == (1, 1, None, None)
    mpu = g.mpu()
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_data_parallel_rank() == 0
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelGroups.build(tp_size=1)


def test_capture_restore_covers_python_numpy_torch_and_streams():
    streams = seed_all(7)
    state = capture_rng_state(streams)

    def draws():
        with streams.fork():
            s = torch.rand(2)
        return random.random(), np.random.rand(), torch.rand(2), s

    first = draws()
    restore_rng_state(state, streams)
    second = draws()
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    with pytest.raises(ValueError, match="RNGStreams"):
        restore_rng_state(state)


def test_stream_fork_rules():
    streams = RNGStreams()
    streams.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        streams.add("a", 2)
    with pytest.raises(KeyError, match="unknown RNG stream 'b'"):
        with streams.fork("b"):
            pass
    with streams.fork("a"):
        with pytest.raises(RuntimeError, match="nested"):
            with streams.fork("a"):
                pass
    # forking a stream does not advance the default generator
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with streams.fork("a"):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)
