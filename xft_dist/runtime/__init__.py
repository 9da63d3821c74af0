"""The process around the model: launcher environment, rank table and lost-peer diagnosis, stop
signals, and the run's status file."""

from .env import DistEnv, LaunchError
from .signals import StopSignals
from .status import write_status

__all__ = ["DistEnv", "LaunchError", "StopSignals", "write_status"]
