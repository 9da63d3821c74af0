"""Streaming loader over tokenized shards with exact and elastic resume.

The data is read by ``num_streams`` (V) *streams*, a number fixed by the config and independent of
the data-parallel size. Stream ``s`` reads, in each epoch, the shards ``perm(seed, epoch)[s::V]``,
each as a stream of documents in a seeded buffer-shuffled order (bounded memory; see sources.py),
from one corpus or a weighted mixture of several, and packs them into rows on its own. Global batch ``k``
is ``rows_per_stream = global_rows / V`` consecutive rows of every stream, in stream order. DP rank
``r`` of ``P`` owns the contiguous block of ``V / P`` streams starting at ``r V / P``, so its local
batch is its slice of the global batch, and the concatenation over ranks is the global batch
whatever ``P`` is. A stream's whole state is a few integers (per source: epoch, shard position,
document position, tokens drawn; and the offset in the head document); saving those for every
stream gives exact resume, at any DP size that divides V (elastic).

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
from .packing import chunk_for_span_corruption, pack_rows, pad_rows, raw_length_for, span_corruption, span_lengths
from .shards import Manifest
from .sources import DEFAULT_SHUFFLE_BUFFER, Mixture, ReadReport, SourceReader, pick_source

log = logging.getLogger("xft_dist.data")
MODES = ("packed", "padded", "span")
STATE_FORMAT = 2  # 1: one corpus, per-shard permutations (before bounded-memory reading)


@dataclass(frozen=True)
class LoaderConfig:
    seq_len: int
    global_rows: int                 # sequences per optimizer step, all DP ranks together
    num_streams: int = 8             # fixed for a run: DP sizes must divide it
    mode: str = "packed"             # packed (causal LM) | padded (one document per row) | span (T5)
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # documents held for the within-shard buffer shuffle
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
                   mode=data.mode, seed=train.seed, shuffle=data.shuffle, shuffle_buffer=data.shuffle_buffer,
                   num_workers=data.num_workers,
                   skip_bad=data.skip_bad, enc_len=data.enc_len, noise_density=data.noise_density,
                   mean_span=data.mean_span)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"data.mode={self.mode!r}: expected one of {MODES}")
        for key in ("seq_len", "global_rows", "num_streams", "shuffle_buffer"):
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


def _initial_state(num_sources: int = 1) -> dict:
    """A stream's state: per source ``[epoch, shard_pos, doc_pos, tokens drawn]`` as they were
    before the document at the head of the stream was drawn, the source of that document
    (``head``), and ``offset`` into it (tokens when packing, rows otherwise)."""
    return {"sources": [[0, 0, 0, 0] for _ in range(num_sources)], "head": 0, "offset": 0}


class _Stream:
    """One stream: its documents in order (one source, or a weighted mixture), turned into rows."""

    def __init__(self, sid: int, mixture: Mixture, cfg: LoaderConfig, vocab_size: int, state: dict):
        self.sid, self.mixture, self.cfg, self.vocab_size = sid, mixture, cfg, vocab_size
        tok = mixture.tokenizer
        self.eos, self.pad = tok["eos_id"], tok["pad_id"]
        self.start_id = tok.get("bos_id") if tok.get("bos_id") is not None else tok["eos_id"]
        self.state = copy.deepcopy(state)
        self.events: list[str] = []
        self._report = ReadReport()
        self._docs_iter = self._iter_docs()
        self._buf: list[tuple[list, np.ndarray]] = []  # packed: docs from the cursor on
        if cfg.mode == "span":
            self.raw_len = raw_length_for(cfg.enc_len, cfg.seq_len, cfg.noise_density, cfg.mean_span)

    def _iter_docs(self):
        """(snapshot, document) from the state on: the snapshot (every source's position and token
        count before this document was drawn, and the source it came from) restarts the sequence at
        this document."""
        cfg, weights = self.cfg, self.mixture.weights
        positions = [list(p) for p in self.state["sources"]]
        readers = [SourceReader(src.manifest, stream=self.sid, num_streams=cfg.num_streams, seed=cfg.seed, salt=i,
                                shuffle=cfg.shuffle, buffer=cfg.shuffle_buffer, vocab_size=self.vocab_size,
                                skip_bad=cfg.skip_bad, report=self._report, position=tuple(positions[i][:3]))
                   for i, src in enumerate(self.mixture.sources)]
        while True:
            before = [list(p) for p in positions]
            i = pick_source(weights, [p[3] for p in positions]) if len(readers) > 1 else 0
            snapshot = {"sources": before, "head": i}
            doc = readers[i].next().astype(np.int64)
            positions[i][:3] = readers[i].position
            positions[i][3] += len(doc)
            self.events.extend(self._report.messages)
            self._report.messages.clear()
            yield snapshot, doc

    def _set_state(self, snapshot, offset: int) -> None:
        self.state = {"sources": snapshot["sources"], "head": snapshot["head"], "offset": offset}

    def take(self, k: int) -> dict[str, np.ndarray]:
        if self.cfg.mode == "packed":
            return self._take_packed(k)
        rows = self._take_units(k)
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def _take_packed(self, k: int) -> dict[str, np.ndarray]:
        need, offset = k * self.cfg.seq_len + 1, self.state["offset"]
        have = sum(len(d) + 1 for _, d in self._buf) - offset
        while have < need:
            self._buf.append(next(self._docs_iter))
            have += len(self._buf[-1][1]) + 1
        rows, cursor = pack_rows([d for _, d in self._buf], offset, k, self.cfg.seq_len, eos_id=self.eos)
        self._buf = self._buf[cursor.doc:]
        self._set_state(self._buf[0][0], cursor.offset)
        return rows

    def _units(self, loc, doc) -> list[dict]:
        if self.cfg.mode == "padded":
            return pad_rows(doc, self.cfg.seq_len, eos_id=self.eos, pad_id=self.pad)
        out = []
        for i, chunk in enumerate(chunk_for_span_corruption(doc, self.raw_len)):
            rng = np.random.default_rng([self.cfg.seed, *(v for p in loc["sources"] for v in p[:3]), i, self.sid])
            out.append(span_corruption(chunk, enc_len=self.cfg.enc_len, dec_len=self.cfg.seq_len,
                                       sentinel_start=self.vocab_size_tokenizer, eos_id=self.eos,
                                       pad_id=self.pad, start_id=self.start_id, rng=rng,
                                       noise_density=self.cfg.noise_density, mean_span=self.cfg.mean_span))
        return out

    @property
    def vocab_size_tokenizer(self) -> int:
        return self.mixture.tokenizer["vocab_size"]

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

    def __init__(self, mixture: Mixture, cfg: LoaderConfig, vocab_size: int, states: dict[int, dict],
                 rows_per_stream: int):
        super().__init__()
        self.mixture, self.cfg, self.vocab_size = mixture, cfg, vocab_size
        self.states, self.rows_per_stream = states, rows_per_stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = sorted(self.states)[worker::workers]
        streams = [_Stream(s, self.mixture, self.cfg, self.vocab_size, self.states[s]) for s in mine]
        while True:
            bundle = {"rows": {}, "states": {}, "events": []}
            for st in streams:
                bundle["rows"][st.sid] = st.take(self.rows_per_stream)
                bundle["states"][st.sid] = copy.deepcopy(st.state)
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
    epochs follow one another; ``source_stats()`` gives each source's tokens and epoch.

    TP peers pass the same ``dp_rank`` and get identical batches.
    """

    def __init__(self, manifest: str | Manifest | Mixture, cfg: LoaderConfig, *, dp_rank: int = 0, dp_size: int = 1,
                 vocab_size: int | None = None):
        if isinstance(manifest, Mixture):
            self.mixture = manifest
        else:
            self.mixture = Mixture.single(manifest if isinstance(manifest, Manifest) else Manifest.load(manifest))
        self.manifest = self.mixture.sources[0].manifest  # the tokenizer's identity (shared by every source)
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
        self.mixture.check_streams(V)
        per_rank = V // dp_size
        self.streams = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.rows_per_stream = cfg.global_rows // V
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._states = {s: _initial_state(len(self.mixture.sources)) for s in self.streams}
        self.batches = 0
        self.stats = {"skipped": 0}

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self):
        workers = min(self.cfg.num_workers, len(self.streams))
        source = _Source(self.mixture, self.cfg, self.vocab_size, copy.deepcopy(self._states),
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
        keys = ("seq_len", "global_rows", "num_streams", "mode", "seed", "shuffle", "shuffle_buffer", "enc_len",
                "noise_density", "mean_span")
        cfg = asdict(self.cfg)
        return {"manifest": self.mixture.digest, **{k: cfg[k] for k in keys}}

    def source_stats(self) -> dict[str, dict[str, int]]:
        """Per source, over this rank's streams after the batches handed out: ``tokens`` (document
        tokens handed out in rows; in padded / span mode, of the documents begun) and ``epoch`` (the
        furthest any stream has got)."""
        packed = self.cfg.mode == "packed"
        out = {}
        for i, src in enumerate(self.mixture.sources):
            tokens = sum(st["sources"][i][3] + (st["offset"] if packed and st["head"] == i else 0)
                         for st in self._states.values())
            out[src.name] = {"tokens": tokens, "epoch": max(st["sources"][i][0] for st in self._states.values())}
        return out

    def state_dict(self) -> dict:
        """This rank's streams after the batches handed out so far (plain ints: JSON-safe)."""
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint(), "batches": self.batches,
                "streams": {str(s): copy.deepcopy(v) for s, v in self._states.items()}}

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
            raise DataError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT} (format 1 was "
                            "written before shards were read in bounded memory; its document order cannot be "
                            "continued exactly: start the data from the beginning or resume with that version)")
        mine = self.fingerprint()
        for key, value in mine.items():
            if state["fingerprint"].get(key) != value:
                raise DataError(f"loader state was saved with {key}={state['fingerprint'].get(key)!r}, "
                                f"this loader has {key}={value!r}")
        missing = [s for s in self.streams if str(s) not in state["streams"]]
        if missing:
            raise DataError(f"loader state lacks streams {missing}: merge every DP rank's state "
                            "(StreamingLoader.merge_states) before resuming at another DP size")
        self._states = {s: copy.deepcopy(state["streams"][str(s)]) for s in self.streams}
        self.batches = state["batches"]
