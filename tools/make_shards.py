#!/usr/bin/env python
"""Text files, directories, JSONL (plain, gzip, zstandard) and Parquet -> tokenized webdataset shards
plus a manifest.

    python tools/make_shards.py corpus/ more.jsonl --out data/shards                   # byte tokenizer
    python tools/make_shards.py docs/ --include '*.py' --tokenizer tokenizer.json --out data/py
    python tools/make_shards.py big.jsonl.zst crawl.jsonl.gz --jsonl-key body --tokenizer spm.model --out data/spm
    python tools/make_shards.py part-*.parquet --parquet-column content --out data/pq

A text file is one document; a ``.jsonl`` / ``.ndjson`` file (also ``.jsonl.gz``, ``.jsonl.zst``)
holds one document per line (``--jsonl-key``, default ``text``); a ``.parquet`` file one document
per row of ``--parquet-column`` (default ``text``); a directory is searched recursively
(``--include`` globs, all files by default). Inputs are streamed (no file is loaded whole, except a
text file, which is one document) and progress is shown in input bytes.
Tokenizes on every core (``--workers``), writes ``shard-NNNNNN.tar`` files of about
``--shard-tokens`` tokens and ``manifest.json`` last. Undecodable text or bad JSON stops with the
file and position, unless ``--skip-bad`` (then skipped, counted and reported). Empty documents are
skipped and counted. An output directory made with another tokenizer is refused; ``--append`` adds
to one made with the same tokenizer, ``--overwrite`` replaces it. ``--valid-fraction F`` holds about a
fraction F of the documents out into ``OUT/valid`` (its own manifest; ``data.valid.shards``), each
document chosen by a hash of its tokens: the same split on every run, whatever the order or workers.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fnmatch
import hashlib
import multiprocessing as mp
import sys
from pathlib import Path

from tqdm import tqdm

from xft_dist.data.errors import DataError
from xft_dist.data.inputs import documents
from xft_dist.data.shards import MANIFEST, Manifest, ShardWriter
from xft_dist.data.tokenizer import load_tokenizer, same_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text, .jsonl[.gz|.zst] or .parquet files, or directories")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or a sentencepiece .model")
    p.add_argument("--eos-token", help="HF tokenizer: the EOS token's text (default: common names)")
    p.add_argument("--pad-token", help="HF tokenizer: the pad token's text (default: common names, else EOS)")
    p.add_argument("--jsonl-key", default="text")
    p.add_argument("--parquet-column", default="text", help="the text column of .parquet inputs")
    p.add_argument("--include", action="append", default=[], help="glob for files inside directories (repeatable)")
    p.add_argument("--shard-tokens", type=int, default=1 << 20)
    p.add_argument("--workers", type=int, default=mp.cpu_count())
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable files / bad JSON lines (counted)")
    p.add_argument("--valid-fraction", type=float, default=0.0,
                   help="hold this fraction of the documents out into OUT/valid (chosen by a hash of their tokens)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--append", action="store_true")
    group.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def discover(inputs: list[str], include: list[str]) -> list[Path]:
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and (not include or any(fnmatch.fnmatch(f.name, g) for g in include)):
                    files.append(f)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {raw}: no such file or directory")
    return files


def _bad(msg: str, hint: str, skip_bad: bool, counts: dict) -> None:
    """Raise with the position and a hint, or (``--skip-bad``) count the skip and keep an example."""
    if not skip_bad:
        raise DataError(f"{msg}; {hint}")
    counts["bad"] += 1
    counts["bad_examples"].append(msg)


def prepare_output(out: Path, identity: dict, a) -> tuple[list, int]:
    """(shards kept, next shard index) of an output directory, after the tokenizer check and
    ``--overwrite`` / ``--append``."""
    if not (out / MANIFEST).exists():
        return [], 0
    old = Manifest.load(out)
    if not same_tokenizer(old.tokenizer, identity):
        raise DataError(f"{out} holds shards made with tokenizer {old.tokenizer.get('kind')}:"
                        f"{old.tokenizer.get('name')} (vocab {old.tokenizer.get('vocab_size')}); refusing "
                        f"to mix with {identity['kind']}:{identity['name']} (vocab {identity['vocab_size']})")
    if a.overwrite:
        for f in out.glob("shard-*.tar"):
            f.unlink()
        return [], 0
    if a.append:
        return old.shards, len(old.shards)
    raise DataError(f"{out} already holds shards; pass --append or --overwrite")


_TOKENIZER = None


def _init_worker(spec: str, kwargs: dict) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec, **kwargs)


def _encode(item):
    return _TOKENIZER.encode(item[1])


def held_out(ids: list[int], fraction: float) -> bool:
    """Whether a document goes to the validation set: a hash of its tokens, so the split does not
    depend on file order, worker count or the other documents."""
    digest = hashlib.blake2b(array.array("q", ids).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def main(argv=None) -> int:
    a = parse_args(argv)
    if not 0.0 <= a.valid_fraction < 1.0:
        print(f"make_shards: error: --valid-fraction {a.valid_fraction}: expected a fraction in [0, 1)",
              file=sys.stderr)
        return 2
    hf_kwargs = {k: v for k, v in (("eos_token", a.eos_token), ("pad_token", a.pad_token)) if v}
    try:
        tokenizer = load_tokenizer(a.tokenizer, **(hf_kwargs if a.tokenizer.endswith(".json") else {}))
        identity = tokenizer.identity()
        out = Path(a.out)
        existing, start = prepare_output(out, identity, a)
        valid_dir = out / "valid"
        valid_existing, valid_start = prepare_output(valid_dir, identity, a) if a.valid_fraction else ([], 0)
        files = discover(a.inputs, a.include)
        counts = {"bad": 0, "bad_examples": [], "empty": 0}
        progress = tqdm(desc="input", unit="B", unit_scale=True, unit_divisor=1024, disable=a.quiet, file=sys.stderr,
                        total=sum(f.stat().st_size for f in files))
        docs = documents(files, jsonl_key=a.jsonl_key, parquet_column=a.parquet_column,
                         bad=lambda msg, hint: _bad(msg, hint, a.skip_bad, counts), on_bytes=progress.update)
        kwargs = hf_kwargs if a.tokenizer.endswith(".json") else {}
        valid_writer = (ShardWriter(valid_dir, identity, shard_tokens=a.shard_tokens, start_index=valid_start,
                                    existing=valid_existing) if a.valid_fraction else contextlib.nullcontext())
        counts["valid"] = 0
        with ShardWriter(out, identity, shard_tokens=a.shard_tokens, start_index=start, existing=existing) as writer, \
                valid_writer as vwriter:
            if a.workers > 1:
                pool = mp.get_context("spawn").Pool(a.workers, _init_worker, (a.tokenizer, kwargs))
                encoded = pool.imap(_encode, docs, chunksize=8)
            else:
                _init_worker(a.tokenizer, kwargs)
                pool, encoded = None, map(_encode, docs)
            try:
                for n, ids in enumerate(encoded, 1):
                    if n % 1000 == 0:
                        progress.set_postfix(docs=n, refresh=False)
                    if not ids:
                        counts["empty"] += 1
                        continue
                    if vwriter is not None and held_out(ids, a.valid_fraction):
                        vwriter.write(ids)
                        counts["valid"] += 1
                    else:
                        writer.write(ids)
            finally:
                if pool is not None:
                    pool.terminate()
                progress.close()
        m = Manifest.load(out)
    except DataError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(m.shards)} shards, {m.documents} documents, {m.tokens} tokens "
          f"({identity['kind']} tokenizer, vocab {identity['vocab_size']}) to {out}")
    if a.valid_fraction:
        if counts["valid"] == 0:
            print(f"make_shards: error: --valid-fraction {a.valid_fraction} held out no document of "
                  f"{m.documents}: use a larger fraction", file=sys.stderr)
            return 2
        v = Manifest.load(out / "valid")
        print(f"held out {v.documents} documents, {v.tokens} tokens ({len(v.shards)} shards) to {out / 'valid'}")
    if counts["empty"]:
        print(f"skipped {counts['empty']} empty documents")
    if counts["bad"]:
        print(f"skipped {counts['bad']} bad inputs (--skip-bad), e.g.:")
        for msg in counts["bad_examples"][:5]:
            print(f"  {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
