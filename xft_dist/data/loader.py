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

from .batch import Batch
from .errors import DataError
from .packing import (
    chunk_for_span_corruption,
    mlm_corrupt,
    pack_rows,
    pad_rows,
    raw_length_for,
    span_corruption,
    span_lengths,
)
from .shards import Manifest
from .sources import DEFAULT_SHUFFLE_BUFFER, Mixture, ReadReport, SourceReader, pick_source

log = logging.getLogger("xft_dist.data")
_OLD_FORMATS = {1: "format 1 was written before shards were read in bounded memory",
                2: "format 2 chose a mixture's source per document, format 3 per row"}
MODES = ("packed", "padded", "span", "mlm")
MLM_SALT = 0x6D6C6D  # keeps the masking draws apart from every other use of the seed
STATE_FORMAT = 3  # 2: sources chosen per document; 1: one corpus, per-shard permutations


@dataclass(frozen=True)
class LoaderConfig:
    """The loader's settings: each field but ``prefetch`` is the run config's ``KEYS[field]``
    (``from_config``)."""

    seq_len: int
    global_rows: int                 # sequences per optimizer step, all DP ranks together
    num_streams: int = 8             # fixed for a run: DP sizes must divide it
    mode: str = "packed"             # packed (causal LM) | padded (one document per row) | span (T5) | mlm
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # documents held for the within-shard buffer shuffle
    num_workers: int = 0
    prefetch: int = 2
    skip_bad: bool = False           # skip (count, log) corrupt shards and bad documents instead of failing
    enc_len: int = 512               # span mode: encoder length; seq_len is the decoder length
    noise_density: float = 0.15
    mean_span: float = 3.0
    ignore_index: int = -100         # targets with this id never count (the batches' labels drop them)
    mlm_probability: float = 0.15    # mlm mode: fraction of real tokens chosen
    mlm_replace: tuple = (0.8, 0.1, 0.1)  # mlm mode: chosen -> mask id / random id / unchanged
    mlm_rows: str = "packed"         # mlm mode: packed (documents attend to themselves) | padded

    # The run config's key for each field; the fields outside RUNTIME fix the order of the data (the
    # fingerprint a resumed loader must match).
    KEYS = {"seq_len": "data.seq_len", "global_rows": "train.global_batch", "num_streams": "data.num_streams",
            "mode": "data.mode", "seed": "train.seed", "shuffle": "data.shuffle",
            "shuffle_buffer": "data.shuffle_buffer", "num_workers": "data.num_workers",
            "skip_bad": "data.skip_bad", "enc_len": "data.enc_len", "noise_density": "data.noise_density",
            "mean_span": "data.mean_span", "ignore_index": "loss.ignore_index",
            "mlm_probability": "data.mlm_probability", "mlm_replace": "data.mlm_replace", "mlm_rows": "data.mlm_rows"}
    MLM_ONLY = ("mlm_probability", "mlm_replace", "mlm_rows")
    RUNTIME = ("num_workers", "prefetch", "skip_bad", "ignore_index")

    @classmethod
    def from_config(cls, cfg, *, validation: bool = False) -> "LoaderConfig":
        """From a run config (every field at its ``KEYS`` entry). ``validation``: the held-out set's
        loader (``data.valid.batch_rows`` rows, one stream, in order, no workers)."""
        def key(path):
            value = cfg
            for part in path.split("."):
                value = getattr(value, part)
            return value

        kw = {f: key(k) for f, k in cls.KEYS.items()}
        if validation:
            kw.update(global_rows=cfg.data.valid.batch_rows or cfg.train.global_batch, num_streams=1,
                      shuffle=False, num_workers=0)
        return cls(**kw)

    def fingerprint(self) -> dict:
        """The settings that fix the order of the data (JSON-shaped: a checkpoint stores them)."""
        skip = self.RUNTIME + (() if self.mode == "mlm" else self.MLM_ONLY)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in skip}

    @property
    def packs(self) -> bool:
        """Rows packed from a token stream (packed mode, packed mlm), not cut one document at a time."""
        return self.mode == "packed" or (self.mode == "mlm" and self.mlm_rows == "packed")

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"{self.KEYS['mode']}={self.mode!r}: expected one of {MODES}")
        for key in ("seq_len", "global_rows", "num_streams", "shuffle_buffer"):
            if getattr(self, key) < 1:
                raise DataError(f"{self.KEYS[key]}={getattr(self, key)}: expected a positive integer")
        if self.global_rows % self.num_streams:
            raise DataError(f"{self.KEYS['global_rows']}={self.global_rows} (rows a step) must be a multiple of "
                            f"{self.KEYS['num_streams']}={self.num_streams}")


def num_sentinels(cfg: LoaderConfig) -> int:
    """Special ids a mode needs after the tokenizer's vocabulary: span corruption's sentinels, the
    masked LM's mask id (the first id after the vocabulary); 0 otherwise."""
    if cfg.mode == "mlm":
        return 1
    if cfg.mode != "span":
        return 0
    raw = raw_length_for(cfg.enc_len, cfg.seq_len, cfg.noise_density, cfg.mean_span)
    return span_lengths(raw, cfg.noise_density, cfg.mean_span)[1]


