"""Shards over HTTP and through ``pipe:`` commands (webdataset's URL handling), against a local HTTP
server started here: the batches equal those of the local files; a truncated remote shard is
reported like a local one; an unreachable manifest is named."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading

import pytest
import torch

from xft_dist.data import DataError, LoaderConfig, Manifest, StreamingLoader

from ..helpers import make_corpus

CFG = dict(seq_len=32, global_rows=8, num_streams=4, seed=5, shuffle_buffer=8)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    make_corpus(root / "good", num_docs=200, shard_tokens=700)
    shutil.copytree(root / "good", root / "cut")
    victim = sorted((root / "cut").glob("shard-*.tar"))[2]
    victim.write_bytes(victim.read_bytes()[:900])  # truncated on the server
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x.tensors()[k], t) for x, y in zip(a, b) for k, t in y.tensors().items())


def test_http_shards_give_the_batches_of_the_local_files(served):
    root, base = served
    remote = Manifest.load(f"{base}/good")
    assert remote.shards[0].url.startswith(base + "/good/shard-")
    local = _take(StreamingLoader(root / "good", LoaderConfig(**CFG)), 30)  # past one epoch of every stream
    assert _same(_take(StreamingLoader(remote, LoaderConfig(**CFG, num_workers=2)), 30), local)


def test_pipe_shards_give_the_batches_of_the_local_files(served, tmp_path):
    root, _ = served
    m = json.loads((root / "good" / "manifest.json").read_text())
    for s in m["shards"]:
        s["url"] = f"pipe:cat {root / 'good' / s['url']}"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    local = _take(StreamingLoader(root / "good", LoaderConfig(**CFG)), 12)
    assert _same(_take(StreamingLoader(tmp_path, LoaderConfig(**CFG)), 12), local)


def test_a_truncated_remote_shard_is_reported_like_a_local_one(served):
    root, base = served
    cfg = LoaderConfig(seq_len=16, global_rows=1, num_streams=1, shuffle=False)
    with pytest.raises(DataError, match=r"shard http://.*/cut/shard-000002\.tar: (corrupt or truncated|holds)"):
        _take(StreamingLoader(Manifest.load(f"{base}/cut"), cfg), 400)
    with pytest.raises(DataError, match=r"shard .*/cut/shard-000002\.tar: (corrupt or truncated|holds)"):
        _take(StreamingLoader(root / "cut", cfg), 400)  # the same message for the local copy
    skipping = StreamingLoader(Manifest.load(f"{base}/cut"), LoaderConfig(**{**cfg.__dict__, "skip_bad": True}))
    _take(skipping, 400)
    assert skipping.stats["skipped"] >= 1


def test_an_unreachable_manifest_is_named(served):
    _, base = served
    with pytest.raises(DataError, match=r"/nowhere/manifest.json: cannot fetch the shard manifest"):
        Manifest.load(f"{base}/nowhere")
