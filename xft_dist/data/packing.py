"""Pure functions from documents to training rows. No token is lost or duplicated; pad never counts.

Causal LM (``pack_rows``): documents, each followed by EOS, form one token stream; row ``k``
reads stream tokens ``[k L, (k + 1) L]``: inputs are the first ``L``, labels the last ``L``, so
every token is an input exactly once and a label exactly once (but the very first). Document ids
number the segments of a row; positions restart per segment; the loss mask drops the label that
crosses into the next document and any padding.

Unpacked (``pad_rows``): one document per row (split into several when longer), padded to ``L``.

Masked LM (``mlm_corrupt``): packed or padded rows whose chosen tokens are hidden (BERT's 80/10/10)
and are the only targets.

Encoder-decoder (``span_corruption``): T5-style noise spans replaced by sentinels in the encoder
input; the decoder reconstructs them (sentinel, span tokens, ..., EOS), both padded.

Arrays are NumPy int64; ``row`` dicts hold ``input_ids``, ``labels``, ``doc_ids``, ``positions``,
``loss_mask`` (float32) and ``mask`` (bool: real input tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def segment_positions(doc_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at every change of ``doc_ids`` (1-D)."""
    n = len(doc_ids)
    idx = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = doc_ids[1:] != doc_ids[:-1]
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


@dataclass
class StreamCursor:
    """Where the next row starts: document ``doc`` (index into the caller's list), token ``offset``
    into that document followed by its EOS."""

    doc: int = 0
    offset: int = 0


def pack_rows(docs, offset: int, k: int, seq_len: int, *, eos_id: int) -> tuple[dict, StreamCursor] | None:
    """``k`` full rows at once, as ``[k, seq_len]`` arrays, from ``docs`` (1-D token arrays, EOS not
    included) starting ``offset`` tokens into the first, and the cursor after them (where the next
    row starts: a row spans ``seq_len + 1`` stream tokens, the next starts at its last). None when
    ``docs`` hold fewer than ``k * seq_len + 1`` tokens from ``offset``.

    One concatenation and a few 2-D array operations, no per-row work."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    need = k * seq_len + 1
    if int(lengths.sum()) - offset < need:
        return None
    eos = np.array([eos_id], dtype=np.int64)
    stream = np.concatenate([piece for d in docs for piece in (d, eos)])[offset:offset + need]
    ends = np.cumsum(lengths) - offset  # each document's end (exclusive) in ``stream`` coordinates
    seg = np.searchsorted(ends, np.arange(need), side="right")  # document of each stream token
    idx = np.arange(seq_len + 1)[None, :] + (np.arange(k) * seq_len)[:, None]
    tokens, segs = stream[idx], seg[idx]
    seg_in, seg_lab = segs[:, :-1], segs[:, 1:]
    starts = np.ones((k, seq_len), dtype=bool)
    starts[:, 1:] = seg_in[:, 1:] != seg_in[:, :-1]
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int64) - 1
    pos = np.broadcast_to(np.arange(seq_len), (k, seq_len))
    positions = pos - np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    rows = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids, "positions": positions,
            "loss_mask": (seg_in == seg_lab).astype(np.float32), "mask": np.ones((k, seq_len), dtype=bool)}
    p = k * seq_len  # the next row starts at this stream token (the last of this call's last row)
    d = int(seg[p])
    start_d = int(ends[d - 1]) if d > 0 else -offset
    return rows, StreamCursor(d, p - start_d)


def _causal_row(tokens: np.ndarray, seg: np.ndarray, real: int, seq_len: int) -> dict:
    """``tokens [L + 1]`` with the segment (document) of each token, -1 for padding."""
    seg_in, seg_lab = seg[:-1], seg[1:]
    # Number the row's segments 0, 1, 2, ... (padding, if any, becomes the last one).
    _, doc_ids = np.unique(np.where(seg_in < 0, np.iinfo(np.int64).max, seg_in), return_inverse=True)
    idx = np.arange(seq_len)
    return {
        "input_ids": tokens[:-1].copy(),
        "labels": tokens[1:].copy(),
        "doc_ids": doc_ids.astype(np.int64),
        "positions": segment_positions(doc_ids),
        "loss_mask": ((seg_in == seg_lab) & (idx + 1 < real)).astype(np.float32),
        "mask": idx < real,
    }


def pad_rows(doc: np.ndarray, seq_len: int, *, eos_id: int, pad_id: int) -> list[dict]:
    """One document (plus EOS) as ``ceil(len / seq_len)`` rows, the last padded."""
    tokens = np.concatenate([np.asarray(doc, dtype=np.int64), [eos_id]])
    rows = []
    for start in range(0, max(len(tokens) - 1, 1), seq_len):
        chunk = tokens[start:start + seq_len + 1]
        real = len(chunk)
        padded = np.concatenate([chunk, np.full(seq_len + 1 - real, pad_id, dtype=np.int64)])
        seg = np.where(np.arange(seq_len + 1) < real, 0, -1)
        rows.append(_causal_row(padded, seg, real, seq_len))
    return rows


# ----------------------------------------------------------------------------- span corruption

def span_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_spans)`` for a document of ``length`` tokens (T5's rounding)."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1) if length > 1 else 0
    num_spans = max(1, int(round(num_noise / mean_span))) if num_noise else 0
    return num_noise, num_spans


def raw_length_for(enc_len: int, dec_len: int, noise_density: float, mean_span: float) -> int:
    """Longest raw chunk whose corrupted encoder input fits ``enc_len`` and target fits ``dec_len``
    (decoder sequence = start + target + EOS)."""
    best = 1
    for raw in range(2, 8 * enc_len):
        noise, spans = span_lengths(raw, noise_density, mean_span)
        if raw - noise + spans + 1 <= enc_len and noise + spans + 2 <= dec_len + 1:
            best = raw
        elif raw - noise + spans + 1 > enc_len:
            break
    return best


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` positive integers summing to ``total``, uniformly over compositions."""
    if parts == 1:
        return np.array([total])
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corruption(doc: np.ndarray, *, enc_len: int, dec_len: int, sentinel_start: int, eos_id: int,
                    pad_id: int, start_id: int, rng: np.random.Generator, noise_density: float = 0.15,
                    mean_span: float = 3.0) -> dict:
    """One chunk (at most ``raw_length_for(...)`` tokens) -> padded encoder-decoder example.

    Sentinel ``i`` is ``sentinel_start + i`` (ids past the tokenizer's vocabulary). The encoder
    sees the chunk with each noise span replaced by its sentinel; the decoder sequence is
    ``start, sentinel_0, span_0..., sentinel_1, span_1..., EOS``. Keys: ``src``, ``src_mask``,
    ``tgt``, ``tgt_mask`` (``tgt`` has ``dec_len + 1`` tokens: the wrapper shifts it).
    """
    doc = np.asarray(doc, dtype=np.int64)
    n = len(doc)
    noise, spans = span_lengths(n, noise_density, mean_span)
    if spans:
        noise_lens = _random_segmentation(noise, spans, rng)
        keep_lens = _random_segmentation(n - noise, spans, rng) if n - noise >= spans else None
        if keep_lens is None:
            spans, noise_lens = 1, np.array([noise])
            keep_lens = np.array([n - noise])
        # Alternate keep / noise, starting with keep (T5 starts with a non-noise span).
        src, tgt, pos = [], [start_id], 0
        for i in range(spans):
            src.extend(doc[pos:pos + keep_lens[i]])
            pos += keep_lens[i]
            src.append(sentinel_start + i)
            tgt.append(sentinel_start + i)
            tgt.extend(doc[pos:pos + noise_lens[i]])
            pos += noise_lens[i]
        src.extend(doc[pos:])
    else:
        src, tgt = list(doc), [start_id]
    src.append(eos_id)
    tgt.append(eos_id)
    if len(src) > enc_len or len(tgt) > dec_len + 1:
        raise ValueError(f"chunk of {n} tokens does not fit enc_len={enc_len} / dec_len={dec_len}")
    out = {}
    for key, seq, size in (("src", src, enc_len), ("tgt", tgt, dec_len + 1)):
        arr = np.full(size, pad_id, dtype=np.int64)
        arr[:len(seq)] = seq
        out[key] = arr
        out[key + "_mask"] = np.arange(size) < len(seq)
    return out


