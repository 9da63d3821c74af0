"""``deepspeed.initialize`` with the tensor-parallel mpu and the generated DeepSpeed config."""

from __future__ import annotations

from ..config import Config, deepspeed_config
from ..parallel import ParallelGroups


def initialize(cfg: Config, model, groups: ParallelGroups):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, groups.dp_size), mpu=groups.mpu())
    return engine
