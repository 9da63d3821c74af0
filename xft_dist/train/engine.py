"""``deepspeed.initialize`` with the tensor-parallel mpu, the generated DeepSpeed config and the
weight-decay parameter groups; at ``parallel.pp > 1`` over the model's pipeline stages
(``models.pipeline``), which makes it DeepSpeed's ``PipelineEngine``."""

from __future__ import annotations

from torch import nn

from ..config import Config, deepspeed_config
from ..nn import AbsolutePositionalEmbedding, VocabParallelEmbedding
from ..parallel import ParallelGroups

EMBEDDINGS = (VocabParallelEmbedding, AbsolutePositionalEmbedding, nn.Embedding)


def weight_decay_groups(model: nn.Module, weight_decay: float, *, decay_norms_and_biases: bool = False,
                        decay_embeddings: bool = False) -> list[dict]:
    """Optimizer parameter groups: matrices decay (an untied output head is one); norm gains and
    biases (every parameter of fewer than two dimensions) and embeddings (token, position, and so a
    tied head) decay only when asked. A parameter shared by several modules is counted once."""
    heads = [m.to_logits for m in model.modules() if isinstance(getattr(m, "to_logits", None), nn.Module)]
    head_ids = {id(p) for h in heads for p in h.parameters()}
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, EMBEDDINGS) and m not in heads
                     for p in m.parameters()} - head_ids
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in embedding_ids:
            (decay if decay_embeddings else no_decay).append(p)
        elif p.ndim < 2:
            (decay if decay_norms_and_biases else no_decay).append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def initialize(cfg: Config, model, groups: ParallelGroups, *, load_universal: bool = False):
    """The DeepSpeed engine; ``load_universal``: it will load a universal checkpoint (resharding)."""
    import deepspeed

    mpu = groups.mpu()
    if groups.pp_size > 1:  # DeepSpeed's pipeline engine: its module brings the grid (our groups' layout)
        from ..models.pipeline import build_pipeline

        model, mpu = build_pipeline(model, groups, partition=cfg.parallel.pp_partition), None
    params = weight_decay_groups(model, cfg.optim.weight_decay, decay_norms_and_biases=cfg.optim.decay_norms_and_biases,
                                 decay_embeddings=cfg.optim.decay_embeddings)
    ds = deepspeed_config(cfg, groups.dp_size)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds, mpu=mpu)
    if cfg.parallel.zero_stage == 3:
        register_output_heads(model)
    return engine


def register_output_heads(model: nn.Module) -> None:
    """ZeRO-3 gathers a parameter only inside its own module's forward. The output head's weight
    (tied to the token embedding or not) is read by ``head.logits`` and by the fused loss, from the
    forward of the ``TransformerWrapper`` and the ``AutoregressiveWrapper``: register it with both,
    so that DeepSpeed gathers it there too (training, evaluation and generation alike)."""
    from deepspeed.runtime.zero import register_external_parameter

    from ..models import AutoregressiveWrapper, TransformerWrapper

    for m in model.modules():
        net = m.net if isinstance(m, AutoregressiveWrapper) else m if isinstance(m, TransformerWrapper) else None
        if net is not None and net.head is not None:
            register_external_parameter(m, net.head.weight)
