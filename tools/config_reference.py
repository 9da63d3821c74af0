#!/usr/bin/env python
"""Write docs/config.md from the config schema (``--check`` fails if the file is out of date)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from xft_dist.config.schema import Config

OUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _type(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return (text.replace("typing.", "").replace("xft_dist.config.schema.", "").replace("NoneType", "None")
            .replace("|", "\\|"))


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `xft_dist/config/schema.py` by `python tools/config_reference.py`; do not edit.", "",
             "A run config is YAML. It may start with `defaults: [model/tiny, parallel/dp, ...]`: presets under",
             "`configs/`, merged in order, then the file, then command-line overrides such as `model.depth=4`.",
             "Unknown keys, wrong types and inconsistent values stop the launch with exit status 2 and a",
             "message naming the key.", ""]
    for name, field in Config.model_fields.items():
        section = field.annotation
        lines += [f"## `{name}`", ""]
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            lines += [f"{field.description or ''} (`{_type(section)}`)", ""]
            continue
        if field.is_required():
            lines += ["Required section.", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _rows(name, section)
        lines.append("")
    return "\n".join(lines)


def _rows(prefix: str, section: type[BaseModel]) -> list[str]:
    """One row per key; a nested section's keys follow under their dotted path."""
    rows = []
    for key, f in section.model_fields.items():
        nested = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        if nested is not None:
            rows.append(f"| `{prefix}.{key}` | section | | {f.description or ''} |")
            rows += _rows(f"{prefix}.{key}", nested)
            continue
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = f"`{f.default_factory()!r}`"
        else:
            default = f"`{f.default!r}`"
        rows.append(f"| `{prefix}.{key}` | `{_type(f.annotation)}` | {default} | {f.description or ''} |")
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
