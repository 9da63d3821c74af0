"""The streaming loader: exact resume (with workers too), elastic resume across DP sizes, every
document exactly once per epoch across ranks and workers, span-corruption batches, bad data."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from xft_dist.data import Batch, DataError, LoaderConfig, Manifest, StreamingLoader
from xft_dist.data.shards import stream_shards

from ..helpers import doc_index, make_corpus

EOS = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(out, num_docs=400, shard_tokens=1200)
    return out, docs


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    a, b = (x.tensors() if isinstance(x, Batch) else x for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CFG = dict(seq_len=32, global_rows=8, num_streams=4, seed=3)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["packed", "padded", "mlm", "mlm-padded"])
def test_resume_gives_exactly_the_next_batches(corpus, workers, mode):
    out, _ = corpus
    mlm = {"mode": "mlm", "mlm_rows": mode.split("-")[1] if "-" in mode else "packed"} if "mlm" in mode else {}
    cfg = LoaderConfig(**CFG, **({"mode": mode} | mlm), num_workers=workers)
    vocab = 260 if mlm else None
    straight = _take(StreamingLoader(out, cfg, vocab_size=vocab), 48)
    first = StreamingLoader(out, cfg, vocab_size=vocab)
    _take(first, 40)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoints)
    resumed = StreamingLoader(out, cfg, vocab_size=vocab)
    resumed.load_state_dict(state)
    after = _take(resumed, 8)
    for i, (a, b) in enumerate(zip(after, straight[40:])):
        assert _equal(a, b), f"batch {40 + i} differs after resume"
    assert set(after[0].tensors()) >= {"input_ids", "labels", "doc_ids", "positions", "mask", "stream"}
    assert after[0].layout is not None and after[0].counts() == straight[40].counts()


def test_workers_do_not_change_the_batches(corpus):
    out, _ = corpus
    a = _take(StreamingLoader(out, LoaderConfig(**CFG, num_workers=0)), 6)
    b = _take(StreamingLoader(out, LoaderConfig(**CFG, num_workers=2)), 6)
    assert all(_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("mode", ["packed", "mlm"])
def test_elastic_resume_continues_the_global_sequence(corpus, before, after, mode):
    out, _ = corpus
    cfg = LoaderConfig(**CFG, mode=mode)
    reference = _take(StreamingLoader(out, cfg), 14)  # DP=1: the global batches (masks included)
    olds = [StreamingLoader(out, cfg, dp_rank=r, dp_size=before) for r in range(before)]
    for old in olds:
        _take(old, 10)
    state = StreamingLoader.merge_states([o.state_dict() for o in olds])
    news = []
    for r in range(after):
        new = StreamingLoader(out, cfg, dp_rank=r, dp_size=after)
        new.load_state_dict(state)
        news.append(_take(new, 4))
    for step in range(4):
        glued = {k: torch.cat([news[r][step].tensors()[k] for r in range(after)]) for k in reference[0].tensors()}
        assert _equal(glued, reference[10 + step]), f"global batch {10 + step} differs at DP {before}->{after}"
    if before > 1:  # one rank's state alone is not enough to resume the whole sequence
        with pytest.raises(DataError, match="lacks streams"):
            StreamingLoader(out, cfg, dp_rank=0, dp_size=1).load_state_dict(olds[0].state_dict())


def test_every_document_exactly_once_per_epoch_across_2_ranks_x_2_workers(corpus):
    out, docs = corpus
    cfg = LoaderConfig(**CFG, num_workers=2)
    manifest = Manifest.load(out)
    need = {}  # per stream: documents and rows of its epoch-0 shards
    for s in range(cfg.num_streams):
        shards = [manifest.shards[i] for i in stream_shards(len(manifest.shards), cfg.num_streams, s,
                                                            seed=cfg.seed, epoch=0, shuffle=True)]
        need[s] = (sum(x.documents for x in shards), sum(x.tokens + x.documents for x in shards))
    steps = max(tok for _, tok in need.values()) // (cfg.seq_len * 2) + 2
    per_stream = {s: [] for s in range(cfg.num_streams)}
    for rank in range(2):
        for batch in _take(StreamingLoader(out, cfg, dp_rank=rank, dp_size=2), steps):
            for row, s in zip(batch.input_ids, batch.stream.tolist()):
                per_stream[s].append(row.numpy())
    seen = []
    for s, rows in per_stream.items():
        stream = np.concatenate(rows)  # inputs never overlap: the stream's token sequence
        cuts = np.flatnonzero(stream == EOS)
        pieces = np.split(stream, cuts + 1)[: need[s][0]]
        assert len(pieces) == need[s][0], f"stream {s} did not finish epoch 0"
        seen.extend(doc_index(p) for p in pieces)
        for p in pieces:
            assert np.array_equal(p[:-1], docs[doc_index(p)]), "a document came back altered"
    assert sorted(seen) == list(range(len(docs))), "some document missing or repeated in epoch 0"


def test_span_corruption_batches(corpus):
    out, _ = corpus
    cfg = LoaderConfig(seq_len=24, enc_len=48, global_rows=8, num_streams=4, mode="span")
    loader = StreamingLoader(out, cfg, vocab_size=259 + 16)
    batch = _take(loader, 1)[0]
    assert batch.src.shape == (2 * 4, 48) and batch.input_ids.shape == (8, 24)  # the decoder's inputs
    assert (batch.src >= 259).any() and (batch.input_ids[:, 1] >= 259).all()
    with pytest.raises(DataError, match="sentinel"):
        StreamingLoader(out, cfg, vocab_size=259)


# ---------------------------------------------------------------------------------------- bad data

def _rewrite_shard(out, index, data: bytes):
    path = sorted(out.glob("shard-*.tar"))[index]
    path.write_bytes(data)
    return path


def _bad_corpus(tmp_path, damage):
    out = tmp_path / "bad"
    make_corpus(out, num_docs=60, shard_tokens=600)
    path = damage(out)
    return out, path


def _truncate(out):
    path = sorted(out.glob("shard-*.tar"))[1]
    path.write_bytes(path.read_bytes()[:700])
    return path


def _tar_with(samples):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _fix_manifest(out, index, documents):
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][index]["documents"] = documents
    (out / "manifest.json").write_text(json.dumps(m))


def _read_all(out, **kw):
    cfg = LoaderConfig(seq_len=16, global_rows=2, num_streams=1, shuffle=False, **kw)
    loader = StreamingLoader(out, cfg)
    _take(loader, 60)
    return loader


def test_truncated_tar_names_the_shard_or_is_skipped_and_counted(tmp_path):
    out, path = _bad_corpus(tmp_path, _truncate)
    with pytest.raises(DataError, match=rf"shard .*{path.name}: corrupt or truncated tar|{path.name}: holds"):
        _read_all(out)
    loader = _read_all(out, skip_bad=True)
    assert loader.stats["skipped"] >= 1


def test_empty_shard_zero_length_document_and_out_of_vocab_ids(tmp_path):
    out = tmp_path / "c"
    make_corpus(out, num_docs=40, shard_tokens=600)
    empty = _rewrite_shard(out, 0, _tar_with([]))
    with pytest.raises(DataError, match=rf"{empty.name}: empty shard"):
        _read_all(out)
    _rewrite_shard(out, 0, _tar_with([("0000000001.tokens.npy", _npy(np.array([], dtype=np.uint16)))]))
    _fix_manifest(out, 0, 1)
    with pytest.raises(DataError, match=r"sample 0 \(key 0000000001\) is a zero-length document"):
        _read_all(out)
    _rewrite_shard(out, 0, _tar_with([("0000000007.tokens.npy", _npy(np.array([5, 300, 7], dtype=np.uint16)))]))
    with pytest.raises(DataError, match=r"key 0000000007\): token id 300 at position 1 >= vocab_size 259"):
        _read_all(out)
    loader = _read_all(out, skip_bad=True)
    assert loader.stats["skipped"] >= 1


def test_configuration_errors(corpus):
    out, _ = corpus
    with pytest.raises(DataError, match=r"train.global_batch=6 \(rows a step\) must be a multiple of "
                                        r"data.num_streams=4"):
        LoaderConfig(seq_len=8, global_rows=6, num_streams=4)
    with pytest.raises(DataError, match="num_streams=4 must be divisible by the data-parallel size 3"):
        StreamingLoader(out, LoaderConfig(seq_len=8, global_rows=8, num_streams=4), dp_rank=0, dp_size=3)
    with pytest.raises(DataError, match="need at least one shard per stream"):
        StreamingLoader(out, LoaderConfig(seq_len=8, global_rows=4096, num_streams=4096))
    with pytest.raises(DataError, match="vocab_size=259, larger than the model's vocabulary"):
        StreamingLoader(out, LoaderConfig(**CFG), vocab_size=100)
    state = StreamingLoader(out, LoaderConfig(**CFG)).state_dict()
    with pytest.raises(DataError, match="seq_len=32, this loader has seq_len=16"):
        StreamingLoader(out, LoaderConfig(**{**CFG, "seq_len": 16})).load_state_dict(state)
    with pytest.raises(DataError, match="no shard manifest"):
        Manifest.load(out / "nowhere")


def test_the_data_settings_are_defined_once():
    """Each loader field is read from one config key; the keys that fix the data order are the ones
    resume refuses to change; a config's loader and validation loader come from one function."""
    from dataclasses import fields

    from xft_dist.config.load import validate
    from xft_dist.config.resume import STREAM_KEYS

    names = {f.name for f in fields(LoaderConfig)}
    assert set(LoaderConfig.KEYS) == names - {"prefetch"}
    order = {LoaderConfig.KEYS[k] for k in names - set(LoaderConfig.RUNTIME) - {"prefetch"}}
    assert order == set(STREAM_KEYS)
    cfg = validate({"data": {"shards": "x", "seq_len": 16, "num_streams": 4, "mode": "padded",
                             "valid": {"batch_rows": 6}},
                    "train": {"global_batch": 8, "micro_batch": 4, "seed": 9}, "loss": {"ignore_index": 3}})
    train, valid = LoaderConfig.from_config(cfg), LoaderConfig.from_config(cfg, validation=True)
    assert (train.seq_len, train.global_rows, train.num_streams, train.mode, train.seed, train.ignore_index) == \
        (16, 8, 4, "padded", 9, 3)
    assert (valid.global_rows, valid.num_streams, valid.shuffle, valid.num_workers) == (6, 1, False, 0)
    assert set(train.fingerprint()) == names - set(LoaderConfig.RUNTIME) - set(LoaderConfig.MLM_ONLY)
    mlm = LoaderConfig(**{**vars(train), "mode": "mlm"})  # the masking settings fix an mlm run's data
    assert set(mlm.fingerprint()) == names - set(LoaderConfig.RUNTIME)
