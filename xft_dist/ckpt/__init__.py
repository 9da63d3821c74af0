"""Checkpoints committed atomically and verified, keep-last-k, resume from the newest good one;
consolidation and export to one file."""

from .manager import CheckpointManager


def load_exported(path, *, device="cpu"):
    """The single-process model of a ``tools/export.py --to fp32`` file (see ``convert.load_exported``)."""
    from .convert import load_exported as load

    return load(path, device=device)


def build_xtransformers(spec):
    """The x-transformers model of a ``tools/export.py --to x-transformers`` constructor call (the
    ``.json`` file, or its contents); see ``xtransformers.build_xtransformers``."""
    from .xtransformers import build_xtransformers as build

    return build(spec)


__all__ = ["CheckpointManager", "build_xtransformers", "load_exported"]
