"""Tokenized webdataset shards: writing, the manifest, reading one shard with bad-data checks, and
the deterministic shard -> stream assignment.

A shard is a tar of samples ``{"__key__": "<doc index>", "tokens.npy": int array}``; the manifest
(``manifest.json`` beside the shards) lists every shard with its document and token counts, plus
the tokenizer's identity and vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

MANIFEST = "manifest.json"
FORMAT = "xft_dist.shards/1"


@dataclass
class ShardInfo:
    url: str
    documents: int
    tokens: int


@dataclass
class Manifest:
    path: Path
    shards: list[ShardInfo]
    tokenizer: dict
    documents: int = 0
    tokens: int = 0
    digest: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """A manifest from a directory (or the file itself), or from an ``http(s)://`` URL of one (its
        ``manifest.json``); shard URLs relative to the manifest are resolved against it."""
        if isinstance(path, str) and path.startswith(("http://", "https://")):
            return cls._load_url(path)
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: no shard manifest (build shards with tools/make_shards.py)") from None
        return cls._parse(raw, path, lambda url: str(path.parent / url))

    @classmethod
    def _load_url(cls, url: str) -> "Manifest":
        import urllib.error
        import urllib.request

        if not url.endswith(".json"):
            url = url.rstrip("/") + "/" + MANIFEST
        try:
            with urllib.request.urlopen(url, timeout=60) as f:
                raw = f.read()
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"{url}: cannot fetch the shard manifest ({e})") from None
        base = url.rsplit("/", 1)[0]
        return cls._parse(raw, Path(url.split("://", 1)[1]), lambda rel: f"{base}/{rel}", origin=url)

    @classmethod
    def _parse(cls, raw: bytes, path: Path, resolve, origin: str | None = None) -> "Manifest":
        where = origin or str(path)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if data.get("format") != FORMAT:
            raise DataError(f"{where}: format {data.get('format')!r}, expected {FORMAT!r}")
        shards = []
        for s in data.get("shards", []):
            url = s["url"]
            if "://" not in url and not url.startswith("pipe:") and not os.path.isabs(url):
                url = resolve(url)
            shards.append(ShardInfo(url=url, documents=int(s["documents"]), tokens=int(s["tokens"])))
        if not shards:
            raise DataError(f"{where}: the manifest lists no shards")
        return cls(path=path, shards=shards, tokenizer=data["tokenizer"], documents=data["documents"],
                   tokens=data["tokens"], digest=hashlib.sha256(raw).hexdigest()[:16])

    def check_vocab(self, vocab_size: int) -> None:
        v = self.tokenizer["vocab_size"]
        if v > vocab_size:
            raise DataError(f"{self.path}: shards use a {self.tokenizer['kind']} tokenizer with vocab_size={v}, "
                            f"larger than the model's vocabulary ({vocab_size})")


def write_manifest(out_dir: Path, shards: list[ShardInfo], tokenizer: dict) -> Path:
    """Write the manifest atomically (a temp file renamed into place): readers never see half of it."""
    data = {
        "format": FORMAT, "tokenizer": tokenizer,
        "documents": sum(s.documents for s in shards), "tokens": sum(s.tokens for s in shards),
        "shards": [{"url": os.path.relpath(s.url, out_dir) if "://" not in s.url else s.url,
                    "documents": s.documents, "tokens": s.tokens} for s in shards],
    }
    path = out_dir / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def stream_shards(num_shards: int, num_streams: int, stream: int, *, seed: int, epoch: int,
                  shuffle: bool) -> list[int]:
    """Shard indices stream ``stream`` reads in ``epoch``: a (seed, epoch) permutation dealt round-robin.

    Over the streams of one epoch, every shard appears exactly once.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
    return [int(i) for i in order[stream::num_streams]]


class ShardWriter:
    """Writes token arrays into ``shard-NNNNNN.tar`` files of about ``shard_tokens`` tokens each,
    then the manifest (last, atomically). Use as a context manager."""

    def __init__(self, out_dir: str | Path, tokenizer: dict, *, shard_tokens: int = 1 << 20,
                 start_index: int = 0, existing: list[ShardInfo] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.shard_tokens = tokenizer, shard_tokens
        self.dtype = token_dtype(tokenizer["vocab_size"])
        self.shards: list[ShardInfo] = list(existing or [])
        self.index = start_index
        self.docs_written = 0
        self._tar = None

    def _open(self):
        import webdataset as wds

        path = self.out_dir / f"shard-{self.index:06d}.tar"
        self._tar = wds.TarWriter(str(path))
        self._current = ShardInfo(url=str(path), documents=0, tokens=0)

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            self.shards.append(self._current)
            self.index += 1
            self._tar = None

    def write(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": f"{self.docs_written:010d}", "tokens.npy": arr})
        self._current.documents += 1
        self._current.tokens += len(arr)
        self.docs_written += 1
        if self._current.tokens >= self.shard_tokens:
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._close()
        if exc_type is None:
            write_manifest(self.out_dir, self.shards, self.tokenizer)
        return False
