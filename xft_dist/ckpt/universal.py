"""Resuming at another TP x DP layout through DeepSpeed's universal checkpoint.

Every checkpoint records, in DeepSpeed's client state, how each parameter is split over the TP
ranks (``universal_checkpoint_info``): column-parallel weights and biases along dim 0 (DeepSpeed's
default), row-parallel weights along dim 1, vocab-parallel embeddings and heads along dim 0 with
their padding stripped back to the real vocabulary, everything else replicated. ``to_universal``
runs DeepSpeed's ``ds_to_universal`` on a checkpoint (once: the result, ``<checkpoint>/universal``,
is committed with its own marker) and an engine configured with ``checkpoint.load_universal``
then loads the weights and optimizer state of its own slice at any layout.

ZeRO-3 (DeepSpeed 0.19.8) converts tensor-parallel checkpoints the same way, but its universal load
slices a TP shard only out of parameters annotated by DeepSpeed's AutoTP, does not re-pad
vocabularies, gives every parameter group the hyperparameters of the first (so the group without
weight decay would be decayed), and gives all optimizer states one shared step counter (which Adam
then advances once per parameter group: the bias correction drifts from the second step on).
``prepare_zero3_universal_load`` fixes the first two on the engine before ``load_checkpoint``: the
optimizer reads each parameter's full tensor from the universal folder, pads a vocabulary to this
layout's padded size as DeepSpeed does for ZeRO 1/2, takes this TP rank's slice by the split
``universal_checkpoint_info`` records, then DeepSpeed's own ZeRO-3 partition of it.
``restore_param_group_hyperparameters`` fixes the other two after it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sys
from pathlib import Path

from torch import nn

UNIVERSAL_DIR = "universal"
DONE = "UNIVERSAL_COMPLETE"


def tp_splits(model: nn.Module | dict) -> dict[str, tuple[str, int | None]]:
    """Each parameter's TP split in this model (the marks its layers set, ``nn.sharding.tp_split``):
    ``(kind, dim)`` with kind ``vocab`` (dim 0, padded rows), ``column`` (dim 0), ``row`` (dim 1) or
    ``replicated`` (None). At TP=1 too: a checkpoint saved at TP=1 and resumed at TP=2 must tell
    DeepSpeed which dimension to cut a row-parallel weight along and which tensors to re-pad (with
    every parameter recorded as replicated, the vocabulary load failed and a row-parallel weight
    would have been cut along the wrong dimension)."""
    from ..nn.sharding import tp_split

    named = model if isinstance(model, dict) else dict(model.named_parameters())
    return {name: tp_split(p) for name, p in named.items()}


def universal_checkpoint_info(model: nn.Module | dict, num_tokens: int) -> dict:
    """DeepSpeed's ``universal_checkpoint_info`` for our layers (parameter names as the engine's;
    a pipeline's: every stage's parameters by name, ``{name: parameter}``)."""
    from deepspeed.checkpoint import constants as c

    replicated, row, vocab = [], [], []
    for name, (kind, _) in tp_splits(model).items():
        pattern = "^" + re.escape(name) + "$"
        if kind == "vocab":
            vocab.append(pattern)
        elif kind == "row":
            row.append(pattern)
        elif kind == "replicated":
            replicated.append(pattern)  # column: split along dim 0, DeepSpeed's default
    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2, c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row, c.VOCABULARY_PARAMETER_PATTERNS: vocab,
            c.ORIGINAL_VOCAB_SIZE: num_tokens}


def universal_client_state(model: nn.Module | dict, num_tokens: int) -> dict:
    """What a save passes to DeepSpeed's client state for ``ds_to_universal``."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    return {UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(model, num_tokens)}


