"""Streaming loader over tokenized shards with exact and elastic resume.

The data is read by ``num_streams`` (V) *streams*, a number fixed by the config and independent of
the data-parallel size. Stream ``s`` reads, in each epoch, the shards ``perm(seed, epoch)[s::V]``,
documents in a (seed, epoch, shard) order, and packs them into rows on its own. Global batch ``k``
is ``rows_per_stream = global_rows / V`` consecutive rows of every stream, in stream order. DP rank
``r`` of ``P`` owns the contiguous block of ``V / P`` streams starting at ``r V / P``, so its local
batch is its slice of the global batch, and the concatenation over ranks is the global batch
whatever ``P`` is. A stream's whole state is four integers (epoch, shard position, document
position, offset in the document); saving those for every stream gives exact resume, at any DP
size that divides V (elastic).

DataLoader workers split a rank's streams; each yields one bundle (its streams' rows for one batch
and their states after them) per batch; the main process orders rows by stream, so batches do not
depend on the number of workers, and ``state_dict()`` reflects only the batches handed out.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import DataError
from .packing import (StreamCursor, chunk_for_span_corruption, pack_stream, pad_rows, raw_length_for,
                      span_corruption, span_lengths)
from .shards import Manifest, document_order, read_shard, stream_shards

log = logging.getLogger("xft_dist.data")
MODES = ("packed", "padded", "span")
STATE_FORMAT = 1


@dataclass(frozen=True)
class LoaderConfig:
    seq_len: int
    global_rows: int                 # sequences per optimizer step, all DP ranks together
    num_streams: int = 8             # fixed for a run: DP sizes must divide it
    mode: str = "packed"             # packed (causal LM) | padded (one document per row) | span (T5)
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    prefetch: int = 2
    skip_bad: bool = False           # skip (count, log) corrupt shards and bad documents instead of failing
    enc_len: int = 512               # span mode: encoder length; seq_len is the decoder length
    noise_density: float = 0.15
    mean_span: float = 3.0

    @classmethod
    def from_config(cls, data, train) -> "LoaderConfig":
        """From a run config's ``data`` and ``train`` sections (``global_rows`` is the global batch)."""
        return cls(seq_len=data.seq_len, global_rows=train.global_batch, num_streams=data.num_streams,
                   mode=data.mode, seed=train.seed, shuffle=data.shuffle, num_workers=data.num_workers,
                   skip_bad=data.skip_bad, enc_len=data.enc_len, noise_density=data.noise_density,
                   mean_span=data.mean_span)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"data.mode={self.mode!r}: expected one of {MODES}")
        for key in ("seq_len", "global_rows", "num_streams"):
            if getattr(self, key) < 1:
                raise DataError(f"data.{key}={getattr(self, key)}: expected a positive integer")
        if self.global_rows % self.num_streams:
            raise DataError(f"data.global_rows={self.global_rows} must be a multiple of "
                            f"data.num_streams={self.num_streams}")


def num_sentinels(cfg: LoaderConfig) -> int:
    """Sentinel ids span corruption needs after the tokenizer's vocabulary (0 outside span mode)."""
    if cfg.mode != "span":
        return 0
    raw = raw_length_for(cfg.enc_len, cfg.seq_len, cfg.noise_density, cfg.mean_span)
    return span_lengths(raw, cfg.noise_density, cfg.mean_span)[1]


def _initial_state() -> dict:
    return {"epoch": 0, "shard_pos": 0, "doc_pos": 0, "offset": 0}


