"""Sequence parallelism and selective recomputation in the model family (2 gloo ranks, TP=2).

With ``sequence_parallel=True`` the residual stream and the norms hold half of the sequence per TP
rank; the logits, loss and every gradient (norms' and row-parallel biases' included, which SP sums
over the TP ranks) must still equal the TP=1 model's. Dropout regions are unchanged by SP, so with
dropout the SP model equals the TP=2 model without SP exactly. The trainer-level parity under
DeepSpeed ZeRO 1-3 is in ``test_train_parity.py``.
"""

from __future__ import annotations

import pytest
import torch

from xft_dist import AutoregressiveWrapper, Decoder, TransformerWrapper
from xft_dist.parallel import CollectiveLedger, ParallelGroups, capture_rng_state, restore_rng_state, seed_all

from .common import assert_close, assert_same_step, compare_grads, dense_backend, encdec_pair, tp_shard
from .harness import CheckSet

TP2 = CheckSet(world_size=2)
VOCAB = 61


def _decoder_lm(groups=None, **kw):
    layers = Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, attn_kv_heads=2, ff_glu=True, ff_swish=True,
                     use_rmsnorm=True, groups=groups, **kw)
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=layers)


def _lm_pair(g, seed, **kw):
    torch.manual_seed(seed)
    ref = _decoder_lm(**kw)
    torch.manual_seed(seed)
    sp = _decoder_lm(g, sequence_parallel=True, **kw)
    return ref, sp


@TP2.check
def decoder_lm_sequence_parallel_matches_tp1():
    g = ParallelGroups.build(tp_size=2)
    for every in (0, 1, "selective"):
        ref, sp = _lm_pair(g, 0, activation_checkpointing=every)
        seq = torch.randint(1, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))  # 12 inputs
        seq[1, 8:] = 0
        mask = seq != 0
        assert_close(sp(seq, mask=mask, gather_logits=True), ref(seq, mask=mask), f"ckpt={every}: logits")
        loss_ref, loss_sp = AutoregressiveWrapper(ref)(seq, mask=mask), AutoregressiveWrapper(sp)(seq, mask=mask)
        assert_close(loss_sp, loss_ref, f"ckpt={every}: loss")
        loss_ref.backward()
        loss_sp.backward()
        compare_grads(ref, sp, g, f"decoder LM, SP, ckpt={every}")


@TP2.check
def sequence_parallel_splits_the_residual_stream():
    """The blocks really see half of the sequence (and the norms' gradients need the TP sum)."""
    g = ParallelGroups.build(tp_size=2)
    _, sp = _lm_pair(g, 0)
    seen = []
    sp.attn_layers.layers[0].attn_norm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    sp(torch.randint(1, VOCAB, (2, 12)))
    assert seen == [torch.Size([2, 6, 32])], seen
    # odd lengths (generation, evaluation of a ragged tail) run unsplit, with the same results
    ref, sp = _lm_pair(g, 0)
    odd = torch.randint(1, VOCAB, (2, 7))
    assert_close(sp(odd, gather_logits=True), ref(odd), "odd length: logits")


@TP2.check
def packed_documents_varlen_sequence_parallel():
    g = ParallelGroups.build(tp_size=2)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
    seq = torch.randint(1, VOCAB, doc_ids.shape, generator=torch.Generator().manual_seed(4))
    ref, sp = _lm_pair(g, 5)
    ref, sp = ref.double(), sp.double()
    dense_backend(ref)
    out = []
    for model, mask in ((ref, torch.ones_like(seq, dtype=torch.bool)), (sp, None)):  # dense TP1, varlen SP
        logits = model(seq, doc_ids=doc_ids, mask=mask, gather_logits=True)
        (logits.square().mean() + logits[..., 7].sum()).backward()
        out.append(logits)
    assert_close(out[1], out[0], "varlen SP vs dense TP1 logits", rtol=1e-9, atol=1e-12)
    compare_grads(ref, sp, g, "varlen SP", rtol=1e-9, atol=1e-12)


@TP2.check
def dropout_sequence_parallel_equals_tp2_without():
    g = ParallelGroups.build(tp_size=2)
    streams = seed_all(7, tp_rank=g.tp_rank)
    start = capture_rng_state(streams)
    runs = []
    for sp, every in ((False, 0), (True, 0), (True, 1), (True, "selective")):
        restore_rng_state(start, streams)
        torch.manual_seed(3)
        model = AutoregressiveWrapper(_decoder_lm(g, attn_dropout=0.3, ff_dropout=0.3, rng=streams,
                                                  sequence_parallel=sp, activation_checkpointing=every)).train()
        seq = torch.randint(1, VOCAB, (2, 11))
        mask = torch.ones_like(seq, dtype=torch.bool)
        mask[1, 7:] = False  # a padding mask: the dense path, which selective recomputation replays
        loss = model(seq, mask=mask)
        loss.backward()
        runs.append((f"sp={sp} ckpt={every}", model, loss))
    _, base, loss0 = runs[0]
    for what, model, loss in runs[1:]:
        assert_close(loss, loss0, f"{what}: loss", rtol=1e-6, atol=0)
        for (name, a), b in zip(base.named_parameters(), model.parameters()):
            assert_close(b.grad, a.grad, f"{what}: grad of {name}", rtol=1e-5, atol=1e-7)


