"""Tensor-parallel layers, collectives and loss at TP=2 (2 ranks) and TP=2 x DP=2 (4 ranks),
each compared with the unsplit single-process computation on the same seed and batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from xft_dist.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    masked_loss_sum,
    vocab_parallel_cross_entropy,
)
from xft_dist.parallel import (
    ParallelGroups,
    capture_rng_state,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    restore_rng_state,
    scatter_to_tp,
    seed_all,
)

from .common import TPMLP, TinyLM, assert_close, tp_shard
from .harness import CheckSet

TP2 = CheckSet(world_size=2)
TP2_DP2 = CheckSet(world_size=4)


def _groups(tp_size: int) -> ParallelGroups:
    return ParallelGroups.build(tp_size=tp_size)


def _gather_all(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


# ---------------------------------------------------------------------------------------- TP = 2

@TP2.check
def groups_tp2():
    g = _groups(2)
    r = dist.get_rank()
    assert (g.tp_rank, g.tp_size, g.dp_rank, g.dp_size) == (r, 2, 0, 1), g
    mpu = g.mpu()
    assert mpu.get_model_parallel_rank() == r and mpu.get_model_parallel_world_size() == 2
    assert mpu.get_data_parallel_rank() == 0 and mpu.get_data_parallel_world_size() == 1
    assert dist.get_world_size(mpu.get_model_parallel_group()) == 2
    with pytest.raises(ValueError, match="tp_size=3"):
        ParallelGroups.build(tp_size=3)


@TP2.check
def collectives_forward_and_backward():
    g = _groups(2)
    r, grp = g.tp_rank, g.tp_group
    # copy: identity forward, gradients summed over TP ranks
    x = torch.ones(3, requires_grad=True)
    (copy_to_tp(x, grp) * (r + 1)).sum().backward()
    assert_close(x.grad, torch.full((3,), 3.0), "copy_to_tp grad")
    # reduce: sum forward, identity backward
    x = torch.full((3,), float(r + 1), requires_grad=True)
    y = reduce_from_tp(x, grp)
    assert_close(y, torch.full((3,), 3.0), "reduce_from_tp forward")
    (y * 2).sum().backward()
    assert_close(x.grad, torch.full((3,), 2.0), "reduce_from_tp grad")
    assert_close(x, torch.full((3,), float(r + 1)), "reduce_from_tp leaves its input alone")
    # scatter: own chunk forward, gathered gradients backward
    x = torch.arange(8.0, requires_grad=True)
    y = scatter_to_tp(x, grp, dim=0)
    assert_close(y, torch.arange(4.0) + 4 * r, "scatter_to_tp forward")
    (y * (r + 1)).sum().backward()
    assert_close(x.grad, torch.tensor([1.0] * 4 + [2.0] * 4), "scatter_to_tp grad")
    # gather: concatenation forward, own chunk of the gradient backward
    x = (torch.arange(6.0).reshape(2, 3) + 10 * r).requires_grad_()
    y = gather_from_tp(x, grp, dim=-1)
    assert_close(y, torch.cat([torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3) + 10], -1),
                 "gather_from_tp forward")
    w = torch.arange(12.0).reshape(2, 6)
    (y * w).sum().backward()
    assert_close(x.grad, w[:, 3 * r: 3 * r + 3], "gather_from_tp grad")
    with pytest.raises(ValueError, match="evenly"):
        scatter_to_tp(torch.zeros(5), grp, dim=0)


@TP2.check
def column_row_mlp_tp2():
    g = _groups(2)
    torch.manual_seed(0)
    ref = TPMLP(8, 32)
    torch.manual_seed(0)
    tp = TPMLP(8, 32, group=g.tp_group)
    x = torch.randn(3, 5, 8)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_tp = ref(x_ref), tp(x_tp)
    assert_close(y_tp, y_ref, "MLP output")
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    (y_tp * w).sum().backward()
    assert_close(x_tp.grad, x_ref.grad, "MLP input grad")
    for (name, p_ref), p_tp in zip(ref.named_parameters(), tp.parameters()):
        assert_close(p_tp, tp_shard(p_ref.detach(), p_tp, g), f"{name} value")
        assert_close(p_tp.grad, tp_shard(p_ref.grad, p_tp, g), f"{name} grad")


@TP2.check
def gathered_column_and_split_row_input():
    g = _groups(2)
    torch.manual_seed(1)
    col = ColumnParallelLinear(6, 10, group=g.tp_group, gather_output=True)
    row = RowParallelLinear(10, 4, group=g.tp_group, input_is_parallel=False)
    torch.manual_seed(1)
    col_ref, row_ref = ColumnParallelLinear(6, 10), RowParallelLinear(10, 4)
    x = torch.randn(7, 6)
    assert_close(row(col(x)), row_ref(col_ref(x)), "gathered column -> full-input row")
    assert_close(col_ref(x), F.linear(x, col_ref.weight, col_ref.bias), "unsplit column is nn.Linear")
    with pytest.raises(ValueError, match="out_features=9"):
        ColumnParallelLinear(6, 9, group=g.tp_group)


@TP2.check
def vocab_parallel_embedding_tp2():
    g = _groups(2)
    vocab, dim = 11, 6  # 11 is not divisible by 2: padded to 12, one padded row on rank 1
    torch.manual_seed(2)
    emb = VocabParallelEmbedding(vocab, dim, group=g.tp_group)
    assert emb.padded_num_embeddings == 12 and emb.weight.shape == (6, dim)
    full = torch.cat(_gather_all(emb.weight.detach(), g.tp_group))[:vocab]
    torch.manual_seed(2)
    assert_close(full, VocabParallelEmbedding(vocab, dim).weight.detach(), "full weight, TP2 vs TP1")
    ref = torch.nn.Embedding(vocab, dim)
    with torch.no_grad():
        ref.weight.copy_(full)
    ids = torch.tensor([[0, 5, 6, 10, 10], [3, 3, 7, 1, 9]])
    out, out_ref = emb(ids), ref(ids)
    assert_close(out, out_ref, "embedding forward")
    w = torch.randn_like(out_ref)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    assert_close(emb.weight.grad, tp_shard(ref.weight.grad, emb.weight, g), "embedding weight grad")
    if g.tp_rank == 1:
        assert torch.count_nonzero(emb.weight.grad[-1]) == 0, "padded row received gradient"
    for bad in (11, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            emb(torch.tensor([[1, bad]]))


@TP2.check
def tied_head_logits_tp2():
    g = _groups(2)
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(11, 6, group=g.tp_group)
    torch.manual_seed(3)
    ref = VocabParallelEmbedding(11, 6)
    h = torch.randn(2, 3, 6)
    shard = emb.logits(h)
    full_ref = h @ ref.weight.detach().T
    assert shard.shape == (2, 3, 6)
    assert_close(emb.logits(h, gather=True)[..., :11], full_ref, "gathered tied logits")
    padded_ref = torch.cat([full_ref, full_ref.new_zeros(2, 3, 1)], -1)  # 11 -> 12 columns
    assert_close(shard, padded_ref[..., 6 * g.tp_rank: 6 * g.tp_rank + 6], "tied logits shard")


@TP2.check
def same_full_weights_at_any_tp_size_and_marks():
    g = _groups(2)
    torch.manual_seed(4)
    ref = TinyLM(37, 16, 32)
    torch.manual_seed(4)
    tp = TinyLM(37, 16, 32, group=g.tp_group)
    for (name, p_ref), p_tp in zip(ref.named_parameters(), tp.parameters()):
        split = p_ref.shape != p_tp.shape
        assert getattr(p_tp, "tensor_model_parallel", False) == split, f"{name}: mark != split"
        assert not getattr(p_ref, "tensor_model_parallel", False), f"{name}: unsplit param marked"
        if split:
            expected_dim = {"emb.weight": 0, "up.weight": 0, "up.bias": 0, "down.weight": 1}[name]
            assert p_tp.partition_dim == expected_dim, f"{name}: partition_dim {p_tp.partition_dim}"
        assert_close(p_tp, tp_shard(p_ref.detach(), p_tp, g), f"{name}: TP2 shard of the TP1 weight")


def _ce_case(vocab=13, shape=(4, 6), seed=5, dtype=torch.float32):
    """Full logits over the real vocab, plus this rank's shard of the padded logits."""
    g = _groups(2)
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(*shape, vocab, generator=gen) * 3).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    padded = -(-vocab // 2) * 2
    # Padding columns hold a huge logit: if they received any mass the losses would be far off.
    padded_full = torch.cat([full, torch.full((*shape, padded - vocab), 50.0, dtype=dtype)], -1)
    local = padded // 2
    shard = padded_full[..., g.tp_rank * local:(g.tp_rank + 1) * local].clone()
    return g, full, target, shard, local


def _ce_compare(g, full, target, shard, local, what, ref_fn, tp_kwargs, rtol=1e-5, atol=1e-6):
    full = full.clone().requires_grad_()
    shard = shard.clone().requires_grad_()
    ref = ref_fn(full, target)
    loss = vocab_parallel_cross_entropy(shard, target, group=g.tp_group, vocab_size=full.shape[-1], **tp_kwargs)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert_close(loss, ref.float(), f"{what}: per-token losses", rtol=rtol, atol=atol)
    w = torch.rand(target.shape, generator=torch.Generator().manual_seed(9))
    (ref * w).sum().backward()
    (loss * w).sum().backward()
    ref_grad = torch.cat([full.grad, full.grad.new_zeros(*full.shape[:-1], local * 2 - full.shape[-1])], -1)
    assert shard.grad.dtype == shard.dtype
    assert_close(shard.grad, ref_grad[..., g.tp_rank * local:(g.tp_rank + 1) * local],
                 f"{what}: logit grads", rtol=rtol, atol=atol)
    if g.tp_rank == 1:
        assert torch.count_nonzero(shard.grad[..., full.shape[-1] - local:]) == 0, "padded column got grad"
    return loss


def _ref_ce(**kw):
    return lambda logits, target: F.cross_entropy(logits.float().transpose(1, -1), target, reduction="none", **kw)


@TP2.check
def cross_entropy_matches_torch():
    _ce_compare(*_ce_case(), "plain", _ref_ce(), {})


@TP2.check
def cross_entropy_ignore_index():
    g, full, target, shard, local = _ce_case(seed=6)
    target[0, :3] = -100
    target[2, 4] = -100
    loss = _ce_compare(g, full, target, shard, local, "ignore -100", _ref_ce(ignore_index=-100), {})
    assert torch.all(loss[target == -100] == 0)
    pad_target = target.clamp(min=0)
    pad_target[1, 2:] = 0  # pad id 0 doubles as ignore_index, as users of a pad token do
    _ce_compare(g, full, pad_target, shard, local, "ignore pad=0", _ref_ce(ignore_index=0), {"ignore_index": 0})


@TP2.check
def cross_entropy_float_loss_mask():
    g, full, target, shard, local = _ce_case(seed=7)
    target[3, :] = -100
    mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(8))
    shard = shard.clone().requires_grad_()
    full = full.clone().requires_grad_()
    s, n = masked_loss_sum(vocab_parallel_cross_entropy(shard, target, group=g.tp_group, vocab_size=13),
                           target, loss_mask=mask)
    ref_losses = F.cross_entropy(full.transpose(1, -1), target, reduction="none")
    weight = mask * (target != -100)
    s_ref, n_ref = (ref_losses * weight).sum(), weight.sum()
    assert_close(n, n_ref, "masked count")
    assert_close(s, s_ref, "masked sum")
    (s / n).backward()
    (s_ref / n_ref).backward()
    padded_grad = torch.cat([full.grad, full.grad.new_zeros(*target.shape, 1)], -1)
    assert_close(shard.grad, padded_grad[..., g.tp_rank * local:(g.tp_rank + 1) * local], "masked mean grads")


