"""Consolidate a tensor-parallel checkpoint into one full (TP=1) state dict.

Each TP rank's DeepSpeed ``mp_rank_XX_model_states.pt`` holds its shards (at ``parallel.pp > 1``
each stage's ranks hold their layers' shards, by pipe-layer names, mapped back to the model's). The TP=1 model built
from the checkpoint's own config, on the meta device so no memory is spent, gives every full
shape and each parameter's split (``nn.sharding.tp_split``, the mark its layer set): a split
parameter is concatenated along its split dimension, with vocab padding stripped; a replicated one
is taken from rank 0. ZeRO-0/1/2 checkpoints keep the model's
weights in those files (in the training dtype); the fp32 master weights of ZeRO 1-3 are read from the
optimizer partitions with DeepSpeed's ``zero_to_fp32``, one TP rank at a time, or, for ZeRO-1 in bf16
(DeepSpeed's BF16_Optimizer, fp32 gradient accumulation), from its flat fp32 partitions.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch
import yaml

from ..config.load import validate
from ..models.factory import build_model
from ..nn.sharding import tp_split
from ..parallel import ParallelGroups
from . import integrity


def _read(ckpt: Path):
    if not (ckpt / "COMPLETE").exists():
        raise ValueError(f"{ckpt} is not a complete checkpoint (no COMPLETE marker)")
    expected = integrity.read_manifest(ckpt)
    if expected is not None:  # this process checks every file (no collective: tools run alone)
        problems = integrity.check(ckpt, expected, sorted(expected), progress="verify")
        if problems:
            raise ValueError(f"{ckpt} failed verification: " + "; ".join(problems))
    cfg = validate(yaml.safe_load((ckpt / "config.yaml").read_text()), str(ckpt / "config.yaml"))
    shared = json.loads((ckpt / "xft_state.json").read_text())
    if "num_tokens" not in shared:
        raise ValueError(f"{ckpt}/xft_state.json has no num_tokens (written by an older version)")
    return cfg, shared


def at_tp1(cfg):
    """The same config at tensor-parallel size 1 (one process holds the whole model)."""
    return cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tp": 1})})


def read_checkpoint_config(ckpt: str | Path):
    """(the run config a checkpoint was written with, its shared state)."""
    return _read(Path(ckpt))


def _zero_fp32_states(ckpt: Path, tp: int) -> list[dict]:
    """Each model-parallel (TP, or stage x TP) rank's fp32 master weights from its ZeRO partitions
    (stages 1-3), by DeepSpeed's ``zero_to_fp32`` run on a view of the checkpoint holding that
    rank's files only."""
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's import logs to stdout: keep it for results
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = []
    for r in range(tp):
        files = sorted(ckpt.glob(f"*mp_rank_{r:02d}_*"))
        if not any(f.name.endswith("_optim_states.pt") for f in files):
            raise ValueError(f"{ckpt}: no ZeRO optimizer partitions for tensor-parallel rank {r} "
                             f"(*mp_rank_{r:02d}_optim_states.pt)")
        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / ckpt.name
            view.mkdir()
            for f in files:
                _link_or_fill(f, view / f.name)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
                states.append(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ckpt.name))
    return states


def _link_or_fill(src: Path, dst: Path) -> None:
    """``dst`` links to ``src``; a pipeline stage's model-states file, which keeps its weights in
    per-layer files (``module`` None), is copied with an empty module instead (``zero_to_fp32``
    reads the module's buffers from it; ours has none)."""
    if src.name.endswith("_model_states.pt") and src.name.startswith("mp_rank_"):
        state = torch.load(src, map_location="cpu", weights_only=False)
        if state.get("module") is None:
            torch.save({**state, "module": {}}, dst)
            return
    dst.symlink_to(src.resolve())


def _bf16_fp32_states(ckpt: Path, tp: int) -> list[dict]:
    """Each TP rank's fp32 master weights from DeepSpeed's BF16_Optimizer partitions (ZeRO-1 in bf16
    with fp32 gradient accumulation, ``bf16_zero_pp_rank_D_mp_rank_XX_optim_states.pt``): every DP
    rank holds a contiguous slice of each parameter group's flat fp32 copy, and
    ``param_slice_mappings`` names the parameters' fragments in it; a parameter is its fragments in
    DP-rank order, shaped like the module's copy."""
    shapes = _param_shapes(ckpt, tp)
    states = []
    for r in range(tp):
        files = sorted(ckpt.glob(f"bf16_zero_pp_rank_*_mp_rank_{r:02d}_optim_states.pt"),
                       key=lambda f: int(f.name.split("_")[4]))
        if not files:
            raise ValueError(f"{ckpt}: no bf16 optimizer partitions for tensor-parallel rank {r}")
        fragments: dict[str, list[torch.Tensor]] = {}
        for f in files:
            opt = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
                for name, frag in mapping.items():
                    fragments.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
        state = {}
        for name, parts in fragments.items():
            shape = shapes[r][name]
            state[name] = torch.cat(parts).view(shape).clone()
        states.append(state)
    return states


