"""The process around the model: launcher environment, rank table and lost-peer diagnosis, stop
signals, the run's status file, and the stall watchdog."""

from .env import DistEnv, LaunchError
from .signals import StopSignals
from .status import write_status
from .watchdog import EXIT_STALLED, Watchdog

__all__ = ["DistEnv", "EXIT_STALLED", "LaunchError", "StopSignals", "Watchdog", "write_status"]