@TP2.check
def cross_entropy_label_smoothing():
    g, full, target, shard, local = _ce_case(seed=10)
    target[1, 1] = -100
    _ce_compare(g, full, target, shard, local, "label smoothing 0.1",
                _ref_ce(label_smoothing=0.1), {"label_smoothing": 0.1})


@TP2.check
def cross_entropy_z_loss():
    g, full, target, shard, local = _ce_case(seed=11)
    target[0, 0] = -100
    z = 1e-2

    def ref(logits, t):
        ce = F.cross_entropy(logits.transpose(1, -1), t, reduction="none")
        return (ce + z * torch.logsumexp(logits, dim=-1).square()).masked_fill(t == -100, 0.0)

    _ce_compare(g, full, target, shard, local, "z_loss", ref, {"z_loss": z})
    _ce_compare(g, full, target, shard, local, "z_loss + smoothing",
                lambda lg, t: ref(lg, t) - F.cross_entropy(lg.transpose(1, -1), t, reduction="none")
                + F.cross_entropy(lg.transpose(1, -1), t, reduction="none", label_smoothing=0.2),
                {"z_loss": z, "label_smoothing": 0.2})


@TP2.check
def cross_entropy_bf16_logits():
    g, full, target, shard, local = _ce_case(seed=12, dtype=torch.bfloat16)
    # The math runs in fp32 on the bf16 values: the loss matches fp32 torch on the same values.
    # Grads come back in bf16, compared with the fp32 reference at bf16 precision.
    _ce_compare(g, full, target, shard, local, "bf16", _ref_ce(), {}, rtol=1.6e-2, atol=1e-3)


