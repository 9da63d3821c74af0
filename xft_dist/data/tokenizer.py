"""Tokenizers for building shards: byte-level (no files needed), HF ``tokenizers`` JSON, sentencepiece.

Each has ``encode(text) -> list[int]``, ``vocab_size``, ``eos_id``, ``pad_id``, ``bos_id`` and an
``identity()`` dict written into the shard manifest; loaders and models check it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import DataError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: 0 pad, 1 eos, 2 bos, bytes at 3..258."""

    kind = "byte"
    pad_id, eos_id, bos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode("utf-8", "replace")

    def identity(self) -> dict:
        return {"kind": self.kind, "name": "byte-v1", "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id}


class HFTokenizer:
    """A HF ``tokenizers`` ``tokenizer.json``. Special tokens are found by common names unless given."""

    kind = "hf"

    def __init__(self, path: str | Path, *, eos_token: str | None = None, pad_token: str | None = None,
                 bos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise DataError("a tokenizer.json needs the `tokenizers` package: pip install 'xft_dist[tokenizers]'") from e
        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(eos_token, ["</s>", "<|endoftext|>", "<eos>", "[SEP]"], "eos", required=True)
        self.pad_id = self._find(pad_token, ["<pad>", "[PAD]", "<|pad|>"], "pad", required=False)
        if self.pad_id is None:
            self.pad_id = self.eos_id  # pad never counts in the loss: the loss mask, not the id, decides
        self.bos_id = self._find(bos_token, ["<s>", "<|startoftext|>", "<bos>", "[CLS]"], "bos", required=False)

    def _find(self, given, candidates, what, required):
        for name in [given] if given else candidates:
            idx = self.tok.token_to_id(name)
            if idx is not None:
                return idx
        if required or given:
            raise DataError(f"{self.path}: no {what} token (tried {[given] if given else candidates}); "
                            f"pass --{what}-token")
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.path.name, "sha256": _sha256(self.path),
                "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id}


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise DataError("a .model file needs the `sentencepiece` package: pip install 'xft_dist[tokenizers]'") from e
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{self.path}: the sentencepiece model has no eos piece (eos_id=-1)")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.path.name, "sha256": _sha256(self.path),
                "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id}


def load_tokenizer(spec: str = "byte", **kwargs):
    """``"byte"``, a ``tokenizer.json`` path or a sentencepiece ``.model`` path."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"tokenizer {spec!r}: expected 'byte', a tokenizer.json or a sentencepiece .model file")
    if path.suffix == ".json":
        return HFTokenizer(path, **kwargs)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise DataError(f"tokenizer {spec!r}: unknown file type {path.suffix!r} (expected .json or .model)")


def same_tokenizer(a: dict, b: dict) -> bool:
    keys = ("kind", "name", "sha256", "vocab_size", "eos_id", "pad_id")
    return all(a.get(k) == b.get(k) for k in keys)


def tokenizer_from_identity(identity: dict, path: str | Path | None = None, *, what: str = "--tokenizer"):
    """The tokenizer a manifest names: the byte tokenizer by itself, any other from ``path``
    (checked to be the same one)."""
    if identity.get("kind") == "byte":
        return ByteTokenizer()
    if path is None:
        raise DataError(f"the shards were made with tokenizer {identity.get('kind')}:{identity.get('name')}; "
                        f"pass its file with {what}")
    tok = load_tokenizer(str(path))
    if not same_tokenizer(tok.identity(), identity):
        raise DataError(f"tokenizer {path} is not the one the shards were made with "
                        f"({identity.get('kind')}:{identity.get('name')}, vocab {identity.get('vocab_size')})")
    return tok
