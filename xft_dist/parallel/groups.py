"""Pipeline x data-parallel x tensor-parallel process grid.

Ranks are laid out TP-major, then DP, then pipeline stage: a TP group is ``tp_size`` consecutive
ranks (they usually share a node and its fast links), a DP group holds the ranks of one stage with
the same TP rank, and a stage is ``dp_size x tp_size`` consecutive ranks:
``rank = stage * (dp * tp) + dp_rank * tp + tp_rank`` (DeepSpeed's ``PipeModelDataParallelTopology``
orders its axes the same way, so its pipeline engine sees this very grid).
With world 4 and tp_size 2: TP groups {0,1} {2,3}; DP groups {0,2} {1,3}. With world 8, pp 2, tp 2:
stage 0 is ranks 0-3, stage 1 ranks 4-7; rank 5 is stage 1, DP rank 0, TP rank 1.
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
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: ProcessGroup | None = None  # the stages of this rank's (DP, TP) place; None at pp 1

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, stage: int) -> int:
        """The global rank holding this rank's TP and DP place in pipeline stage ``stage``."""
        return stage * self.dp_size * self.tp_size + self.dp_rank * self.tp_size + self.tp_rank

    @classmethod
    def build(cls, tp_size: int = 1, *, pp_size: int = 1, timeout: timedelta | None = None) -> "ParallelGroups":
        """Create the TP and DP groups of the initialised default world (``pp_size`` stages).

        Every rank must call this with the same sizes (``new_group`` is collective).
        ``timeout`` bounds every collective on these groups (new groups do not inherit the world's).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParallelGroups.build needs an initialised torch.distributed world "
                "(call torch.distributed.init_process_group first, or use ParallelGroups.single())"
            )
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        if not isinstance(pp_size, int) or pp_size < 1 or world_size % pp_size != 0:
            raise ValueError(f"pp_size={pp_size!r}: expected a positive integer dividing the world size {world_size}")
        stage_size = world_size // pp_size
        if not isinstance(tp_size, int) or tp_size < 1 or stage_size % tp_size != 0:
            raise ValueError(
                f"tp_size={tp_size!r}: expected a positive integer dividing the world size {world_size} / pp {pp_size}"
            )
        dp_size = stage_size // tp_size
        tp_group = dp_group = None
        # new_group is collective over the whole world: every rank creates every group, same order.
        for start in range(0, world_size, tp_size):
            ranks = list(range(start, start + tp_size))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                tp_group = group
        for stage_start in range(0, world_size, stage_size):
            for tp_index in range(tp_size):
                ranks = list(range(stage_start + tp_index, stage_start + stage_size, tp_size))
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    dp_group = group
        pp_group = None
        if pp_size > 1:
            for place in range(stage_size):
                ranks = list(range(place, world_size, stage_size))
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    pp_group = group
        return cls(
            rank=rank,
            world_size=world_size,
            tp_rank=rank % tp_size,
            tp_size=tp_size,
            dp_rank=(rank % stage_size) // tp_size,
            dp_size=dp_size,
            tp_group=tp_group,
            dp_group=dp_group,
            pp_rank=rank // stage_size,
            pp_size=pp_size,
            pp_group=pp_group,
        )

    def stages_group(self, stages: list[int]) -> ProcessGroup | None:
        """The groups of ``stages`` (e.g. those holding a tied embedding) at every (DP, TP) place;
        this rank's, or None. Collective: every rank creates every group, in the same order."""
        mine = None
        for dp in range(self.dp_size):
            for tp in range(self.tp_size):
                base = dp * self.tp_size + tp
                ranks = [base + s * self.dp_size * self.tp_size for s in stages]
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = group
        return mine

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no split: TP and DP sizes 1 and no process groups."""
        return cls(rank=0, world_size=1, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1,
                   tp_group=None, dp_group=None)

    def mpu(self) -> "DeepSpeedMPU":
        """The adapter ``deepspeed.initialize(..., mpu=...)`` expects."""
        return DeepSpeedMPU(self)

    def __repr__(self) -> str:
        pp = f", pp={self.pp_rank}/{self.pp_size}" if self.pp_size > 1 else ""
        return (f"ParallelGroups(rank={self.rank}/{self.world_size}{pp}, "
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
