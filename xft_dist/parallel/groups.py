"""Tensor-parallel x data-parallel process grid.

Ranks are laid out TP-major: a TP group is ``tp_size`` consecutive ranks (they usually share a
node and its fast links), and a DP group holds the ranks with the same TP rank across TP groups.
With world 4 and tp_size 2: TP groups {0,1} {2,3}; DP groups {0,2} {1,3}.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the TP x DP grid and the process groups it belongs to.

    ``tp_group`` / ``dp_group`` are ``None`` only for a single process without an initialised
    world (``ParallelGroups.single()``); every collective in xft_dist treats ``None`` as "no split".
    """

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    tp_group: ProcessGroup | None
    dp_group: ProcessGroup | None

    @classmethod
    def build(cls, tp_size: int = 1, *, timeout: timedelta | None = None) -> "ParallelGroups":
        """Create the TP and DP groups of the initialised default world.

        Every rank must call this with the same ``tp_size`` (``new_group`` is collective).
        ``timeout`` bounds every collective on these groups (new groups do not inherit the world's).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParallelGroups.build needs an initialised torch.distributed world "
                "(call torch.distributed.init_process_group first, or use ParallelGroups.single())"
            )
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        if not isinstance(tp_size, int) or tp_size < 1 or world_size % tp_size != 0:
            raise ValueError(
                f"tp_size={tp_size!r}: expected a positive integer dividing the world size {world_size}"
            )
        dp_size = world_size // tp_size
        tp_group = dp_group = None
        # new_group is collective over the whole world: every rank creates every group, same order.
        for start in range(0, world_size, tp_size):
            ranks = list(range(start, start + tp_size))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                tp_group = group
        for tp_index in range(tp_size):
            ranks = list(range(tp_index, world_size, tp_size))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                dp_group = group
        return cls(
            rank=rank,
            world_size=world_size,
            tp_rank=rank % tp_size,
            tp_size=tp_size,
            dp_rank=rank // tp_size,
            dp_size=dp_size,
            tp_group=tp_group,
            dp_group=dp_group,
        )

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no split: TP and DP sizes 1 and no process groups."""
        return cls(rank=0, world_size=1, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1,
                   tp_group=None, dp_group=None)

    def mpu(self) -> "DeepSpeedMPU":
        """The adapter ``deepspeed.initialize(..., mpu=...)`` expects."""
        return DeepSpeedMPU(self)

    def __repr__(self) -> str:
        return (f"ParallelGroups(rank={self.rank}/{self.world_size}, "
                f"tp={self.tp_rank}/{self.tp_size}, dp={self.dp_rank}/{self.dp_size})")


class DeepSpeedMPU:
    """DeepSpeed's model-parallel-unit protocol over a ``ParallelGroups``."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_model_parallel_group(self) -> ProcessGroup | None:
        return self.groups.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self) -> ProcessGroup | None:
        return self.groups.dp_group

    # Newer DeepSpeed code paths ask for the tensor-parallel names too.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