@TP2.check
def encoder_decoder_sequence_parallel_matches_tp1():
    """LayerNorms with biases and biased linears (their gradients are SP's TP sums), a wider encoder."""
    g = ParallelGroups.build(tp_size=2)
    ref, sp = encdec_pair(g, vocab=VOCAB, sequence_parallel=True)
    with torch.no_grad():  # nonzero biases everywhere (zero at init), the same on both
        for (_, a), (_, b) in zip(ref.named_parameters(), sp.named_parameters()):
            if a.ndim == 1:
                a.add_(torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())) * 0.1)
                b.copy_(tp_shard(a, b, g))
    src = torch.randint(1, VOCAB, (2, 10))
    src[0, 6:] = 0
    tgt = torch.randint(1, VOCAB, (2, 7))  # the decoder reads 6 positions, the encoder 10: both split
    tgt[1, 4:] = 0
    assert_same_step(ref, sp, g, (src, tgt), "encoder-decoder SP")


@TP2.check
def sequence_parallel_collectives_are_gathers_and_reduce_scatters():
    g = ParallelGroups.build(tp_size=2)
    _, sp = _lm_pair(g, 0)
    seq = torch.randint(1, VOCAB, (2, 12))
    with CollectiveLedger() as led:
        led.watch(sp)
        sp(seq).float().square().mean().backward()
    layer0 = [(r.phase, r.kind) for r in led.records if r.layer == "attn_layers.layers.0" and r.bytes >= 2 * 6 * 32 * 4]
    assert sorted(layer0) == sorted([("forward", "all_gather"), ("forward", "reduce_scatter")] * 2
                                    + [("backward", "reduce_scatter"), ("backward", "all_gather")] * 2
                                    + [("backward", "all_gather")] * 2), layer0  # the inputs gathered again


def _in_torch_distributed() -> bool:
    import traceback

    return any("/torch/distributed/" in f.filename.replace("\\", "/") for f in traceback.extract_stack())


class _Copies:
    """Counts the ops that copy tensor data, ours: not those inside a collective's own call (gloo's
    reduce-scatter copies its chunk out of an all-reduce; NCCL's is native)."""

    COPY = {"clone", "copy_", "cat", "_to_copy", "stack", "index_select", "contiguous"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in outer.COPY and not _in_torch_distributed():
                    outer.ops.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode, self.ops = Mode(), []

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@TP2.check
def sequence_parallel_collectives_copy_at_most_once():
    """Each SP collective, forward and backward, makes at most one copy of its data (the rank-major
    to sequence-major rearrangement of a [b, n, d] tensor with b > 1; none with b = 1), and the
    results are the concatenation and the chunked sum."""
    from xft_dist.parallel import gather_seq_to_tp, reduce_scatter_seq

    g = ParallelGroups.build(tp_size=2)
    r = g.tp_rank
    for b in (1, 3):
        chunk = (torch.arange(b * 4 * 5, dtype=torch.float32).view(b, 4, 5) + 100 * r).requires_grad_()
        with _Copies() as fwd:
            full = gather_seq_to_tp(chunk, g.tp_group)
        expect = torch.cat([chunk.detach() - 100 * r, chunk.detach() - 100 * r + 100], dim=1)
        assert torch.equal(full, expect), (full, expect)
        grad = torch.ones_like(full) * (r + 1)
        with _Copies() as bwd:
            full.backward(grad)
        assert torch.equal(chunk.grad, torch.full_like(chunk, 3.0))  # the sum over both ranks' grads
        x = (torch.arange(b * 8 * 5, dtype=torch.float32).view(b, 8, 5) * (r + 1)).requires_grad_()
        with _Copies() as fwd2:
            part = reduce_scatter_seq(x, g.tp_group)
        ref = (torch.arange(b * 8 * 5, dtype=torch.float32).view(b, 8, 5) * 3).chunk(2, dim=1)[r]
        assert torch.equal(part, ref)
        with _Copies() as bwd2:
            part.backward(torch.ones_like(part) * (r + 1))
        assert torch.equal(x.grad, torch.cat([torch.ones(b, 4, 5), torch.full((b, 4, 5), 2.0)], dim=1))
        for what, counter in (("gather forward", fwd), ("gather backward", bwd), ("reduce-scatter forward", fwd2),
                              ("reduce-scatter backward", bwd2)):
            assert len(counter.ops) <= (1 if b > 1 else 0), f"b={b}, {what}: copies {counter.ops}"


@pytest.fixture(scope="module")
def report():
    return TP2.run()


@pytest.mark.parametrize("name", TP2.names())
def test_sequence_parallel(report, name):
    report.assert_passed(name)
