"""Checks a run makes before it waits on anyone: its directories, and whether the checkpoint it
would resume from fits the config it runs with.

Every function here reads files only, so each rank reaches the same verdict on its own and a
refusal (``ConfigError``, exit status 2) leaves before any collective and before anything of the
existing run is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..ckpt import CheckpointManager, integrity
from ..config import Config, ConfigError
from ..config.resume import Change, check_resume


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def check_writable_dir(path: Path, key: str) -> None:
    """``path`` is a writable directory, or can be created as one; else a ``ConfigError`` naming ``key``."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, expected a directory (or a path where one can be created)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable (needed for {path})")
    try:  # permissions say little to root or on a read-only mount: write a file there and remove it
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ConfigError(f"{key}: {existing} is not writable (needed for {path}): {e.strerror or e}") from None


def check_paths(cfg: Config) -> None:
    check_writable_dir(run_dir(cfg), f"run.out_dir={cfg.run.out_dir!r} / run.name={cfg.run.name!r}")
    key = f"checkpoint.dir={cfg.checkpoint.dir!r}" if cfg.checkpoint.dir else f"run.out_dir={cfg.run.out_dir!r}"
    check_writable_dir(checkpoint_dir(cfg), key)


def layout_now(cfg: Config, world_size: int) -> dict:
    """What a checkpoint's shards depend on: PP, TP and DP sizes and the ZeRO stage."""
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "dp": world_size // (p.tp * p.pp), "zero_stage": p.zero_stage}


@dataclass(frozen=True)
class ResumePlan:
    path: Path
    changes: list[Change]       # allowed config changes, logged once
    layout_change: str | None   # "tp 2 -> 1, ..." when the checkpoint needs resharding

    @property
    def reshard(self) -> bool:
        return self.layout_change is not None


def _layout_change(cfg: Config, path: Path, saved: dict | None, now: dict) -> str | None:
    if saved is not None:
        saved = {"pp": 1, **saved}  # written before pipeline stages existed
    if saved is None or saved == now:
        return None
    change = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
    if cfg.checkpoint.reshard == "off":
        raise ConfigError(f"{path} was written at another layout ({change}) and checkpoint.reshard=off; set "
                          "checkpoint.reshard=auto to convert it (DeepSpeed universal checkpoint)")
    if saved.get("zero_stage") == 0 or now["zero_stage"] == 0:
        # ZeRO 0 keeps no optimizer partitions for DeepSpeed's universal conversion to read.
        raise ConfigError(f"{path} was written at another layout ({change}): resharding needs ZeRO stage 1, 2 or 3 "
                          f"on both sides (saved {saved.get('zero_stage')}, now {now['zero_stage']}); resume at the "
                          "saved layout, or export the weights (tools/export.py) and start a new run from them")
    if saved.get("zero_stage") != now["zero_stage"] and 3 in (saved.get("zero_stage"), now["zero_stage"]):
        raise ConfigError(f"{path} was written at another layout ({change}): resharding keeps ZeRO-3 checkpoints "
                          "at ZeRO-3 and ZeRO 1/2 ones at 1 or 2; set parallel.zero_stage to the saved stage")
    return change


def _check_vocab(path: Path, state: dict, tokenizer: dict, num_tokens: int) -> None:
    saved_tok = state.get("tokenizer")
    if saved_tok is not None and saved_tok != tokenizer:
        raise ConfigError(f"cannot resume {path}: it was trained with the tokenizer {saved_tok}, the shards of "
                          f"data.shards / data.sources have {tokenizer}; use shards made with the checkpoint's "
                          "tokenizer, or start a fresh run with run.name=<new>")
    if state.get("num_tokens") not in (None, num_tokens):
        raise ConfigError(f"cannot resume {path}: its vocabulary has {state['num_tokens']} tokens, this run's "
                          f"{num_tokens} (model.num_tokens, or the shards' tokenizer + sentinels)")


def plan_resume(cfg: Config, path: Path, *, world_size: int, tokenizer: dict, num_tokens: int) -> ResumePlan:
    """The checks of resuming from ``path``: its resolved config, vocabulary and layout."""
    state = json.loads((path / "xft_state.json").read_text())
    saved_cfg = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else None
    changes = []
    if isinstance(saved_cfg, dict):
        changes = check_resume(saved_cfg, cfg.model_dump(mode="json"), where=str(path))
    _check_vocab(path, state, tokenizer, num_tokens)
    layout = _layout_change(cfg, path, state.get("layout"), layout_now(cfg, world_size))
    return ResumePlan(path=path, changes=changes, layout_change=layout)


_METADATA = ("xft_state.json", "config.yaml")


def _metadata_intact(path: Path) -> bool:
    """The small files ``plan_resume`` reads match the checkpoint's manifest (the full, collective
    verification comes once the world exists)."""
    try:
        expected = integrity.read_manifest(path)
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if expected is None:
        return True  # written before manifests existed: nothing to check against
    return not integrity.check(path, expected, [n for n in _METADATA if n in expected])


def newest_checkpoint(cfg: Config) -> Path | None:
    """The newest complete checkpoint resume would start from (its large files unverified; None
    without resume). One whose state or config fails its manifest is passed over here; the
    collective verification names and marks it."""
    if not cfg.checkpoint.resume:
        return None
    done = CheckpointManager(checkpoint_dir(cfg), keep=cfg.checkpoint.keep).complete()
    return next((p for p in reversed(done) if _metadata_intact(p)), None)