@TP2.check
def cross_entropy_every_target_ignored():
    g, full, target, shard, local = _ce_case(seed=13)
    target[:] = -100
    shard = shard.clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(shard, target, group=g.tp_group, vocab_size=13)
    s, n = masked_loss_sum(losses, target)
    assert s.item() == 0.0 and n.item() == 0.0
    (s / n.clamp(min=1)).backward()
    assert torch.isfinite(losses).all() and torch.isfinite(shard.grad).all()
    assert torch.count_nonzero(shard.grad) == 0


@TP2.check
def cross_entropy_rejects_bad_targets():
    g, full, target, shard, local = _ce_case(seed=14)
    target[0, 0] = 13  # a padded column, not a real token
    with pytest.raises(ValueError, match="target id 13 is outside the vocabulary"):
        vocab_parallel_cross_entropy(shard, target, group=g.tp_group, vocab_size=13)
    with pytest.raises(ValueError, match="vocab_size=15"):
        vocab_parallel_cross_entropy(shard, target, group=g.tp_group, vocab_size=15)


@TP2.check
def rng_streams_tp2():
    g = _groups(2)
    streams = seed_all(42, tp_rank=g.tp_rank)
    a = torch.randn(5)
    with streams.fork():
        b = torch.randn(5)
    c = torch.randn(5)
    a_all, b_all, c_all = _gather_all(a), _gather_all(b), _gather_all(c)
    assert torch.equal(a_all[0], a_all[1]), "default stream must be shared across TP ranks"
    assert torch.equal(c_all[0], c_all[1]), "fork must not advance the default stream differently"
    assert not torch.equal(b_all[0], b_all[1]), "TP stream must differ across TP ranks"
    # capture everything, draw, restore, draw again: identical, streams included
    state = capture_rng_state(streams)
    first = [torch.randn(3)]
    with streams.fork():
        first.append(torch.rand(3))
    restore_rng_state(state, streams)
    second = [torch.randn(3)]
    with streams.fork():
        second.append(torch.rand(3))
    for x, y in zip(first, second):
        assert torch.equal(x, y), "restore_rng_state did not replay the same draws"


