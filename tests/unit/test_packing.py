"""Packing invariants over many random document sets (property-style, seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from xft_dist.data.packing import (
    StreamCursor,
    chunk_for_span_corruption,
    pack_rows,
    pad_rows,
    raw_length_for,
    segment_positions,
    span_corruption,
)

EOS, PAD = 1, 0
CASES = range(40)


def _docs(rng):
    return [rng.integers(3, 100, size=int(rng.integers(1, 30))) for _ in range(int(rng.integers(1, 12)))]


def _rows(rows: dict) -> list[dict]:
    return [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]


@pytest.mark.parametrize("case", CASES)
def test_causal_packing_loses_and_duplicates_nothing(case):
    rng = np.random.default_rng(case)
    docs, seq_len = _docs(rng), int(rng.integers(2, 20))
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    k = (len(stream) - 1) // seq_len  # every full row the documents make
    if k == 0:
        assert pack_rows(docs, 0, 1, seq_len, eos_id=EOS) is None
        return
    packed, cur = pack_rows(docs, 0, k, seq_len, eos_id=EOS)
    rows = _rows(packed)
    inputs = np.concatenate([r["input_ids"] for r in rows])
    assert np.array_equal(inputs, stream[:k * seq_len])           # every token an input once, in order
    labels = np.concatenate([r["labels"] for r in rows])
    assert np.array_equal(labels, stream[1:k * seq_len + 1])      # every token but the first a label once
    # Within-document targets are those of a document token; the one after an EOS never counts.
    assert sum(r["loss_mask"].sum() for r in rows) == int((inputs != EOS).sum())
    for r in rows:
        assert set(np.unique(r["loss_mask"])) <= {0.0, 1.0} and r["mask"].all()
        assert np.all(np.diff(r["doc_ids"]) >= 0)
        assert np.array_equal(r["positions"], segment_positions(r["doc_ids"]))
        crossing = r["input_ids"] == EOS
        assert np.all(r["loss_mask"][crossing] == 0)  # after EOS comes another document
    # The cursor is where the next row starts: the last label of this call's last row.
    rest = np.concatenate([np.append(d, EOS) for d in docs[cur.doc:]])[cur.offset:]
    assert np.array_equal(rest, stream[k * seq_len:])
    assert pack_rows(docs, 0, k + 1, seq_len, eos_id=EOS) is None  # not enough tokens: nothing cut


@pytest.mark.parametrize("case", CASES)
def test_packing_in_pieces_equals_packing_at_once(case):
    rng = np.random.default_rng(100 + case)
    docs, seq_len = _docs(rng), int(rng.integers(2, 12))
    offset = int(rng.integers(0, len(docs[0]) + 1))  # anywhere in the first document, its EOS included
    pieces, cur = [], StreamCursor(0, offset)
    while True:
        got = pack_rows(docs[cur.doc:], cur.offset, int(rng.integers(1, 3)), seq_len, eos_id=EOS)
        got = got or pack_rows(docs[cur.doc:], cur.offset, 1, seq_len, eos_id=EOS)
        if got is None:
            break
        rows, after = got
        pieces.extend(_rows(rows))
        cur = StreamCursor(cur.doc + after.doc, after.offset)
    if not pieces:
        return
    whole, _ = pack_rows(docs, offset, len(pieces), seq_len, eos_id=EOS)
    for a, b in zip(pieces, _rows(whole)):
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
