"""Where a stream's documents come from: one or several corpora (a weighted mixture), each read
shard by shard as a stream of documents in bounded memory.

**Reading.** A shard is iterated with webdataset's tar iteration (a local file, ``http(s)://`` or a
``pipe:`` command), one document at a time, each validated as it arrives; nothing holds more than
the shuffle buffer. Within a shard the order is a seeded *buffer shuffle*: the first ``buffer``
documents fill a buffer, then each arriving document replaces a randomly drawn one, which is emitted
(the remainder is emitted in a random order at the end). The order is a function of (seed, epoch,
shard) and the shard's contents, so a position in it (``doc_pos``: documents emitted so far) is
resumed exactly by reading the shard again from its start and skipping that many.

**Mixtures.** Each source has its own shard order per epoch (the shards dealt round-robin to the
streams, as for one corpus) and runs its epochs on its own: a source that runs out starts its next
epoch while the others go on. A stream blends its sources row by row (``loader._Stream``): each
row comes from the source furthest below its weight's share of the tokens the stream has handed
out in rows (``weight_i * total - tokens_i``, ties to the first), and holds the next tokens of that
source's own document stream. Realised shares then stay within one row of the weights on every
stream at every step, whatever the documents' lengths, and the choice is a function of the
per-source token counts, which are part of the stream state.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .shards import Manifest, ShardInfo, stream_shards

DEFAULT_SHUFFLE_BUFFER = 1024


@dataclass
class Source:
    name: str
    manifest: Manifest
    weight: float = 1.0


@dataclass
class Mixture:
    """The corpora a run reads, with their weights (normalised here). One source: plain ``data.shards``."""

    sources: list[Source]
    weights: list[float] = field(init=False)

    def __post_init__(self):
        if not self.sources:
            raise DataError("a data mixture needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.sources: names must be unique, got {names}")
        for s in self.sources:
            if not s.weight > 0:
                raise DataError(f"data.sources[{s.name}].weight={s.weight}: expected > 0")
        first = self.sources[0]
        for s in self.sources[1:]:
            if s.manifest.tokenizer != first.manifest.tokenizer:
                raise DataError(
                    f"sources {first.name!r} ({first.manifest.path}: {_describe(first.manifest.tokenizer)}) and "
                    f"{s.name!r} ({s.manifest.path}: {_describe(s.manifest.tokenizer)}) use different tokenizers; "
                    "every source of a mixture must be tokenized alike")
        total = sum(s.weight for s in self.sources)
        self.weights = [s.weight / total for s in self.sources]

    @classmethod
    def single(cls, manifest: Manifest, name: str = "main") -> "Mixture":
        return cls([Source(name, manifest, 1.0)])

    @property
    def tokenizer(self) -> dict:
        return self.sources[0].manifest.tokenizer

    @property
    def digest(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0].manifest.digest
        # The weights are not part of it: a resumed run may change them (the counts carry on).
        text = ";".join(f"{s.name}={s.manifest.digest}" for s in self.sources)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check_streams(self, num_streams: int) -> None:
        for s in self.sources:
            n = len(s.manifest.shards)
            if n < num_streams:
                what = f"source {s.name!r} ({s.manifest.path})" if len(self.sources) > 1 else str(s.manifest.path)
                raise DataError(f"{what}: {n} shards for data.num_streams={num_streams}: need at least one shard "
                                f"per stream, i.e. {num_streams} (make more, smaller shards)")


def _describe(tok: dict) -> str:
    return f"{tok.get('kind')} tokenizer, vocab_size={tok.get('vocab_size')}"


def pick_source(weights: list[float], tokens: list[int]) -> int:
    """The source furthest below its share of the tokens drawn so far (ties: the first)."""
    total = sum(tokens)
    deficits = [w * total - t for w, t in zip(weights, tokens)]
    return int(np.argmax(deficits))


# ------------------------------------------------------------------------------------------ reading

_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \}")


def decode_tokens(payload: bytes) -> np.ndarray:
    """A ``tokens.npy`` payload as a 1-D array without copying. The common header (a 1-D integer
    array, as ``ShardWriter`` writes) is parsed with one regular expression instead of NumPy's
    ``literal_eval`` of the header (a third of the decode time); anything else goes to ``np.load``."""
    if payload[:6] == _NPY_MAGIC and payload[6] in (1, 2, 3):
        start = 10 if payload[6] == 1 else 12
        size = int.from_bytes(payload[8:start], "little")
        m = _NPY_HEADER.match(payload, start, start + size)
        if m is not None:
            dtype, count = np.dtype(m.group(1).decode()), int(m.group(2))
            if len(payload) - start - size != count * dtype.itemsize:
                raise ValueError(f"{len(payload) - start - size} data bytes for {count} x {dtype}")
            return np.frombuffer(payload, dtype=dtype, count=count, offset=start + size)
    return np.load(io.BytesIO(payload), allow_pickle=False)

@dataclass
class ReadReport:
    """What reading skipped (only when skipping bad data is allowed)."""
    messages: list[str] = field(default_factory=list)


def iter_shard(info: ShardInfo, *, vocab_size: int, skip_bad: bool, report: ReadReport):
    """The documents of one shard, validated, as they arrive (stored dtype, not copied). Bad data
    raises ``DataError`` naming the shard and the position, or (``skip_bad``) is skipped and
    reported; a corrupt or truncated archive ends the shard there."""
    import webdataset as wds

    def bad(msg: str) -> None:
        full = f"shard {info.url}: {msg}"
        if not skip_bad:
            raise DataError(full)
        report.messages.append(full)

    everything = lambda src: src  # noqa: E731 - shard and worker assignment is ours, not webdataset's
    count = 0
    ds = wds.WebDataset([info.url], shardshuffle=False, nodesplitter=everything, workersplitter=everything,
                        empty_check=False)
    it = iter(ds)
    while True:
        try:
            sample = next(it)
        except StopIteration:
            break
        except DataError:
            raise
        except Exception as e:  # tarfile / webdataset / transport errors: corrupt, truncated or unreachable
            bad(f"corrupt or truncated tar after {count} samples ({type(e).__name__}: {e})")
            return
        key = sample.get("__key__", "?")
        payload = sample.get("tokens.npy")
        count += 1
        if payload is None:
            bad(f"sample {count - 1} (key {key}) has no tokens.npy")
            continue
        try:
            arr = decode_tokens(payload)
        except ValueError as e:
            bad(f"sample {count - 1} (key {key}): tokens.npy cannot be decoded ({e})")
            continue
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            bad(f"sample {count - 1} (key {key}): expected a 1-D integer array, got {arr.dtype} {arr.shape}")
            continue
        if len(arr) == 0:
            bad(f"sample {count - 1} (key {key}) is a zero-length document")
            continue
        top = int(arr.max())
        if top >= vocab_size:
            bad(f"sample {count - 1} (key {key}): token id {top} at position {int(arr.argmax())} "
                f">= vocab_size {vocab_size}")
            continue
        yield arr
    if count == 0:
        bad("empty shard (no samples)")
    elif count != info.documents:
        bad(f"holds {count} samples but the manifest says {info.documents} (truncated or replaced?)")


def buffer_shuffle(docs, size: int, rng: np.random.Generator):
    """``docs`` in a seeded buffer-shuffled order, holding at most ``size`` of them."""
    buf: list = []
    for d in docs:
        if len(buf) < size:
            buf.append(d)
            continue
        i = int(rng.integers(size))
        out, buf[i] = buf[i], d
        yield out
    for i in rng.permutation(len(buf)):
        yield buf[i]


class SourceReader:
    """One source's documents for one stream, from a position ``(epoch, shard_pos, doc_pos)`` on,
    across shards and epochs; ``position`` is where the next document comes from."""

    def __init__(self, manifest: Manifest, *, stream: int, num_streams: int, seed: int, salt: int, shuffle: bool,
                 buffer: int, vocab_size: int, skip_bad: bool, report: ReadReport, position: tuple[int, int, int]):
        self.manifest, self.stream, self.num_streams = manifest, stream, num_streams
        self.seed, self.salt, self.shuffle, self.buffer = seed, salt, shuffle, buffer
        self.vocab_size, self.skip_bad, self.report = vocab_size, skip_bad, report
        self.position = position
        self._docs = self._iterate()

    def _order(self, epoch: int) -> list[int]:
        seed = self.seed if self.salt == 0 else self.seed * 1_000_003 + self.salt  # source 0: as one corpus
        return stream_shards(len(self.manifest.shards), self.num_streams, self.stream, seed=seed, epoch=epoch,
                             shuffle=self.shuffle)

    def _iterate(self):
        epoch, shard_pos, doc_pos = self.position
        empty_epochs = 0
        while True:
            order = self._order(epoch)
            produced = False
            while shard_pos < len(order):
                shard = order[shard_pos]
                docs = iter_shard(self.manifest.shards[shard], vocab_size=self.vocab_size, skip_bad=self.skip_bad,
                                  report=self.report)
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch, shard, 1, self.salt])
                    docs = buffer_shuffle(docs, self.buffer, rng)
                for pos, doc in enumerate(docs):
                    if pos < doc_pos:
                        continue  # resuming inside this shard: replay its order up to the position
                    produced = True
                    self.position = (epoch, shard_pos, pos + 1)
                    yield doc
                shard_pos, doc_pos = shard_pos + 1, 0
                self.position = (epoch, shard_pos, 0)
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError(f"stream {self.stream} found no readable documents in its shards of "
                                f"{self.manifest.path}")
            epoch, shard_pos = epoch + 1, 0
            self.position = (epoch, 0, 0)

    def next(self) -> np.ndarray:
        return next(self._docs)
