"""``data.Batch``: the loader's batches of every mode carry counts a recount from their tensors
confirms, split and shard into micro-batches that add up, move whole, and a malformed batch is
refused with a message naming what disagrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xft_dist.data import IGNORE_INDEX, Batch, DocLayout, LoaderConfig, StreamingLoader
from xft_dist.data.tokenizer import ByteTokenizer

from ..helpers import make_corpus

TOK = ByteTokenizer().identity()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_corpus")
    make_corpus(out, num_docs=200, shard_tokens=500)
    return out


def _recount(b: Batch) -> tuple[int, int, int]:
    return b.input_ids.numel(), int(b.mask.sum()), int((b.labels != IGNORE_INDEX).sum())


def _loader_batch(corpus, mode):
    kw = dict(mode=mode, enc_len=48) if mode == "span" else dict(mode=mode)
    cfg = LoaderConfig(seq_len=24, global_rows=8, num_streams=4, seed=1, **kw)
    it = iter(StreamingLoader(corpus, cfg, vocab_size=TOK["vocab_size"] + 32))
    return [next(it) for _ in range(3)][-1]


@pytest.mark.parametrize("mode", ["packed", "padded", "span"])
def test_loader_batches_count_what_their_tensors_hold(corpus, mode):
    b = _loader_batch(corpus, mode)
    assert b.mode == mode and b.counts() == _recount(b) and b.stream.shape == (8,)
    assert b.input_ids.shape == b.labels.shape == b.mask.shape == (8, 24)
    if mode == "span":
        assert b.src.shape == b.src_mask.shape == (8, 48) and b.layout is None
        # the targets that count are a prefix of each row: every real decoder input but the last
        # predicts one (the last too when the sequence fills the row), and none is padding
        counted, real = (b.labels != IGNORE_INDEX).long(), b.mask.sum(1)
        assert torch.equal(counted, counted.cummin(1).values)
        assert ((counted.sum(1) == real - 1) | ((real == 24) & (counted.sum(1) == 24))).all()
        assert not (b.labels == TOK["pad_id"]).any()
    else:
        assert b.layout is not None and b.layout.shape == (8, 24)
        assert b.layout.bounds == DocLayout.from_doc_ids(b.doc_ids).bounds
        eos = TOK["eos_id"]
        assert not (b.labels[b.input_ids == eos] != IGNORE_INDEX).any()  # no target across documents
        assert not (b.labels[~b.mask] != IGNORE_INDEX).any()  # nor from padding
    if mode == "packed":
        assert b.num_real_tokens == b.num_tokens  # packed rows have no padding
    if mode == "padded":
        assert b.num_real_tokens < b.num_tokens


@pytest.mark.parametrize("mode", ["packed", "padded", "span"])
def test_micro_batches_and_shares_add_up(corpus, mode):
    b = _loader_batch(corpus, mode)
    micro = b.split(3)
    assert [m.rows for m in micro] == [3, 3, 2]
    assert tuple(map(sum, zip(*(m.counts() for m in micro)))) == b.counts()
    assert all(m.counts() == _recount(m) for m in micro)
    assert torch.equal(torch.cat([m.input_ids for m in micro]), b.input_ids)
    if mode != "span":
        assert all(m.layout.shape == (m.rows, 24) and m.layout.bounds[-1] == m.rows * 24 for m in micro)
    shares = [b.shard(r, 3) for r in range(3)]
    assert [s.rows for s in shares] == [3, 3, 2] and sum(s.num_loss_tokens for s in shares) == b.num_loss_tokens
    moved = b.to("cpu", non_blocking=True)
    assert moved.counts() == b.counts() and torch.equal(moved.labels, b.labels)


def test_the_span_targets_of_the_loader_rows():
    """From the loader's arrays: the decoder sequence shifts by one, and its targets past the end
    (or equal to the pad id) are ignored."""
    tgt = np.array([[5, 7, 8, 2, 0, 0], [5, 9, 0, 8, 2, 0]])
    rows = {"src": np.ones((2, 4), dtype=np.int64), "src_mask": np.ones((2, 4), dtype=bool),
            "tgt": tgt, "tgt_mask": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=bool)}
    b = Batch.from_rows("span", rows, pad_id=0)
    assert b.input_ids.tolist() == [[5, 7, 8, 2, 0], [5, 9, 0, 8, 2]]
    assert b.labels.tolist() == [[7, 8, 2, -100, -100], [9, -100, 8, 2, -100]]
    assert b.counts() == (10, 9, 6)


def test_a_malformed_batch_is_refused_naming_what_disagrees():
    ids = torch.ones(2, 6, dtype=torch.long)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match=r"labels is \(2, 5\), input_ids \(2, 6\)"):
        Batch.of("packed", ids, ids[:, :5])
    with pytest.raises(ValueError, match=r"doc_ids is \(1, 6\)"):
        Batch.of("packed", ids, ids, doc_ids=doc[:1])
    with pytest.raises(ValueError, match=r"layout covers rows \(1, 6\), the batch is \(2, 6\)"):
        Batch.of("packed", ids, ids, doc_ids=doc, layout=DocLayout.from_doc_ids(doc[:1]))
    crossing = DocLayout(torch.tensor([0, 3, 9, 12], dtype=torch.int32), (0, 3, 9, 12), 6, (2, 6))
    with pytest.raises(ValueError, match="crosses a row boundary"):
        Batch.of("packed", ids, ids, doc_ids=doc, layout=crossing)
    short = DocLayout(torch.tensor([0, 3, 6], dtype=torch.int32), (0, 3, 6), 6, (2, 6))
    with pytest.raises(ValueError, match="do not cover"):
        Batch.of("packed", ids, ids, doc_ids=doc, layout=short)
    with pytest.raises(ValueError, match="src and src_mask are given for span batches"):
        Batch.of("span", ids, ids)
    with pytest.raises(ValueError, match=r"src \(3, 4\)"):
        Batch.of("span", ids, ids, src=torch.ones(3, 4, dtype=torch.long), src_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode='causal'"):
        Batch.of("causal", ids, ids)
    with pytest.raises(ValueError, match="loss tokens 13, real 12"):
        Batch(mode="packed", input_ids=ids, labels=ids, mask=ids.bool(), num_tokens=12, num_real_tokens=12,
              num_loss_tokens=13)