def _param_shapes(ckpt: Path, ranks: int) -> list[dict]:
    """Each model-parallel rank's parameter shapes, by the engine's names (DeepSpeed records them)."""
    out = []
    for r in range(ranks):
        state = torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu", weights_only=False)
        out.append({n: s for group in state["param_shapes"] for n, s in group.items()})
    return out


def _pipe_layer_states(ckpt: Path, reference: torch.nn.Module, tp: int) -> list[dict]:
    """A pipeline checkpoint's module weights (ZeRO 0), per model-parallel rank (stage-major, then
    TP), by pipe-layer names: DeepSpeed writes one ``layer_II-model_TT-model_states.pt`` per layer."""
    from ..models.pipeline import MicroBatchFeed, pipe_towers

    layers = [layer for tower in pipe_towers(reference, MicroBatchFeed()) for layer in tower]
    states: list[dict] = []
    for t in range(tp):
        state = {}
        for i in range(len(layers)):
            f = ckpt / f"layer_{i:02d}-model_{t:02d}-model_states.pt"
            if not f.exists():
                raise ValueError(f"{ckpt}: missing {f.name} (pipeline layer {i}, tensor-parallel rank {t})")
            state.update({f"{i}.{n}": v for n, v in torch.load(f, map_location="cpu", weights_only=False).items()})
        states.append(state)
    return states  # one per TP rank, every stage's layers in it


def _join_stages(shards: list[dict], reference: torch.nn.Module, tp: int, pp: int) -> list[dict]:
    """Per-TP-rank state dicts by the whole model's names, from a pipeline checkpoint's shards."""
    from ..models.pipeline import MicroBatchFeed, model_names, pipe_towers

    names = model_names([layer for tower in pipe_towers(reference, MicroBatchFeed()) for layer in tower], reference)
    by_tp = [shards[t::tp] if len(shards) == tp * pp else [shards[t]] for t in range(tp)]
    out = []
    for stages in by_tp:
        joined: dict = {}
        for state in stages:
            for pipe_name, value in state.items():
                joined.setdefault(names[pipe_name], value)  # a tied embedding: the first stage's copy
        out.append(joined)
    return out


def _module_states(ckpt: Path, tp: int) -> list[dict]:
    """Each TP rank's weights as the module held them (ZeRO 0: no partitions; training dtype)."""
    files = [ckpt / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"{ckpt}: missing {missing} for tensor-parallel size {tp}")
    return [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]


