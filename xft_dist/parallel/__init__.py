"""Tensor x data parallelism: process groups, every collective (``comm``), the collective ledger
(``ledger``), and RNG streams."""

from .comm import (
                   all_gather,
                   all_gather_object,
                   all_reduce,
                   all_reduce_,
                   any_rank,
                   barrier,
                   broadcast,
                   copy_to_tp,
                   enter_tp,
                   gather_from_tp,
                   gather_seq_to_tp,
                   group_device,
                   group_rank,
                   group_size,
                   leave_tp,
                   reduce_from_tp,
                   reduce_scatter,
                   reduce_scatter_seq,
                   reduce_values,
                   scatter_to_tp,
                   tp_region_input,
)
from .groups import DeepSpeedMPU, ParallelGroups
from .ledger import CollectiveLedger, CollectiveRecord
from .random import (
    TP_STREAM,
    RNGStreams,
    capture_rng_state,
    restore_rng_state,
    rng_state_from_tensors,
    rng_state_to_tensors,
    seed_all,
)

__all__ = [
    "ParallelGroups", "DeepSpeedMPU",
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "group_size", "group_rank",
    "group_device", "all_reduce", "all_reduce_", "all_gather", "all_gather_object", "reduce_scatter", "broadcast",
    "barrier", "reduce_values", "any_rank", "enter_tp", "leave_tp", "gather_seq_to_tp", "reduce_scatter_seq",
    "tp_region_input",
    "CollectiveLedger", "CollectiveRecord",
    "RNGStreams", "TP_STREAM", "seed_all", "capture_rng_state", "restore_rng_state", "rng_state_to_tensors",
    "rng_state_from_tensors",
]
