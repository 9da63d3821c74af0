"""YAML (safe) + ``defaults:`` composition + dotted overrides -> a validated ``Config``.

A config file may start with ``defaults: [model/tiny, parallel/tp2]``: each entry is a YAML file
under the configs root (``<root>/model/tiny.yaml``), merged in order, then the file itself on top,
then command-line overrides like ``model.depth=4`` (values parsed as YAML).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, close_match
from .schema import Config


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, expected a YAML file (e.g. configs/tiny.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file, expected YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _configs_root(path: Path) -> Path:
    """The nearest ancestor directory named ``configs`` (else the file's own directory)."""
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return path.resolve().parent


def compose(path: str | Path, _seen: tuple = ()) -> dict:
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: defaults form a cycle through {[str(p) for p in _seen]}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of preset names, got {defaults!r}")
    root = _configs_root(path)
    merged: dict = {}
    for entry in defaults:
        preset = root / f"{entry}.yaml"
        if not preset.exists():
            group = preset.parent
            options = [p.stem for p in group.glob("*.yaml")] if group.is_dir() else []
            raise ConfigError(f"{path}: defaults entry {entry!r}: no file {preset}"
                              f"{close_match(preset.stem, options)}")
        merged = deep_merge(merged, compose(preset, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def apply_override(data: dict, override: str) -> dict:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = value
    return data


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names at ``loc`` inside the schema (for 'did you mean')."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def validate(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            path = ".".join(str(p) for p in loc) or "<top level>"
            if err["type"] == "extra_forbidden":
                lines.append(f"{path}: unknown key{close_match(str(loc[-1]), _known_keys(Config, loc[:-1]))}")
            elif err["type"] == "missing":
                lines.append(f"{path}: required key is missing")
            elif err["type"] == "value_error":
                lines.append(str(err["ctx"]["error"]) if "ctx" in err else err["msg"])
            else:
                lines.append(f"{path}={err.get('input')!r}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    data = compose(path)
    for o in overrides:
        data = apply_override(data, o)
    return validate(data, str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