def consolidate(ckpt: str | Path, *, reference: torch.nn.Module | None = None) -> dict:
    """``{"model": full state dict, "config": resolved YAML, "num_tokens", "pad_id", "step"}``.

    The weights are the fp32 master weights of the ZeRO partitions (any stage 1-3; ZeRO 0: the
    module's own, in the training dtype), every TP rank's shards joined. ``reference`` is the TP=1
    model of the checkpoint's config (on the meta device is enough), as ``build_run(cfg,
    upto="model", device="meta")`` makes it; by default it is built here the same way.
    """
    ckpt = Path(ckpt)
    cfg, shared = _read(ckpt)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if reference is None:
        with torch.device("meta"):
            reference = build_model(at_tp1(cfg), ParallelGroups.single(), None, num_tokens=shared["num_tokens"],
                                    pad_id=shared["pad_id"])
    ranks = tp * pp  # DeepSpeed's model-parallel ranks: stage-major, then TP
    if cfg.parallel.zero_stage == 0:
        shards = _module_states(ckpt, tp) if pp == 1 else _pipe_layer_states(ckpt, reference, tp)
    elif any(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        shards = _bf16_fp32_states(ckpt, ranks)
    else:
        shards = _zero_fp32_states(ckpt, ranks)
    if pp > 1:
        shards = _join_stages(shards, reference, tp, pp)
    aliases: dict[int, list[str]] = {}  # a shared parameter (one embedding, several owners) has several names
    for name, p in reference.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    names_of = {n: names for names in aliases.values() for n in names}
    params = dict(reference.named_parameters(remove_duplicate=False))
    full = {}
    for key, want in reference.state_dict().items():
        parts = []
        for s in shards:
            found = next((s[n] for n in names_of.get(key, [key]) if n in s), None)
            if found is None:
                raise ValueError(f"{ckpt}: no weights for {key} (a checkpoint of another model?)")
            parts.append(found)
        kind, dim = tp_split(params[key]) if key in params else ("replicated", None)
        if len(parts) == 1 or kind == "replicated":
            if parts[0].shape != want.shape:
                raise ValueError(f"{key}: shard shape {tuple(parts[0].shape)} vs full {tuple(want.shape)} "
                                 f"({kind}: a checkpoint of another model?)")
            full[key] = parts[0].clone()
            continue
        joined = torch.cat(parts, dim=dim)  # the split the layer states (nn.sharding.tp_split)
        if joined.shape[dim] < want.shape[dim] or joined.shape[:dim] + joined.shape[dim + 1:] != \
                want.shape[:dim] + want.shape[dim + 1:]:
            raise ValueError(f"{key}: {tp} shards of {tuple(parts[0].shape)} ({kind}, dim {dim}) do not make "
                             f"the full {tuple(want.shape)}")
        full[key] = joined.narrow(dim, 0, want.shape[dim]).clone()  # strip vocab padding
    return {"model": full, "config": (ckpt / "config.yaml").read_text(), "num_tokens": shared["num_tokens"],
            "pad_id": shared["pad_id"], "step": shared["step"]}


def load_consolidated(path: str | Path):
    """A single-process model (TP=1) with the weights of ``consolidate``'s output file."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    cfg = at_tp1(validate(yaml.safe_load(data["config"])))
    model = build_model(cfg, ParallelGroups.single(), None, num_tokens=data["num_tokens"], pad_id=data["pad_id"])
    model.load_state_dict(data["model"])
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete one under a run directory or its
    ``checkpoints/`` directory."""
    from .manager import CheckpointManager

    path = Path(path)
    if (path / "COMPLETE").exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise ValueError(f"{path}: no such run or checkpoint directory")
    latest = CheckpointManager(root).latest()
    if latest is None:
        raise ValueError(f"no complete checkpoint under {path}")
    return latest


def load_checkpoint_model(path: str | Path, *, device: str | torch.device = "cpu"):
    """``(model, cfg, shared, checkpoint dir)``: the newest complete checkpoint of a run (any TP size,
    ZeRO 0-2) consolidated into a single-process (TP=1) model in eval mode. ``cfg`` is the run's
    config at TP=1; ``shared`` the checkpoint's shared state (step, vocabulary, tokenizer)."""
    ckpt = resolve_checkpoint(path)
    data = consolidate(ckpt)
    cfg, shared = _read(ckpt)
    cfg = at_tp1(cfg)
    model = build_model(cfg, ParallelGroups.single(), None, num_tokens=shared["num_tokens"], pad_id=shared["pad_id"])
    model.load_state_dict(data["model"])
    return model.to(device).eval(), cfg, shared, ckpt


EXPORT_FORMAT = "xft_dist-export/1"


def export_fp32(path: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32, fmt: str = "torch") -> dict:
    """One file holding the consolidated weights of a run's newest complete checkpoint (any TP
    size, any ZeRO stage) in ``dtype``, with the model config: ``load_exported`` rebuilds the model.
    ``fmt="safetensors"``: a ``.safetensors`` file, the rest as its string metadata. Returns what it
    wrote, less the weights."""
    ckpt = resolve_checkpoint(path)
    data = consolidate(ckpt)
    _, shared = _read(ckpt)
    payload = {"format": EXPORT_FORMAT, "model": {k: v.to(dtype) if v.is_floating_point() else v
                                                  for k, v in data["model"].items()},
               "config": data["config"], "num_tokens": data["num_tokens"], "pad_id": data["pad_id"],
               "step": data["step"], "tokenizer": json.dumps(shared.get("tokenizer")), "dtype": str(dtype)}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        meta = {k: str(v) if not isinstance(v, str) else v for k, v in payload.items() if k != "model"}
        # one tensor per name: a shared parameter's aliases are stored once each (safetensors keeps no views)
        save_file({k: v.contiguous().clone() for k, v in payload["model"].items()}, str(tmp), metadata=meta)
    else:
        torch.save(payload, tmp)
    tmp.replace(out)
    return {k: v for k, v in payload.items() if k != "model"} | {"checkpoint": str(ckpt)}


def _read_export(path: Path) -> dict:
    """An ``export_fp32`` file, torch or safetensors (by its first bytes: a torch file is a zip)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        model = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("num_tokens", "pad_id", "step"):
        if key in meta:
            meta[key] = int(meta[key])
    return {**meta, "model": model}


def load_exported(path: str | Path, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The single-process model (TP=1, eval mode) of an ``export_fp32`` file, in its dtype."""
    data = _read_export(Path(path))
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not an xft_dist export ({EXPORT_FORMAT}); tools/export.py writes them")
    cfg = at_tp1(validate(yaml.safe_load(data["config"]), f"{path} (config)"))
    model = build_model(cfg, ParallelGroups.single(), None, num_tokens=data["num_tokens"], pad_id=data["pad_id"])
    first = next(iter(data["model"].values()))
    model.to(first.dtype).load_state_dict(data["model"])
    return model.to(device).eval()