def _initial_state(num_sources: int = 1) -> dict:
    """A stream's state: per source ``[epoch, shard_pos, doc_pos, offset, tokens]``: where the
    source's head document (the first with tokens left for this stream) is read from, the offset
    into it (tokens when packing, rows otherwise), and the tokens the source has handed out in rows."""
    return {"sources": [[0, 0, 0, 0, 0] for _ in range(num_sources)]}


class _Cursor:
    """One source's documents for one stream: those read ahead of the rows handed out (each with
    the position it was read from) and the offset into the first; ``tokens`` handed out so far."""

    def __init__(self, reader: SourceReader, offset: int, tokens: int):
        self.reader, self.offset, self.tokens = reader, offset, tokens
        self.buf: list[tuple[tuple, object]] = []
        self.have = -offset  # packed: tokens (documents + EOS) buffered past the offset

    def pull(self, make=None) -> None:
        before = self.reader.position
        doc = self.reader.next().astype(np.int64)
        self.buf.append((before, doc if make is None else make(before, doc)))
        self.have += len(doc) + 1

    def state(self) -> list[int]:
        head = self.buf[0][0] if self.buf else self.reader.position
        return [*head, self.offset, self.tokens]

    def take_packed(self, k: int, seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
        """``k`` rows cut from this source's documents, exactly as one corpus is packed."""
        while self.have < k * seq_len + 1:
            self.pull()
        docs = [d for _, d in self.buf]
        docs[0] = docs[0][self.offset:]  # only the head's tail takes part (positions restart per row anyway)
        rows, cursor = pack_rows(docs, 0, k, seq_len, eos_id=eos_id)
        self.offset = cursor.offset + (self.offset if cursor.doc == 0 else 0)
        self.buf = self.buf[cursor.doc:]
        self.have -= k * seq_len
        self.tokens += k * seq_len
        return rows

    def take_unit(self, make) -> dict[str, np.ndarray]:
        """The next row of this source's documents (padded rows or span-corruption examples)."""
        if not self.buf:
            self.pull(make)  # the head document, resumed at ``offset``
        while self.offset >= len(self.buf[0][1]):
            self.buf, self.offset = [], 0
            self.pull(make)
        row, tokens = self.buf[0][1][self.offset]
        self.offset += 1
        self.tokens += tokens
        return row


class _Stream:
    """One stream's rows. Each row's source is the one furthest below its weight's share of the
    tokens the stream has handed out in rows (``pick_source``); a row holds the next tokens of that
    source's own document stream, packed (or padded, or span-corrupted) exactly as one corpus is.
    Every source's share is then within one row of its weight at every step, whatever the
    documents' lengths."""

    def __init__(self, sid: int, mixture: Mixture, cfg: LoaderConfig, vocab_size: int, state: dict):
        self.sid, self.mixture, self.cfg, self.vocab_size = sid, mixture, cfg, vocab_size
        tok = mixture.tokenizer
        self.eos, self.pad = tok["eos_id"], tok["pad_id"]
        self.start_id = tok.get("bos_id") if tok.get("bos_id") is not None else tok["eos_id"]
        self.events: list[str] = []
        self._report = ReadReport()
        if cfg.mode == "span":
            self.raw_len = raw_length_for(cfg.enc_len, cfg.seq_len, cfg.noise_density, cfg.mean_span)
        self.cursors = [
            _Cursor(SourceReader(src.manifest, stream=sid, num_streams=cfg.num_streams, seed=cfg.seed, salt=i,
                                 shuffle=cfg.shuffle, buffer=cfg.shuffle_buffer, vocab_size=vocab_size,
                                 skip_bad=cfg.skip_bad, report=self._report, position=tuple(s[:3])),
                    offset=s[3], tokens=s[4])
            for i, (src, s) in enumerate(zip(mixture.sources, state["sources"]))]

    @property
    def state(self) -> dict:
        return {"sources": [c.state() for c in self.cursors]}

    def _picks(self, k: int) -> list[int]:
        if len(self.cursors) == 1:
            return [0] * k
        tokens, picks = [c.tokens for c in self.cursors], []
        for _ in range(k):
            picks.append(pick_source(self.mixture.weights, tokens))
            tokens[picks[-1]] += self.cfg.seq_len
        return picks

    def take(self, k: int) -> dict[str, np.ndarray]:
        drawn = sum(c.tokens for c in self.cursors)  # grows with every row: names this take in the stream
        rows = self._take_packed(k) if self.cfg.packs else self._take_units(k)
        if self.cfg.mode == "mlm":
            rows = self._mask(rows, drawn)
        self.events.extend(self._report.messages)
        self._report.messages.clear()
        return rows

    def _mask(self, rows: dict[str, np.ndarray], drawn: int) -> dict[str, np.ndarray]:
        """Masked-LM rows: drawn from the seed, the stream and the tokens it has handed out before
        them, so the same rows come back after a resume at any DP size or worker count."""
        tok = self.mixture.tokenizer
        rng = np.random.default_rng([self.cfg.seed, MLM_SALT, self.sid, drawn])
        special = [i for i in (self.eos, self.pad, tok.get("bos_id")) if i is not None]
        return mlm_corrupt(rows["input_ids"], rows["mask"], rows["doc_ids"], rows["positions"], rng=rng,
                           probability=self.cfg.mlm_probability, replace=self.cfg.mlm_replace,
                           mask_id=self.vocab_size_tokenizer, vocab_size=self.vocab_size_tokenizer, special=special)

    def _take_packed(self, k: int) -> dict[str, np.ndarray]:
        cfg = self.cfg
        picks = self._picks(k)
        if len(set(picks)) == 1:
            return self.cursors[picks[0]].take_packed(k, cfg.seq_len, self.eos)
        parts = {i: self.cursors[i].take_packed(picks.count(i), cfg.seq_len, self.eos) for i in sorted(set(picks))}
        seen = dict.fromkeys(parts, 0)
        order = []
        for i in picks:
            order.append((i, seen[i]))
            seen[i] += 1
        return {key: np.stack([parts[i][key][j] for i, j in order]) for key in parts[picks[0]]}

    def _take_units(self, k: int) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(k):  # a row's tokens are known once it is cut: choose one row at a time
            i = pick_source(self.mixture.weights, [c.tokens for c in self.cursors]) if len(self.cursors) > 1 else 0
            rows.append(self.cursors[i].take_unit(lambda pos, doc, i=i: self._units(i, pos, doc)))
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def _units(self, source: int, pos: tuple, doc: np.ndarray) -> list[tuple[dict, int]]:
        """A document's rows, each with the document tokens it holds."""
        if self.cfg.mode in ("padded", "mlm"):
            return [(r, int(r["mask"].sum())) for r in pad_rows(doc, self.cfg.seq_len, eos_id=self.eos,
                                                                 pad_id=self.pad)]
        out = []
        for i, chunk in enumerate(chunk_for_span_corruption(doc, self.raw_len)):
            rng = np.random.default_rng([self.cfg.seed, *pos, *([source] if source else []), i, self.sid])
            out.append((span_corruption(chunk, enc_len=self.cfg.enc_len, dec_len=self.cfg.seq_len,
                                        sentinel_start=self.vocab_size_tokenizer, eos_id=self.eos,
                                        pad_id=self.pad, start_id=self.start_id, rng=rng,
                                        noise_density=self.cfg.noise_density, mean_span=self.cfg.mean_span),
                        len(chunk)))
        return out

    @property
    def vocab_size_tokenizer(self) -> int:
        return self.mixture.tokenizer["vocab_size"]


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
    """Batches for one data-parallel rank: ``data.Batch`` objects of ``global_rows / dp_size`` rows.

    Packed / padded: ``input_ids``, ``labels``, ``mask``, ``doc_ids``, ``positions`` and the
    documents' ``layout``, ``[rows, seq_len]``. Span: ``src``, ``src_mask`` ``[rows, enc_len]`` and
    the decoder's ``input_ids``, ``labels``, ``mask`` ``[rows, seq_len]``. Every batch has
    ``stream [rows]`` and its token counts. Infinite: epochs follow one another;
    ``source_stats()`` gives each source's tokens and epoch.

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
        if vocab_size is not None and vocab_size < tok_vocab + self.num_sentinels:
            what = (f"span corruption needs {self.num_sentinels} sentinel ids" if cfg.mode == "span"
                    else "the masked LM needs its mask id")
            raise DataError(f"{what} after the tokenizer's {tok_vocab}: model vocab_size {vocab_size} < "
                            f"{tok_vocab + self.num_sentinels}")
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
            arrays = {key: np.concatenate([rows[s][key] for s in self.streams]) for key in rows[self.streams[0]]}
            stream = torch.tensor(self.streams).repeat_interleave(self.rows_per_stream)
            self._states.update(states)
            self.batches += 1
            yield Batch.from_rows(self.cfg.mode, arrays, pad_id=self.manifest.tokenizer["pad_id"], stream=stream,
                                  ignore_index=self.cfg.ignore_index)

    # ---------------------------------------------------------------------------------- state
    def fingerprint(self) -> dict:
        return {"manifest": self.mixture.digest, **self.cfg.fingerprint()}

    def source_stats(self) -> dict[str, dict[str, int]]:
        """Per source, over this rank's streams after the batches handed out: ``tokens`` (the tokens
        of the rows handed out: ``seq_len`` a packed row, the document tokens a padded row or span
        example holds; never those read ahead) and ``epoch`` (the furthest any stream has got)."""
        out = {}
        for i, src in enumerate(self.mixture.sources):
            tokens = sum(st["sources"][i][4] for st in self._states.values())
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
            why = _OLD_FORMATS.get(state.get("format"), "an unknown format")
            raise DataError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT}: {why}; its data "
                            "order cannot be continued exactly: start the data from the beginning (a fresh "
                            "run.name) or resume with the version that wrote it")
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
