"""The fewest activation-sized tensor-parallel collectives a training step of a model needs.

Megatron's accounting, per pre-norm block at TP > 1 (one forward + loss + backward):

- each TP region (self-attention, cross-attention, feed-forward) is entered once and left once.
  Without sequence parallelism the exit is a forward all-reduce of ``[b, n, d]`` and the entry a
  backward all-reduce of the input's gradient (one for q, k and v together; one for a GLU's gate and
  up together). Cross-attention reads a second input, the context ``[b, m, d_context]``: one more
  backward all-reduce, whatever its width.
- with sequence parallelism the entry is an all-gather of the ``[b, n / tp, d]`` chunks (forward)
  and a reduce-scatter of ``[b, n, d]`` (backward); the exit a reduce-scatter (forward) and an
  all-gather (backward). The context is not split (it is another stack's output), so its entry stays
  an all-reduce. The column-parallel layers keep only the chunk of their gathered input for the
  backward and all-gather it there once more (Megatron's trade of one all-gather per region for a
  ``[b, n, d]`` of memory); not in a checkpointed layer, whose recompute gathers it anyway.
- a layer recomputed by activation checkpointing makes its forward collectives again in the
  backward (phase "recompute"), all but the last region's exit: nothing inside the layer keeps that
  output, and torch's checkpoint stops recomputing once it holds what the backward needs.
  Selective recomputation (attention cores) makes none.

Outside the blocks: each token-embedding lookup all-reduces its ``[b, n, d_emb]`` output (forward),
the output head all-reduces the gradient of its input ``[b, n, d]`` (backward), and a
sequence-parallel stack splits its input on entry (backward: all-gather) and gathers its output on
exit (forward: all-gather).

Bytes are one rank's input to the collective. ``tp_minimum`` returns the table that
``ledger_table`` makes of a ledger's records for a run that meets the minimum, with every record outside the
layers under ``OUTSIDE``; the loss's own reductions (per-token statistics, not activation-sized)
are not counted.
"""

from __future__ import annotations

from torch import nn

from ..parallel import CollectiveRecord, group_size
from .encdec import EncoderDecoder
from .layers import AttentionLayers
from .wrappers import AutoregressiveWrapper

OUTSIDE = "(outside the layers)"
Table = dict[tuple[str, str, str], tuple[int, int]]


def _add(table: Table, key: tuple[str, str, str], count: int, nbytes: int) -> None:
    c, b = table.get(key, (0, 0))
    table[key] = (c + count, b + count * nbytes)


def _stack(table: Table, stack: AttentionLayers, prefix: str, *, batch: int, seq: int, elem: int,
           context: tuple[int, int] | None = None) -> None:
    tp = group_size(stack.groups.tp_group)
    if tp == 1:
        return
    sp = stack.sequence_parallel and seq % tp == 0
    act, chunk = batch * seq * stack.dim * elem, batch * (seq // tp) * stack.dim * elem
    regions = 3 if stack.cross_attend else 2
    every = stack.activation_checkpointing
    for i in range(stack.depth):
        name = f"{prefix}.layers.{i}"
        forward = [("all_gather", regions, chunk), ("reduce_scatter", regions, act)] if sp else \
            [("all_reduce", regions, act)]
        recomputed = every != "selective" and every and i % every == 0
        regather = 0 if recomputed else regions
        backward = [("reduce_scatter", regions, act), ("all_gather", regions + regather, chunk)] if sp else \
            [("all_reduce", regions, act)]
        if context is not None:
            backward.append(("all_reduce", 1, batch * context[0] * context[1] * elem))
        exit_kind = "reduce_scatter" if sp else "all_reduce"
        for kind, n, nbytes in forward:
            _add(table, (name, "forward", kind), n, nbytes)
            if recomputed:
                _add(table, (name, "recompute", kind), n - (kind == exit_kind), nbytes)
        for kind, n, nbytes in backward:
            _add(table, (name, "backward", kind), n, nbytes)
    if sp:
        _add(table, (OUTSIDE, "backward", "all_gather"), 1, chunk)  # the split of the stack's input
        _add(table, (OUTSIDE, "forward", "all_gather"), 1, chunk)   # the gather of its output


def tp_minimum(model: nn.Module, *, batch: int, seq: int, context_seq: int | None = None,
               elem_bytes: int = 4) -> Table:
    """``{(layer, phase, kind): (count, bytes)}`` for one step of ``model`` (an
    ``AutoregressiveWrapper`` or an ``EncoderDecoder``, as ``watch``-ed from the top) whose decoder
    stack reads ``seq`` positions (and whose encoder ``context_seq``)."""
    table: Table = {}
    if isinstance(model, AutoregressiveWrapper):
        net, prefix, emb_calls = model.net, "net.attn_layers", [(seq, model.net.emb_dim)]
        tp = group_size(net.groups.tp_group)
    elif isinstance(model, EncoderDecoder):
        if context_seq is None:
            raise ValueError("tp_minimum of an EncoderDecoder needs context_seq (the encoder's length)")
        enc = model.encoder.attn_layers
        _stack(table, enc, "encoder.attn_layers", batch=batch, seq=context_seq, elem=elem_bytes)
        net, prefix = model.decoder.net, "decoder.net.attn_layers"
        emb_calls = [(context_seq, model.encoder.emb_dim), (seq, net.emb_dim)]
        tp = group_size(net.groups.tp_group)
    else:
        raise TypeError(f"tp_minimum: expected an AutoregressiveWrapper or EncoderDecoder, got {type(model).__name__}")
    if tp == 1:
        return {}
    stack = net.attn_layers
    context = (context_seq, model.encoder.attn_layers.dim) if isinstance(model, EncoderDecoder) else None
    _stack(table, stack, prefix, batch=batch, seq=seq, elem=elem_bytes, context=context)
    for n, width in emb_calls:
        _add(table, (OUTSIDE, "forward", "all_reduce"), 1, batch * n * width * elem_bytes)
    _add(table, (OUTSIDE, "backward", "all_reduce"), 1, batch * seq * stack.dim * elem_bytes)  # the head's input
    return table


def ledger_table(records: list[CollectiveRecord], *, min_bytes: int) -> Table:
    """The ledger's records of at least ``min_bytes`` in ``tp_minimum``'s shape."""
    table: Table = {}
    for r in records:
        if r.bytes >= min_bytes:
            layer = r.layer if ".layers." in f".{r.layer}" else OUTSIDE
            _add(table, (layer, r.phase, r.kind), 1, r.bytes)
    return table


def compare(measured: Table, minimum: Table) -> list[str]:
    """One line per (layer, phase, kind) where the ledger differs from the minimum (empty: equal)."""
    out = []
    for key in sorted(set(measured) | set(minimum)):
        got, want = measured.get(key, (0, 0)), minimum.get(key, (0, 0))
        if got != want:
            layer, phase, kind = key
            extra = got[0] - want[0]
            what = f"{extra:+d} {kind}" if extra else f"{kind} bytes {got[1]} != {want[1]}"
            out.append(f"{layer} {phase}: {what} (ledger {got[0]} / {got[1]} B, minimum {want[0]} / {want[1]} B)")
    return out
