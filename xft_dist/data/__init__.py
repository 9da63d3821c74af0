"""Streaming data: tokenizers, shards, packing, and the resumable loader.

This package gets ranks and worker counts as plain integers, never process groups. Names are
loaded on first use so that tokenizer worker processes do not import torch.
"""

import importlib

_NAMES = {
    "Batch": ".batch", "DocLayout": ".batch", "IGNORE_INDEX": ".batch", "DataError": ".errors", "LoaderConfig": ".loader", "StreamingLoader": ".loader", "num_sentinels": ".loader",
    "Manifest": ".shards", "Mixture": ".sources", "Source": ".sources",
    "ByteTokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name], __name__), name)
    raise AttributeError(f"module 'xft_dist.data' has no attribute {name!r}")