def chunk_for_span_corruption(doc: np.ndarray, raw_len: int) -> list[np.ndarray]:
    return [doc[i:i + raw_len] for i in range(0, len(doc), raw_len)] or [doc]



# ----------------------------------------------------------------------------- masked LM

def mlm_corrupt(tokens: np.ndarray, real: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray, *,
                rng: np.random.Generator, probability: float, replace: tuple[float, float, float], mask_id: int,
                vocab_size: int, special=()) -> dict:
    """Masked-LM rows from rows of tokens ``[k, L]`` (``real``: not padding).

    The candidates are the real tokens that are not ``special`` ids (EOS separators, padding, BOS).
    Each row chooses ``floor(probability * candidates + u)`` of them (``u ~ U(0, 1)``: the expected
    count is exactly ``probability`` of the candidates), uniformly; of the chosen, ``replace[0]``
    become ``mask_id``, ``replace[1]`` a uniform random id below ``vocab_size``, the rest stay.
    ``labels`` are the original tokens; ``loss_mask`` marks the chosen (the only targets)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    cand = np.asarray(real, dtype=bool) & ~np.isin(tokens, np.asarray(list(special), dtype=np.int64))
    counts = cand.sum(axis=1)
    take = np.floor(probability * counts + rng.random(len(tokens))).astype(np.int64)
    # A random order of each row's candidates (the others sort last): the first ``take`` are chosen.
    score = np.where(cand, rng.random(tokens.shape), 2.0)
    rank = np.empty_like(tokens)
    np.put_along_axis(rank, np.argsort(score, axis=1, kind="stable"), np.arange(tokens.shape[1])[None], axis=1)
    chosen = cand & (rank < take[:, None])
    how = rng.random(tokens.shape)
    to_mask = chosen & (how < replace[0])
    to_random = chosen & (how >= replace[0]) & (how < replace[0] + replace[1])
    corrupted = np.where(to_mask, mask_id, tokens)
    corrupted = np.where(to_random, rng.integers(0, vocab_size, size=tokens.shape), corrupted)
    return {"input_ids": corrupted, "labels": tokens.copy(), "doc_ids": np.asarray(doc_ids, dtype=np.int64),
            "positions": np.asarray(positions, dtype=np.int64), "loss_mask": chosen.astype(np.float32),
            "mask": np.asarray(real, dtype=bool)}
