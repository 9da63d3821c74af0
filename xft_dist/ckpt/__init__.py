"""Checkpoints committed atomically and verified, keep-last-k, resume from the newest good one;
consolidation and export to one file."""

from .manager import CheckpointManager


def load_exported(path, *, device="cpu"):
    """The single-process model of a ``tools/export.py --to fp32`` file (see ``convert.load_exported``)."""
    from .convert import load_exported as load

    return load(path, device=device)


__all__ = ["CheckpointManager", "load_exported"]
