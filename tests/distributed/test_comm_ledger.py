"""The collective ledger of one training step equals the analytical minimum (2 gloo ranks, TP=2).

For the decoder LM (GELU and SwiGLU, untied and tied heads, fused and unfused loss) and the
encoder-decoder (a context wider than the decoder), with and without activation checkpointing
(full: each recomputed layer adds its forward collectives but the last exit; selective: none) and with
sequence parallelism, the count and bytes of every activation-sized collective, per layer, phase
and kind, are those of ``xft_dist.models.collectives.tp_minimum``. A failure names the layer and
the collective that is extra (or missing).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from xft_dist import AutoregressiveWrapper, Decoder, EncoderDecoder, TransformerWrapper
from xft_dist.models.collectives import OUTSIDE, compare, ledger_table, tp_minimum
from xft_dist.parallel import CollectiveLedger, ParallelGroups

from .harness import CheckSet

TP2 = CheckSet(world_size=2)
VOCAB, B, N = 61, 2, 12


def _step_ledger(model, *inputs, **kw) -> CollectiveLedger:
    with CollectiveLedger() as led:
        led.watch(model)
        loss = model(*inputs, **kw)
        loss.backward()
    return led


def _assert_minimum(led, minimum, what, min_bytes):
    diff = compare(ledger_table(led.records, min_bytes=min_bytes), minimum)
    assert not diff, f"{what}: the ledger differs from the minimum:\n" + "\n".join(diff)


def _lm(g, *, glu, tie, ckpt=0, sp=False, fused=True, depth=3):
    torch.manual_seed(0)
    layers = Decoder(dim=32, depth=depth, heads=4, attn_dim_head=8, attn_kv_heads=2, ff_glu=glu, ff_swish=glu,
                     groups=g, activation_checkpointing=ckpt, sequence_parallel=sp)
    net = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=layers, tie_embedding=tie)
    return AutoregressiveWrapper(net, fused_loss=fused)


# activation-sized: at least a [b, n / tp, d] chunk; the loss's per-token statistics are smaller
MIN_BYTES = B * (N // 2) * 32 * 4


@TP2.check
def decoder_lm_meets_the_minimum():
    g = ParallelGroups.build(tp_size=2)
    seq = torch.randint(1, VOCAB, (B, N + 1))
    for glu, tie, fused in ((False, True, True), (True, False, True), (True, True, False)):
        for ckpt in (0, 1, 2, "selective"):
            model = _lm(g, glu=glu, tie=tie, ckpt=ckpt, fused=fused)
            led = _step_ledger(model, seq)
            minimum = tp_minimum(model, batch=B, seq=N)
            _assert_minimum(led, minimum, f"decoder LM glu={glu} tie={tie} fused={fused} ckpt={ckpt}", MIN_BYTES)
    # the shape: depth 3, no checkpointing: 4 per layer + 2 = 14 all-reduces
    model = _lm(g, glu=False, tie=True)
    led = _step_ledger(model, seq)
    assert len(led.select(min_bytes=MIN_BYTES)) == 14, [(r.scope, r.phase) for r in led.select(min_bytes=MIN_BYTES)]


@TP2.check
def decoder_lm_sequence_parallel_meets_the_minimum():
    g = ParallelGroups.build(tp_size=2)
    seq = torch.randint(1, VOCAB, (B, N + 1))
    for ckpt in (0, 1, "selective"):
        model = _lm(g, glu=True, tie=True, ckpt=ckpt, sp=True)
        led = _step_ledger(model, seq)
        _assert_minimum(led, tp_minimum(model, batch=B, seq=N), f"decoder LM SP ckpt={ckpt}", MIN_BYTES)
        kinds = {r.kind for r in led.select(min_bytes=MIN_BYTES) if ".layers." in r.scope}
        assert kinds == {"all_gather", "reduce_scatter"}, kinds


@TP2.check
def encoder_decoder_meets_the_minimum():
    g = ParallelGroups.build(tp_size=2)
    src = torch.randint(1, VOCAB, (B, 10))
    tgt = torch.randint(1, VOCAB, (B, N + 1))
    for ckpt, sp in ((0, False), (1, False), ("selective", False), (0, True), (1, True)):
        torch.manual_seed(1)
        model = EncoderDecoder(num_tokens=VOCAB, dim=32, enc_dim=48, enc_depth=2, dec_depth=2, heads=4,
                               attn_dim_head=8, enc_max_seq_len=16, dec_max_seq_len=16, groups=g,
                               activation_checkpointing=ckpt, sequence_parallel=sp)
        led = _step_ledger(model, src, tgt)
        minimum = tp_minimum(model, batch=B, seq=N, context_seq=10)
        _assert_minimum(led, minimum, f"encoder-decoder ckpt={ckpt} sp={sp}", B * 5 * 32 * 4)
        # every cross-attention enters its 48-wide context once: one backward all-reduce of [b, 10, 48]
        ctx = [r for r in led.records if r.shape == (B, 10, 48) and r.phase == "backward" and "cross_attn" in r.scope]
        assert len(ctx) == 2, [(r.scope, r.kind) for r in ctx]


@TP2.check
def an_extra_collective_is_named_with_its_layer():
    """The check can fail: a model that enters q, k and v separately (three backward all-reduces)
    is reported at the layer and collective that are extra."""
    from xft_dist.nn import attention

    g = ParallelGroups.build(tp_size=2)
    model = _lm(g, glu=False, tie=True, depth=2)
    for layer in model.net.attn_layers.layers:  # the layout before the shared entry: a copy per projection
        for lin in (layer.attn.to_q, layer.attn.to_k, layer.attn.to_v):
            lin.forward = lambda t, tp_input=False, _l=lin: type(_l).forward(_l, t)
    shared_entry, fused = attention.tp_region_input, attention.fused_column
    attention.tp_region_input = lambda x, group, sequence_parallel=False: contextlib.nullcontext(x)
    attention.fused_column = lambda x, layers: [layer(x, tp_input=True) for layer in layers]  # a GEMM each
    try:
        led = _step_ledger(model, torch.randint(1, VOCAB, (B, N + 1)))
    finally:
        attention.tp_region_input, attention.fused_column = shared_entry, fused
    diff = compare(ledger_table(led.records, min_bytes=MIN_BYTES), tp_minimum(model, batch=B, seq=N))
    assert diff == [f"net.attn_layers.layers.{i} backward: +2 all_reduce (ledger 4 / {4 * B * N * 32 * 4} B, "
                    f"minimum 2 / {2 * B * N * 32 * 4} B)" for i in range(2)], diff
    assert OUTSIDE not in "".join(diff)


@TP2.check
def ledger_records_phase_scope_and_bytes():
    from xft_dist.parallel import all_reduce, reduce_values

    g = ParallelGroups.build(tp_size=2)
    with CollectiveLedger() as led:
        all_reduce(torch.ones(3, 4), g.tp_group)
        reduce_values([1.0, 2.0], g.tp_group)
    assert [(r.kind, r.bytes, r.phase, r.group_size, r.ranks) for r in led.records] == [
        ("all_reduce", 48, "forward", 2, (0, 1)), ("all_reduce", 16, "forward", 2, (0, 1))]
    all_reduce(torch.ones(2), g.tp_group)  # no ledger active: nothing recorded anywhere
    assert len(led.records) == 2
    with pytest.raises(RuntimeError, match="already recording"), CollectiveLedger(), CollectiveLedger():
        pass


@TP2.check
def a_backward_on_another_thread_is_recorded():
    """On CUDA, autograd runs the backward on a device thread of its own: the ledger entered on the
    main thread records it all the same, with the forward's modules and the backward phase."""
    import threading

    g = ParallelGroups.build(tp_size=2)
    seq = torch.randint(1, VOCAB, (B, N + 1))
    model = _lm(g, glu=False, tie=True, depth=2)
    same_thread = _step_ledger(model, seq)
    with CollectiveLedger() as led:
        led.watch(model)
        loss = model(seq)
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
    key = lambda led: sorted((r.kind, r.phase, r.scope, r.bytes) for r in led.records)  # noqa: E731
    assert key(led) == key(same_thread)
    assert any(r.phase == "backward" for r in led.records)


@pytest.fixture(scope="module")
def report():
    return TP2.run()


@pytest.mark.parametrize("name", TP2.names())
def test_comm_ledger(report, name):
    report.assert_passed(name)