class _Stream:
    """One stream: its documents in order, turned into rows, with a four-integer state."""

    def __init__(self, sid: int, manifest: Manifest, cfg: LoaderConfig, vocab_size: int, state: dict):
        self.sid, self.manifest, self.cfg, self.vocab_size = sid, manifest, cfg, vocab_size
        tok = manifest.tokenizer
        self.eos, self.pad = tok["eos_id"], tok["pad_id"]
        self.start_id = tok.get("bos_id") if tok.get("bos_id") is not None else tok["eos_id"]
        self.state = dict(state)
        self.events: list[str] = []
        self._docs_iter = self._iter_docs()
        self._buf: list[tuple[tuple[int, int, int], np.ndarray]] = []  # packed: docs from the cursor on
        if cfg.mode == "span":
            self.raw_len = raw_length_for(cfg.enc_len, cfg.seq_len, cfg.noise_density, cfg.mean_span)

    def _iter_docs(self):
        """(epoch, shard_pos, doc_pos), document ... from the state on, across shards and epochs."""
        epoch, shard_pos, doc_pos = self.state["epoch"], self.state["shard_pos"], self.state["doc_pos"]
        n = len(self.manifest.shards)
        empty_epochs = 0
        while True:
            order = stream_shards(n, self.cfg.num_streams, self.sid, seed=self.cfg.seed, epoch=epoch,
                                  shuffle=self.cfg.shuffle)
            produced = False
            while shard_pos < len(order):
                shard = order[shard_pos]
                docs, report = read_shard(self.manifest.shards[shard], vocab_size=self.vocab_size,
                                          skip_bad=self.cfg.skip_bad)
                self.events.extend(report.messages)
                perm = document_order(len(docs), seed=self.cfg.seed, epoch=epoch, shard=shard,
                                      shuffle=self.cfg.shuffle)
                for pos in range(doc_pos, len(docs)):
                    produced = True
                    yield (epoch, shard_pos, pos), docs[perm[pos]]
                shard_pos, doc_pos = shard_pos + 1, 0
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError(f"stream {self.sid} found no readable documents in its shards")
            epoch, shard_pos = epoch + 1, 0

    def _set_state(self, loc, offset: int) -> None:
        self.state = {"epoch": loc[0], "shard_pos": loc[1], "doc_pos": loc[2], "offset": offset}

    def take(self, k: int) -> dict[str, np.ndarray]:
        rows = self._take_packed(k) if self.cfg.mode == "packed" else self._take_units(k)
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def _take_packed(self, k: int) -> list[dict]:
        if not self._buf:
            self._buf.append(next(self._docs_iter))
        cursor, rows = StreamCursor(0, self.state["offset"]), []
        while len(rows) < k:
            new, cursor = pack_stream([d for _, d in self._buf], cursor, self.cfg.seq_len,
                                      eos_id=self.eos, pad_id=self.pad, max_rows=k - len(rows))
            rows.extend(new)
            if len(rows) < k:
                self._buf.append(next(self._docs_iter))
        if cursor.doc == len(self._buf):
            self._buf.append(next(self._docs_iter))
        self._buf = self._buf[cursor.doc:]
        self._set_state(self._buf[0][0], cursor.offset)
        return rows

    def _units(self, loc, doc) -> list[dict]:
        if self.cfg.mode == "padded":
            return pad_rows(doc, self.cfg.seq_len, eos_id=self.eos, pad_id=self.pad)
        out = []
        for i, chunk in enumerate(chunk_for_span_corruption(doc, self.raw_len)):
            rng = np.random.default_rng([self.cfg.seed, loc[0], loc[1], loc[2], i, self.sid])
            out.append(span_corruption(chunk, enc_len=self.cfg.enc_len, dec_len=self.cfg.seq_len,
                                       sentinel_start=self.vocab_size_tokenizer, eos_id=self.eos,
                                       pad_id=self.pad, start_id=self.start_id, rng=rng,
                                       noise_density=self.cfg.noise_density, mean_span=self.cfg.mean_span))
        return out

    @property
    def vocab_size_tokenizer(self) -> int:
        return self.manifest.tokenizer["vocab_size"]

    def _take_units(self, k: int) -> list[dict]:
        rows = []
        if not self._buf:
            loc, doc = next(self._docs_iter)
            self._buf = [(loc, self._units(loc, doc))]
        offset = self.state["offset"]
        while True:
            loc, units = self._buf[0]
            while offset < len(units) and len(rows) < k:
                rows.append(units[offset])
                offset += 1
            if offset == len(units):
                loc, doc = next(self._docs_iter)
                self._buf, offset = [(loc, self._units(loc, doc))], 0
            if len(rows) == k:
                self._set_state(self._buf[0][0], offset)
                return rows


class _Source(torch.utils.data.IterableDataset):
    """Yields one bundle per batch: rows and post-batch states of this worker's streams."""

    def __init__(self, manifest: Manifest, cfg: LoaderConfig, vocab_size: int, states: dict[int, dict],
                 rows_per_stream: int):
        super().__init__()
        self.manifest, self.cfg, self.vocab_size = manifest, cfg, vocab_size
        self.states, self.rows_per_stream = states, rows_per_stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = sorted(self.states)[worker::workers]
        streams = [_Stream(s, self.manifest, self.cfg, self.vocab_size, self.states[s]) for s in mine]
        while True:
            bundle = {"rows": {}, "states": {}, "events": []}
            for st in streams:
                bundle["rows"][st.sid] = st.take(self.rows_per_stream)
                bundle["states"][st.sid] = dict(st.state)
                bundle["events"].extend(st.events)
                st.events.clear()
            yield bundle


def _identity(x):
    return x