@pytest.fixture(scope="module")
def tp2_report():
    return TP2.run()


@pytest.mark.parametrize("name", TP2.names())
def test_tp2(tp2_report, name):
    tp2_report.assert_passed(name)


# ---------------------------------------------------------------------------------- TP 2 x DP 2

@TP2_DP2.check
def groups_tp2_dp2():
    g = _groups(2)
    r = dist.get_rank()
    assert (g.tp_rank, g.dp_rank, g.tp_size, g.dp_size) == (r % 2, r // 2, 2, 2), g
    tp_peers = _gather_all(torch.tensor([r]), g.tp_group)
    dp_peers = _gather_all(torch.tensor([r]), g.dp_group)
    assert [int(t) for t in tp_peers] == [r - r % 2, r - r % 2 + 1], tp_peers
    assert [int(t) for t in dp_peers] == [r % 2, r % 2 + 2], dp_peers
    mpu = g.mpu()
    assert (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()) == (r % 2, r // 2)
    assert mpu.get_data_parallel_group() is g.dp_group


@TP2_DP2.check
def column_row_mlp_tp2_dp2():
    g = _groups(2)
    torch.manual_seed(0)
    ref = TPMLP(8, 32)
    torch.manual_seed(0)
    tp = TPMLP(8, 32, group=g.tp_group)
    x = torch.randn(8, 5, 8)  # global batch; DP rank d takes rows [4d, 4d + 4)
    w = torch.randn(8, 5, 8)
    rows = slice(4 * g.dp_rank, 4 * g.dp_rank + 4)
    y_ref = ref(x)
    (y_ref * w).sum().backward()
    y_tp = tp(x[rows])
    assert_close(y_tp, y_ref[rows].detach(), "MLP output rows")
    (y_tp * w[rows]).sum().backward()
    for (name, p_ref), p_tp in zip(ref.named_parameters(), tp.parameters()):
        dist.all_reduce(p_tp.grad, group=g.dp_group)  # what data parallelism does
        assert_close(p_tp.grad, tp_shard(p_ref.grad, p_tp, g), f"{name} grad summed over DP")


@TP2_DP2.check
def tiny_lm_global_token_mean_tp2_dp2():
    g = _groups(2)
    torch.manual_seed(1)
    ref = TinyLM(37, 16, 32)
    torch.manual_seed(1)
    tp = TinyLM(37, 16, 32, group=g.tp_group)
    ids = torch.randint(0, 37, (8, 9))
    targets = torch.randint(0, 37, (8, 9))
    targets[0, 4:] = -100   # uneven padding: DP rank 0 has fewer real tokens than rank 1
    targets[1, 1:] = -100
    s_ref, n_ref = ref.loss_sums(ids, targets)
    (s_ref / n_ref).backward()
    rows = slice(4 * g.dp_rank, 4 * g.dp_rank + 4)
    s, n = tp.loss_sums(ids[rows], targets[rows])
    total = n.detach().clone()
    dist.all_reduce(total, group=g.dp_group)
    (s / total).backward()  # normalised by the global token count, then summed over DP
    loss = s.detach().clone()
    dist.all_reduce(loss, group=g.dp_group)
    assert_close(loss / total, (s_ref / n_ref).detach(), "global-token mean loss")
    for (name, p_ref), p_tp in zip(ref.named_parameters(), tp.parameters()):
        dist.all_reduce(p_tp.grad, group=g.dp_group)
        assert_close(p_tp.grad, tp_shard(p_ref.grad, p_tp, g), f"{name} grad")


@pytest.fixture(scope="module")
def tp2_dp2_report():
    return TP2_DP2.run()


@pytest.mark.parametrize("name", TP2_DP2.names())
def test_tp2_dp2(tp2_dp2_report, name):
    tp2_dp2_report.assert_passed(name)
