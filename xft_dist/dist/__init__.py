"""Process groups, autograd collectives and RNG streams for tensor x data parallelism."""

from .comm import copy_to_tp, gather_from_tp, group_rank, group_size, reduce_from_tp, scatter_to_tp
from .env import DistEnv, LaunchError
from .groups import DeepSpeedMPU, ParallelGroups
from .random import TP_STREAM, RNGStreams, capture_rng_state, restore_rng_state, seed_all

__all__ = [
    "ParallelGroups", "DeepSpeedMPU", "DistEnv", "LaunchError",
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "group_size", "group_rank",
    "RNGStreams", "TP_STREAM", "seed_all", "capture_rng_state", "restore_rng_state",
]
