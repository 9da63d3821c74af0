"""The one exception type for configuration errors: key path, value, what was expected, a close match."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    pass


def close_match(word: str, candidates) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
