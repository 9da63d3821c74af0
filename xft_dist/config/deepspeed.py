"""Our config -> the DeepSpeed config dict: the single source of truth for batch sizes, ZeRO stage,
precision, clipping, optimizer and schedule. A raw ``deepspeed:`` section is merged in; any key
that sets something we set is an error."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .schema import Config

# The keys (and nested keys) that the generated config owns.
COMM = {"overlap_comm": "overlap_comm", "contiguous_gradients": "contiguous_gradients",
        "reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
        "stage3_prefetch_bucket_size": "prefetch_bucket_size",
        "stage3_param_persistence_threshold": "param_persistence_threshold"}
OWNED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "zero_optimization.stage",
    "data_types.grad_accum_dtype", "communication_data_type", "pipeline.pipe_partitioned",
    "pipeline.grad_partitioned",
    *(f"zero_optimization.{k}" for k in COMM),
}


def zero_comm(cfg: Config) -> dict[str, Any]:
    """ZeRO's communication settings: overlap and buckets from ``parallel.*``, the bucket sizes by
    default scaled by the model's width ``d`` (the widest of encoder and decoder): reduce and
    all-gather buckets ``max(d^2, 2^22)`` elements, ZeRO-3 prefetch ``max(0.9 d^2, 2^21)``, and
    parameters under ``10 d`` elements (norms, biases) kept gathered under ZeRO-3. ``d^2`` is one
    square matrix of the model: a bucket holds a few layers' worth of gradients, big enough to
    amortise a collective's latency and small enough to start while the backward goes on; the
    floors keep tiny models from issuing thousands of tiny collectives."""
    p, stage = cfg.parallel, cfg.parallel.zero_stage
    if stage == 0:
        return {}
    d = max(cfg.model.dim, cfg.model.enc_dim or 0)
    # A micro-batch skipped for a non-finite loss runs a zero-gradient backward over every parameter,
    # which DeepSpeed's overlapped reduction rejects ("gradient computed twice"): no overlap then.
    overlap = p.overlap_comm if p.overlap_comm is not None else cfg.train.nonfinite != "skip"
    out: dict[str, Any] = {"overlap_comm": overlap,
                           "reduce_bucket_size": p.reduce_bucket_size or max(d * d, 1 << 22)}
    if stage >= 2:
        out["contiguous_gradients"] = p.contiguous_gradients
    if stage <= 2:
        out["allgather_bucket_size"] = p.allgather_bucket_size or max(d * d, 1 << 22)
    else:
        out["stage3_prefetch_bucket_size"] = p.prefetch_bucket_size or max(int(0.9 * d * d), 1 << 21)
        out["stage3_param_persistence_threshold"] = (p.param_persistence_threshold
                                                     if p.param_persistence_threshold is not None else 10 * d)
    return out


def batch_split(cfg: Config, dp_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation steps) per rank; global = micro x accumulation x DP."""
    g, m = cfg.train.global_batch, cfg.train.micro_batch
    if g % (m * dp_size):
        raise ConfigError(f"train.global_batch={g} must equal train.micro_batch={m} x accumulation x "
                          f"data-parallel size {dp_size}: {g} is not a multiple of {m * dp_size}")
    return m, g // (m * dp_size)


def check_precision(cfg: Config, device: str) -> None:
    p = cfg.train.precision
    if p == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16: not supported on CPU ranks (DeepSpeed's CPU accelerator); "
                          "use bf16 or fp32")
    if p == "bf16" and device == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability()
        if major < 8:  # torch.cuda.is_bf16_supported() is true there too, by emulation
            raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name()} (compute capability "
                              f"{major}.{minor}) has no bf16 kernels, which the fused attention paths need "
                              "(compute capability 8.0, Ampere, or newer); use fp16 or fp32")


def grad_dtypes(cfg: Config) -> dict[str, Any]:
    """Under bf16, gradients accumulate over micro-batches and are reduced over DP in fp32 unless
    ``parallel.grad_reduce_dtype=bf16`` (Megatron's choice too: a sum of many bf16 gradients loses
    the small ones). DeepSpeed 0.19.8 does this with ``data_types.grad_accum_dtype`` (ZeRO-1 then
    runs its BF16_Optimizer, ZeRO 2-3 an fp32 accumulation buffer) and ``communication_data_type``
    (the reduction's dtype); it has no fp32 accumulation without ZeRO."""
    if cfg.train.precision != "bf16" or cfg.parallel.zero_stage == 0:
        return {}
    dtype = cfg.parallel.grad_reduce_dtype or "fp32"
    return {"data_types": {"grad_accum_dtype": dtype}, "communication_data_type": dtype}


def pipeline_settings(cfg: Config) -> dict[str, Any]:
    """``parallel.pp > 1``: between stages, DeepSpeed sends each TP rank 1/tp of an activation and
    all-gathers it on the next stage (``pipe_partitioned``), which assumes the TP ranks hold the same
    activation and that only the first tensor sent needs a gradient. Under sequence parallelism each
    TP rank holds its own sequence chunk, and the encoder-decoder's decoder stages pass the encoder
    output on with the hidden state (both need gradients): those are sent whole."""
    if cfg.parallel.pp == 1:
        return {}
    split = not cfg.parallel.sequence_parallel and cfg.model.kind == "decoder"
    return {"pipeline": {"pipe_partitioned": split, "grad_partitioned": split}}


def _conflicts(raw: dict, prefix: str = "") -> list[str]:
    found = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key in OWNED:
            found.append(key)
        elif isinstance(v, dict):
            found.extend(_conflicts(v, key + "."))
    return found


def deepspeed_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    micro, accum = batch_split(cfg, dp_size)
    o, s = cfg.optim, cfg.schedule
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.train.steps, "warmup_num_steps": s.warmup_steps,
            "warmup_min_ratio": 0.0, "cos_min_ratio": s.min_lr_ratio, "warmup_type": "linear"}},
        # train.spike.action=skip discards an update through the optimizer's overflow check: keep it on
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": cfg.train.precision == "fp16"},
        "zero_optimization": {"stage": cfg.parallel.zero_stage, **zero_comm(cfg)},
        **grad_dtypes(cfg),
        **pipeline_settings(cfg),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    conflicts = _conflicts(cfg.deepspeed)
    if conflicts:
        key = conflicts[0].split(".")[-1]
        if key in COMM:
            ours = f"parallel.{COMM[key]}"
        elif key in ("grad_accum_dtype", "communication_data_type"):
            ours = "parallel.grad_reduce_dtype"
        elif key in ("pipe_partitioned", "grad_partitioned"):
            ours = "parallel.pp and parallel.sequence_parallel"
        else:
            ours = "e.g. train.*, optim.*, parallel.zero_stage"
        raise ConfigError(f"deepspeed.{conflicts[0]}: set by xft_dist from its own config ({ours}); remove it "
                          f"from the raw deepspeed section")
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
