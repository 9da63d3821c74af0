"""Run metrics and their sinks (W&B and a JSONL file), rank 0 only."""

from .metrics import StepMeter, memory_mib
from .wandb import MetricSinks

__all__ = ["StepMeter", "memory_mib", "MetricSinks"]
