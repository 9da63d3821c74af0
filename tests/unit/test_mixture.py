"""Weighted mixtures of corpora: realised token shares follow the weights (sources with different
document lengths), each source runs its own epochs, resume at DP 2 -> 4 continues exactly, per-source
statistics; mixing tokenizers, too few shards and bad weights are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xft_dist.data import IGNORE_INDEX, DataError, LoaderConfig, Manifest, Mixture, Source, StreamingLoader
from xft_dist.data.shards import ShardWriter
from xft_dist.data.tokenizer import ByteTokenizer

RANGES = {"web": (3, 100), "code": (100, 180), "books": (180, 256)}  # disjoint ids: a token names its source
LENGTHS = {"web": (5, 40), "code": (30, 200), "books": (200, 600)}   # very different document lengths


def _source(out, name, *, docs=300, shard_tokens=800, seed=0, tokenizer=None):
    rng = np.random.default_rng([seed, len(name)])
    lo, hi = RANGES[name]
    with ShardWriter(out, tokenizer or ByteTokenizer().identity(), shard_tokens=shard_tokens) as w:
        for _ in range(docs):
            w.write(rng.integers(lo, hi, int(rng.integers(*LENGTHS[name]))))
    return Manifest.load(out)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {name: _source(root / name, name, docs=120 if name == "books" else 300) for name in RANGES}


def _mixture(sources, weights=(0.5, 0.3, 0.2)):
    return Mixture([Source(n, sources[n], w) for n, w in zip(RANGES, weights)])


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_realised_token_shares_follow_the_weights_over_20k_rows(sources):
    cfg = LoaderConfig(seq_len=64, global_rows=64, num_streams=4, seed=1, shuffle_buffer=16)
    loader = StreamingLoader(_mixture(sources), cfg)
    counts = dict.fromkeys(RANGES, 0)
    for batch in _take(loader, 20_000 // 64):
        ids = batch.input_ids.numpy()
        for name, (lo, hi) in RANGES.items():
            counts[name] += int(((ids >= lo) & (ids < hi)).sum())
    total = sum(counts.values())
    shares = {n: c / total for n, c in counts.items()}
    assert shares == pytest.approx({"web": 0.5, "code": 0.3, "books": 0.2}, abs=0.01), shares
    stats = loader.source_stats()
    # each source runs its own epochs: the small web corpus has been read many more times than books
    assert stats["web"]["epoch"] > stats["code"]["epoch"] > stats["books"]["epoch"] >= 1, stats
    drawn = sum(s["tokens"] for s in stats.values())
    assert stats["code"]["tokens"] / drawn == pytest.approx(0.3, abs=0.005)


def test_mixture_resume_at_dp2_then_dp4_continues_exactly(sources):
    cfg = LoaderConfig(seq_len=32, global_rows=8, num_streams=4, seed=2, shuffle_buffer=8)
    mix = _mixture(sources)
    reference = _take(StreamingLoader(mix, cfg), 40)
    olds = [StreamingLoader(mix, cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for old in olds:
        _take(old, 30)
    state = json.loads(json.dumps(StreamingLoader.merge_states([o.state_dict() for o in olds])))
    news = []
    for r in range(4):
        new = StreamingLoader(mix, cfg, dp_rank=r, dp_size=4)
        new.load_state_dict(state)
        news.append(_take(new, 10))
    for step in range(10):
        glued = {k: torch.cat([news[r][step].tensors()[k] for r in range(4)]) for k in reference[0].tensors()}
        want = reference[30 + step].tensors()
        assert all(torch.equal(glued[k], want[k]) for k in glued), f"batch {30 + step} differs"


def test_new_weights_on_resume_carry_on_from_the_counts(sources):
    """The weights are not part of the state: a resumed run may change them, and the blend moves to
    the new shares from the saved per-source counts (the same data otherwise)."""
    cfg = LoaderConfig(seq_len=32, global_rows=8, num_streams=4)
    old = StreamingLoader(_mixture(sources), cfg)
    _take(old, 50)
    new = StreamingLoader(_mixture(sources, (0.2, 0.3, 0.5)), cfg)
    new.load_state_dict(old.state_dict())
    before = {n: s["tokens"] for n, s in new.source_stats().items()}
    _take(new, 400)
    after = {n: s["tokens"] - before[n] for n, s in new.source_stats().items()}
    total = sum(after.values())
    assert after["books"] / total > 0.5 > before["books"] / sum(before.values()), (before, after)


def test_a_loader_state_of_the_previous_format_is_refused_with_an_explanation(sources):
    cfg = LoaderConfig(seq_len=32, global_rows=8, num_streams=4)
    state = StreamingLoader(_mixture(sources), cfg).state_dict()
    with pytest.raises(DataError, match="format 2 chose a mixture's source per document, format 3 per row"):
        StreamingLoader(_mixture(sources), cfg).load_state_dict({**state, "format": 2})


def _long_source(out, name, *, docs, max_len, seed=0):
    rng = np.random.default_rng([seed, len(name), 7])
    lo, hi = RANGES[name]
    with ShardWriter(out, ByteTokenizer().identity(), shard_tokens=max_len) as w:
        for _ in range(docs):
            w.write(rng.integers(lo, hi, int(rng.integers(max_len // 2, max_len))))
    return Manifest.load(out)


@pytest.fixture(scope="module")
def long_sources(tmp_path_factory):
    """Documents of up to 30k tokens, as whole source files are."""
    root = tmp_path_factory.mktemp("long")
    return {name: _long_source(root / name, name, docs=8, max_len=30_000) for name in RANGES}


def _shares(counts: dict) -> dict:
    total = sum(counts.values())
    return {n: c / total for n, c in counts.items()}


def test_long_documents_hold_their_weights_at_every_step(long_sources):
    """The tiny config's shape (seq_len 128, 8 rows, 4 streams): every step's realised shares (of the
    tokens handed out, counted from the ids themselves) are within one row per stream of the weights,
    0.02 by step 100 and 0.005 by step 1,000, and the logged counts are the realised ones."""
    cfg = LoaderConfig(seq_len=128, global_rows=8, num_streams=4, seed=3)
    loader = StreamingLoader(_mixture(long_sources), cfg)
    counts, worst = dict.fromkeys(RANGES, 0), {}
    it = iter(loader)
    for step in range(1, 1001):
        ids = next(it).input_ids.numpy()
        for name, (lo, hi) in RANGES.items():
            counts[name] += int(((ids >= lo) & (ids < hi)).sum())
        if step in (1, 10, 100, 1000):
            stats = loader.source_stats()
            logged = {n: stats[n]["tokens"] for n in RANGES}
            shares = _shares(logged)
            worst[step] = max(abs(shares[n] - w) for n, w in zip(RANGES, (0.5, 0.3, 0.2)))
            seen = _shares(counts)  # the ids (EOS separators aside) say the same
            assert all(abs(seen[n] - shares[n]) < 0.01 for n in RANGES), (seen, shares)
    bound = {step: 4 * 128 / (step * 8 * 128) for step in worst}  # one row per stream
    assert all(worst[s] <= bound[s] + 1e-9 for s in worst), (worst, bound)
    assert worst[100] <= 0.02 and worst[1000] <= 0.005, worst


def test_rows_of_a_mixture_are_packed_like_one_corpus(long_sources):
    """A row holds one source's tokens only, and packing semantics stay exact: document ids number
    the row's documents, positions restart at each, the loss never crosses a document boundary.
    Resumed mid-document, the rows continue exactly."""
    cfg = LoaderConfig(seq_len=128, global_rows=8, num_streams=4, seed=3)
    loader = StreamingLoader(_mixture(long_sources), cfg)
    batches = _take(loader, 50)
    again = StreamingLoader(_mixture(long_sources), cfg)
    again.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    later = _take(loader, 5)
    assert all(torch.equal(t, b.tensors()[k]) for a, b in zip(later, _take(again, 5)) for k, t in a.tensors().items())
    eos = ByteTokenizer().identity()["eos_id"]
    for b in batches:
        ids = b.input_ids.numpy()
        for row, pos, doc, lab in zip(ids, b.positions.numpy(), b.doc_ids.numpy(), b.labels.numpy()):
            lm = lab != IGNORE_INDEX
            real = row[row != eos]
            assert sum(any((real >= lo) & (real < hi)) for lo, hi in RANGES.values()) == 1
            starts = np.r_[True, doc[1:] != doc[:-1]]
            assert (pos[starts] == 0).all() and (np.diff(pos)[~starts[1:]] == 1).all()
            assert (lm[row == eos] == 0).all()  # an EOS input would predict the next document: masked
            assert (lab[row != eos] != IGNORE_INDEX).all()  # a document's last token learns to predict its EOS


def test_sources_with_different_tokenizers_are_refused_naming_both(sources, tmp_path):
    other = dict(ByteTokenizer().identity(), name="other-v2")
    odd = _source(tmp_path / "odd", "code", docs=40, tokenizer=other)
    with pytest.raises(DataError, match=r"sources 'web' .* and 'odd' .*different tokenizers"):
        Mixture([Source("web", sources["web"]), Source("odd", odd)])


def test_a_source_with_fewer_shards_than_streams_is_refused_with_the_number_needed(sources, tmp_path):
    one = _source(tmp_path / "one", "code", docs=20, shard_tokens=10**9)
    assert len(one.shards) == 1
    mix = Mixture([Source("web", sources["web"]), Source("one", one)])
    with pytest.raises(DataError, match=r"source 'one' .*: 1 shards for data.num_streams=4: .*i\.e\. 4"):
        StreamingLoader(mix, LoaderConfig(seq_len=16, global_rows=4, num_streams=4))


def test_bad_weights_and_names(sources):
    with pytest.raises(DataError, match="weight=0"):
        Mixture([Source("web", sources["web"], 0.0)])
    with pytest.raises(DataError, match="names must be unique"):
        Mixture([Source("a", sources["web"]), Source("a", sources["code"])])


def test_config_takes_a_mixture_or_one_corpus():
    from xft_dist.config.load import validate

    cfg = validate({"data": {"sources": [{"shards": "/d/web", "weight": 3}, {"shards": "/d/code", "name": "py"}]}})
    assert [s.label for s in cfg.data.sources] == ["web", "py"] and cfg.data.primary_shards == "/d/web"
    with pytest.raises(Exception, match="exactly one of data.shards"):
        validate({"data": {"shards": "/d/web", "sources": [{"shards": "/d/code"}]}})
    with pytest.raises(Exception, match="exactly one of data.shards"):
        validate({"data": {}})
