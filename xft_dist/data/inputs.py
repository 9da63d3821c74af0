"""Raw text inputs for ``tools/make_shards.py``, streamed: plain text files (one document each),
JSONL (one document per line), gzip- or zstandard-compressed JSONL, and Parquet (one column).

Nothing loads a whole input file, except a plain text file, which is one document. ``on_bytes`` is
called with the number of input bytes (as stored on disk, compressed or not) consumed so far, so a
progress bar can count bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED = {".gz": "gzip", ".zst": "zstandard", ".zstd": "zstandard"}


def _optional(module: str, path: Path):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading it needs {module.split('.')[0]}: pip install 'xft_dist[inputs]'") from None


def input_kind(path: Path) -> str:
    """``jsonl`` (optionally compressed), ``parquet`` or ``text``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in JSONL_SUFFIXES:
        return "jsonl"
    return "text"


class _Counting(io.RawIOBase):
    """A raw file that reports how many bytes were read from it."""

    def __init__(self, f, on_bytes):
        self.f, self.on_bytes, self.n = f, on_bytes, 0

    def readable(self):
        return True

    def readinto(self, b):
        got = self.f.readinto(b)
        if got:
            self.n += got
            if self.on_bytes is not None:
                self.on_bytes(got)
        return got

    def close(self):
        self.f.close()
        super().close()


def open_stream(path: Path, on_bytes=None) -> io.BufferedIOBase:
    """``path`` decompressed as it is read (gzip by ``.gz``, zstandard by ``.zst``)."""
    raw = _Counting(open(path, "rb", buffering=0), on_bytes)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb")
    if suffix in (".zst", ".zstd"):
        zstandard = _optional("zstandard", path)

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw, 1 << 20)), 1 << 20)
    return io.BufferedReader(raw, 1 << 20)


def _jsonl(path: Path, key: str, bad, on_bytes):
    with open_stream(path, on_bytes) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[key]
                    if not isinstance(text, str):
                        raise TypeError(f"{key!r} is {type(text).__name__}, expected a string")
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                    bad(f"{path}:{lineno}: bad JSONL record ({type(e).__name__}: {e})",
                        "pass --skip-bad to skip such lines")
                    continue
                yield f"{path}:{lineno}", text
        except (OSError, EOFError) as e:  # a damaged compressed stream (gzip / zstandard errors)
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e})") from None


def _parquet(path: Path, column: str, bad, on_bytes):
    pq = _optional("pyarrow.parquet", path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names}); pass --parquet-column")
    size, groups, row = path.stat().st_size, max(pf.num_row_groups, 1), 0
    for g in range(pf.num_row_groups):
        for batch in pf.iter_batches(batch_size=1024, columns=[column], row_groups=[g]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    bad(f"{path}: row {row - 1}: {column!r} is {type(text).__name__}, expected a string",
                        "pass --skip-bad to skip such rows")
                    continue
                yield f"{path}:{row - 1}", text
        if on_bytes is not None:
            on_bytes(size // groups)


def _text(path: Path, bad, on_bytes):
    with open_stream(path, on_bytes) as f:
        data = f.read()
    try:
        yield str(path), data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f"{path}: not UTF-8 text at byte {e.start} ({e.reason})",
            "pass --skip-bad to skip such files or --include to select files")


def documents(files: list[Path], *, jsonl_key: str = "text", parquet_column: str = "text", bad, on_bytes=None):
    """(source, text) per document of ``files``, in order. ``bad(message, hint)`` decides what a bad
    record does (raise, or count and skip)."""
    for f in files:
        kind = input_kind(f)
        if kind == "jsonl":
            yield from _jsonl(f, jsonl_key, bad, on_bytes)
        elif kind == "parquet":
            yield from _parquet(f, parquet_column, bad, on_bytes)
        else:
            yield from _text(f, bad, on_bytes)
