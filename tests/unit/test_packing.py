"""Packing invariants over many random document sets (property-style, seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from xft_dist.data.packing import (
    StreamCursor,
    chunk_for_span_corruption,
    pack_stream,
    pad_rows,
    raw_length_for,
    segment_positions,
    span_corruption,
)

EOS, PAD = 1, 0
CASES = range(40)


def _docs(rng):
    return [rng.integers(3, 100, size=int(rng.integers(1, 30))) for _ in range(int(rng.integers(1, 12)))]


@pytest.mark.parametrize("case", CASES)
def test_causal_packing_loses_and_duplicates_nothing(case):
    rng = np.random.default_rng(case)
    docs, seq_len = _docs(rng), int(rng.integers(2, 20))
    rows, cur = pack_stream(docs, StreamCursor(), seq_len, eos_id=EOS, pad_id=PAD, final=True)
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    inputs = np.concatenate([r["input_ids"][r["mask"]] for r in rows])
    assert np.array_equal(inputs, stream[:len(inputs)])         # every token an input once, in order
    assert len(inputs) >= len(stream) - 1
    labels = np.concatenate([r["labels"][: int(r["mask"].sum())] for r in rows])
    assert np.array_equal(labels[: len(stream) - 1], stream[1:])  # every token but the first a label once
    # Within-document targets are exactly sum(len(doc)); cross-document targets and pad never count.
    assert sum(r["loss_mask"].sum() for r in rows) == sum(len(d) for d in docs)
    for r in rows:
        assert set(np.unique(r["loss_mask"])) <= {0.0, 1.0}
        assert np.all(r["loss_mask"][~r["mask"]] == 0)
        assert np.all(np.diff(r["doc_ids"]) >= 0)
        assert np.array_equal(r["positions"], segment_positions(r["doc_ids"]))
        crossing = r["input_ids"] == EOS
        assert np.all(r["loss_mask"][crossing & r["mask"]] == 0)  # after EOS comes another document
    # At most the one token already used as the final label is left behind.
    assert sum(len(d) + 1 for d in docs[cur.doc:]) - cur.offset <= 1


@pytest.mark.parametrize("case", CASES)
def test_packing_in_pieces_equals_packing_at_once(case):
    rng = np.random.default_rng(100 + case)
    docs, seq_len = _docs(rng), int(rng.integers(2, 12))
    whole, _ = pack_stream(docs, StreamCursor(), seq_len, eos_id=EOS, pad_id=PAD)
    pieces, cur = [], StreamCursor()
    while True:
        rows, cur = pack_stream(docs, cur, seq_len, eos_id=EOS, pad_id=PAD, max_rows=int(rng.integers(1, 3)))
        if not rows:
            break
        pieces.extend(rows)
    assert len(pieces) == len(whole)
    for a, b in zip(pieces, whole):
        for key in a:
            assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("case", CASES)
def test_padding_without_packing(case):
    rng = np.random.default_rng(200 + case)
    doc, seq_len = rng.integers(3, 100, size=int(rng.integers(1, 50))), int(rng.integers(2, 16))
    rows = pad_rows(doc, seq_len, eos_id=EOS, pad_id=PAD)
    assert np.array_equal(np.concatenate([r["input_ids"][r["mask"]] for r in rows]),
                          np.append(doc, EOS)[: sum(int(r["mask"].sum()) for r in rows)])
    assert sum(r["loss_mask"].sum() for r in rows) == len(doc)
    for r in rows:
        assert np.all(r["input_ids"][~r["mask"]] == PAD) and np.all(r["loss_mask"][~r["mask"]] == 0)


def _reconstruct(src, tgt, sentinel_start):
    """Undo span corruption: sentinels in src are replaced by the spans that follow them in tgt."""
    spans, current = {}, None
    for t in tgt[1:]:
        if t == EOS:
            break
        if t >= sentinel_start:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in src:
        if t == EOS:
            break
        out.extend(spans[int(t)] if t >= sentinel_start else [int(t)])
    return out


@pytest.mark.parametrize("case", CASES)
def test_span_corruption_invariants(case):
    rng = np.random.default_rng(300 + case)
    enc_len, dec_len = int(rng.integers(12, 64)), int(rng.integers(8, 24))
    raw = raw_length_for(enc_len, dec_len, 0.15, 3.0)
    doc = rng.integers(3, 100, size=int(rng.integers(1, 3 * raw)))
    for chunk in chunk_for_span_corruption(doc, raw):
        assert len(chunk) <= raw
        ex = span_corruption(chunk, enc_len=enc_len, dec_len=dec_len, sentinel_start=1000, eos_id=EOS,
                             pad_id=PAD, start_id=2, rng=np.random.default_rng(case))
        assert ex["src"].shape == (enc_len,) and ex["tgt"].shape == (dec_len + 1,)
        assert _reconstruct(ex["src"], ex["tgt"], 1000) == [int(t) for t in chunk]  # nothing lost or duplicated
        for key in ("src", "tgt"):
            assert np.all(ex[key][~ex[key + "_mask"]] == PAD)
            assert np.all(ex[key][ex[key + "_mask"]] != PAD)             # pad only where masked
        sentinels = ex["src"][ex["src"] >= 1000]
        assert np.array_equal(sentinels, 1000 + np.arange(len(sentinels)))
        again = span_corruption(chunk, enc_len=enc_len, dec_len=dec_len, sentinel_start=1000, eos_id=EOS,
                                pad_id=PAD, start_id=2, rng=np.random.default_rng(case))
        assert all(np.array_equal(ex[k], again[k]) for k in ex)           # deterministic given the seed


@pytest.mark.parametrize("seed", range(6))
def test_pack_rows_cuts_exactly_the_rows_of_pack_stream(seed):
    from xft_dist.data.packing import StreamCursor, pack_rows, pack_stream

    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 250, int(rng.integers(1, 40))) for _ in range(30)]
    seq_len, k = int(rng.integers(2, 24)), int(rng.integers(1, 8))
    offset = int(rng.integers(0, len(docs[0]) + 1))  # anywhere in the first document, its EOS included
    got = pack_rows(docs, offset, k, seq_len, eos_id=1)
    want, cursor = pack_stream(docs, StreamCursor(0, offset), seq_len, eos_id=1, pad_id=0, max_rows=k)
    if len(want) < k:
        assert got is None
        return
    rows, after = got
    for key in want[0]:
        np.testing.assert_array_equal(rows[key], np.stack([r[key] for r in want]), err_msg=key)
    assert (after.doc, after.offset) == (cursor.doc, cursor.offset)
    assert pack_rows(docs, offset, 10**4, seq_len, eos_id=1) is None  # not enough tokens: nothing cut