class StreamingLoader:
    """Batches for one data-parallel rank: ``dict`` of tensors with ``global_rows / dp_size`` rows.

    Packed / padded: ``input_ids``, ``labels``, ``doc_ids``, ``positions`` (long), ``loss_mask``
    (float), ``mask`` (bool) ``[rows, seq_len]``. Span: ``src``, ``src_mask`` ``[rows, enc_len]``,
    ``tgt``, ``tgt_mask`` ``[rows, seq_len + 1]``. Every batch has ``stream [rows]``. Infinite:
    epochs follow one another; ``state_dict()["streams"]`` shows each stream's epoch.

    TP peers pass the same ``dp_rank`` and get identical batches.
    """

    def __init__(self, manifest: str | Manifest, cfg: LoaderConfig, *, dp_rank: int = 0, dp_size: int = 1,
                 vocab_size: int | None = None):
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.cfg = cfg
        tok_vocab = self.manifest.tokenizer["vocab_size"]
        if vocab_size is not None:
            self.manifest.check_vocab(vocab_size)
        self.vocab_size = tok_vocab  # ids in shards must be real tokens, whatever the model pads to
        self.num_sentinels = num_sentinels(cfg)
        if cfg.mode == "span":
            if vocab_size is not None and vocab_size < tok_vocab + self.num_sentinels:
                raise DataError(f"span corruption needs {self.num_sentinels} sentinel ids after the "
                                f"tokenizer's {tok_vocab}: model vocab_size {vocab_size} < {tok_vocab + self.num_sentinels}")
        V = cfg.num_streams
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: expected 0 <= dp_rank < dp_size")
        if V % dp_size:
            raise DataError(f"data.num_streams={V} must be divisible by the data-parallel size {dp_size}")
        if len(self.manifest.shards) < V:
            raise DataError(f"{self.manifest.path}: {len(self.manifest.shards)} shards for "
                            f"data.num_streams={V}: need at least one shard per stream (make more, smaller shards)")
        per_rank = V // dp_size
        self.streams = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.rows_per_stream = cfg.global_rows // V
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._states = {s: _initial_state() for s in self.streams}
        self.batches = 0
        self.stats = {"skipped": 0}

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self):
        workers = min(self.cfg.num_workers, len(self.streams))
        source = _Source(self.manifest, self.cfg, self.vocab_size, copy.deepcopy(self._states),
                         self.rows_per_stream)
        if workers == 0:
            it = iter(source)
        else:
            it = iter(torch.utils.data.DataLoader(source, batch_size=None, num_workers=workers,
                                                  collate_fn=_identity, prefetch_factor=self.cfg.prefetch))
        while True:
            bundles = [next(it) for _ in range(max(workers, 1))]
            rows, states = {}, {}
            for b in bundles:
                rows.update(b["rows"])
                states.update(b["states"])
                for msg in b["events"]:
                    self.stats["skipped"] += 1
                    log.warning("skipped bad data: %s", msg)
            batch = {key: torch.from_numpy(np.concatenate([rows[s][key] for s in self.streams]))
                     for key in rows[self.streams[0]]}
            batch["stream"] = torch.tensor(self.streams).repeat_interleave(self.rows_per_stream)
            self._states.update(states)
            self.batches += 1
            yield batch

    # ---------------------------------------------------------------------------------- state
    def fingerprint(self) -> dict:
        keys = ("seq_len", "global_rows", "num_streams", "mode", "seed", "shuffle", "enc_len",
                "noise_density", "mean_span")
        cfg = asdict(self.cfg)
        return {"manifest": self.manifest.digest, **{k: cfg[k] for k in keys}}

    def state_dict(self) -> dict:
        """This rank's streams after the batches handed out so far (plain ints: JSON-safe)."""
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint(), "batches": self.batches,
                "streams": {str(s): dict(v) for s, v in self._states.items()}}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Union of every DP rank's ``state_dict()``: what a checkpoint stores for elastic resume."""
        if not states:
            raise DataError("merge_states needs at least one loader state")
        merged = copy.deepcopy(states[0])
        for st in states[1:]:
            if st["fingerprint"] != merged["fingerprint"] or st["batches"] != merged["batches"]:
                raise DataError("loader states from different runs or steps cannot be merged")
            merged["streams"].update(st["streams"])
        return merged

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT}")
        mine = self.fingerprint()
        for key, value in mine.items():
            if state["fingerprint"].get(key) != value:
                raise DataError(f"loader state was saved with {key}={state['fingerprint'].get(key)!r}, "
                                f"this loader has {key}={value!r}")
        missing = [s for s in self.streams if str(s) not in state["streams"]]
        if missing:
            raise DataError(f"loader state lacks streams {missing}: merge every DP rank's state "
                            "(StreamingLoader.merge_states) before resuming at another DP size")
        self._states = {s: dict(state["streams"][str(s)]) for s in self.streams}
        self.batches = state["batches"]