def to_universal(ckpt: Path) -> Path:
    """``<ckpt>/universal`` (DeepSpeed's universal format), made once from ``ckpt``. One process."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from deepspeed.checkpoint.ds_to_universal import parse_arguments

    out = ckpt / UNIVERSAL_DIR
    if (out / DONE).exists():
        return out
    if out.exists():
        shutil.rmtree(out)  # a conversion that did not finish
    argv = sys.argv
    try:
        sys.argv = ["ds_to_universal", "--input_folder", str(ckpt), "--output_folder", str(out),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"]
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(parse_arguments())
    finally:
        sys.argv = argv
    for f in ckpt.glob("*mp_rank_*_model_states.pt"):  # DeepSpeed reads its metadata from these
        shutil.copy(f, out / f.name)
    alias_stage_names(ckpt, out)
    (out / DONE).write_text("ok\n")
    return out


def alias_stage_names(ckpt: Path, out: Path) -> None:
    """Make the universal folder readable at any pipeline size: DeepSpeed keys each parameter's
    folder by the engine's name, which is the model's at ``pp = 1`` and the pipe layer's at ``pp > 1``
    (``"3.block.attn.to_q.weight"``, the same at every stage count); each gets the other as a link."""
    import json

    import torch
    import yaml

    from ..config.load import validate
    from ..models.factory import build_model
    from ..models.pipeline import MicroBatchFeed, model_names, pipe_towers
    from ..parallel import ParallelGroups

    cfg = validate(yaml.safe_load((ckpt / "config.yaml").read_text()), str(ckpt / "config.yaml"))
    shared = json.loads((ckpt / "xft_state.json").read_text())
    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tp": 1, "pp": 1})})
    with torch.device("meta"):
        model = build_model(cfg, ParallelGroups.single(), None, num_tokens=shared["num_tokens"],
                            pad_id=shared["pad_id"])
    layers = [layer for tower in pipe_towers(model, MicroBatchFeed()) for layer in tower]
    zero = out / "zero"
    for pipe_name, name in model_names(layers, model).items():
        have_pipe, have_model = (zero / pipe_name).exists(), (zero / name).exists()
        if have_pipe and not have_model:
            (zero / name).symlink_to(pipe_name)
        elif have_model and not have_pipe:
            (zero / pipe_name).symlink_to(name)


def _tp_group_of(model: nn.Module):
    from ..nn import VocabParallelEmbedding

    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding):
            return m.group
    return None


def prepare_zero3_universal_load(engine) -> list[dict]:
    """Make a ZeRO-3 engine's universal load slice our TP shards and re-pad vocabularies (see the
    module docstring). Returns each optimizer parameter group's hyperparameters, for
    ``restore_param_group_hyperparameters`` after the load."""
    import math
    import os

    import torch
    import torch.nn.functional as F
    from deepspeed.checkpoint.constants import PARAM

    from ..parallel import group_rank, group_size

    optimizer = engine.optimizer
    splits = tp_splits(engine.module)
    group = _tp_group_of(engine.module)
    tp, tp_rank = group_size(group), group_rank(group)

    def read(folder, key, param=None):
        name = os.path.basename(os.path.normpath(folder))
        if name not in splits:
            raise ValueError(f"universal checkpoint: {folder} is not a parameter of this model")
        kind, dim = splits[name]
        data = torch.load(os.path.join(folder, f"{key}.pt"), map_location="cpu", weights_only=False)
        full = data[PARAM] if isinstance(data, dict) else data
        shape = tuple(param.ds_shape)  # this TP rank's (ZeRO-unpartitioned) shape
        if kind == "vocab" and full.shape[0] < shape[0] * tp:  # stripped to the real vocabulary: pad back
            full = F.pad(full, (0, 0, 0, shape[0] * tp - full.shape[0]), "constant", 0)
        if dim is not None and tp > 1:
            full = full.narrow(dim, tp_rank * shape[dim], shape[dim])
        if tuple(full.shape) != shape:
            raise ValueError(f"universal checkpoint: {name} {key} has shape {tuple(full.shape)}, this layout "
                             f"needs {shape} (tensor-parallel rank {tp_rank} of {tp})")
        flat = full.reshape(-1)
        dp_group = optimizer._get_param_partition_group(param)  # DeepSpeed's ZeRO-3 partition of it
        world, rank = group_size(dp_group), group_rank(dp_group)
        part = math.ceil(flat.numel() / world)
        flat = F.pad(flat, (0, part * world - flat.numel()))
        return flat.narrow(0, rank * part, part)

    optimizer.load_hp_checkpoint_state = read  # this instance only
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.optimizer.param_groups]


def restore_param_group_hyperparameters(engine, saved: list[dict]) -> None:
    """After a ZeRO-3 universal load: each optimizer parameter group's own weight decay (the load
    set every group's to the first group's), and a step counter of its own for every state (the load
    gave all of them one tensor, which Adam then advances once per group and step)."""
    import torch

    optimizer = engine.optimizer.optimizer
    groups = optimizer.param_groups
    if len(groups) != len(saved):
        raise RuntimeError(f"the optimizer has {len(groups)} parameter groups after the load, {len(saved)} before")
    for g, before in zip(groups, saved):
        g["weight_decay"] = before["weight_decay"]
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
