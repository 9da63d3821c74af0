"""Checkpoints committed atomically, keep-last-k, resume from the newest complete one."""

from .manager import CheckpointManager

__all__ = ["CheckpointManager"]
