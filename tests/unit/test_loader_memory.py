"""The loader reads a shard as a stream of documents: its memory does not grow with shard size.
Four streams over four shards of ~80 MB each (320 MB of tokens): the process grows by a few MB, where
holding a shard per stream would take over a gigabyte (int64)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from xft_dist.data.shards import ShardWriter
from xft_dist.data.tokenizer import ByteTokenizer

CHILD = """
import json, sys
from xft_dist.data import LoaderConfig, Manifest, StreamingLoader

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

m = Manifest.load(sys.argv[1])
before = rss()
it = iter(StreamingLoader(m, LoaderConfig(seq_len=2048, global_rows=4, num_streams=4, shuffle_buffer=16)))
peak, tokens = rss(), 0
for _ in range(400):  # 400 x 4 rows x 2048 = 3.3M tokens: ~50 documents of every stream
    tokens += next(it).input_ids.numel()
    peak = max(peak, rss())
print(json.dumps({"before": before, "peak": peak, "tokens": tokens}))
"""


def test_loader_memory_does_not_grow_with_shard_size(tmp_path):
    rng = np.random.default_rng(0)
    doc = 64 * 1024  # tokens: 128 KiB a document as uint16
    with ShardWriter(tmp_path, ByteTokenizer().identity(), shard_tokens=40 * 1024 * 1024) as w:
        for _ in range(4 * 640):
            w.write(rng.integers(3, 259, doc, dtype=np.uint16))
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("shard-*.tar"))]
    assert len(sizes) == 4 and min(sizes) > 75e6
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    mem = json.loads(res.stdout.strip().splitlines()[-1])
    growth = mem["peak"] - mem["before"]
    # 4 streams x (16 buffered + a few in flight) x 128 KiB, plus the batch arrays: well under 100 MiB
    assert growth < 100, mem
