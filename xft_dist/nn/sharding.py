"""Building TP-split parameters: identical full weights at any TP size, and the marks DeepSpeed reads."""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import group_rank, group_size
from .init import InitMethod, normal_init  # noqa: F401 - re-exported

SPLITS = ("vocab", "column", "row")  # vocab: rows of a (padded) vocabulary; column: dim 0; row: dim 1


def mark_tensor_parallel(param: torch.Tensor, partition_dim: int, stride: int = 1) -> None:
    """Tag a parameter as split over TP ranks along ``partition_dim`` (DeepSpeed's attributes).

    DeepSpeed's global gradient norm counts a parameter without this mark only on TP rank 0 (it
    assumes it is replicated); a split parameter left unmarked silently corrupts clipping.
    """
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """Split over more than one TP rank here (DeepSpeed's mark)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def tp_split(param: torch.Tensor) -> tuple[str, int | None]:
    """How the layer that made ``param`` splits it over TP ranks, at any TP size (TP=1 included):
    ``("vocab", 0)``, ``("column", 0)``, ``("row", 1)``, or ``("replicated", None)``. The one
    statement of each parameter's split: universal checkpoints, resharding and consolidation read it."""
    return getattr(param, "tp_split", ("replicated", None))


def active_tp_split(param: torch.Tensor) -> tuple[str, int | None]:
    """``tp_split`` where the parameter is split over more than one rank here, else replicated."""
    return tp_split(param) if is_tensor_parallel(param) else ("replicated", None)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} must be divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def sharded_parameter(
    full_shape: tuple[int, ...],
    *,
    partition_dim: int,
    group,
    init_method: InitMethod,
    padded_size: int | None = None,
    split: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Parameter:
    """Draw the full ``full_shape`` matrix (the same on every rank and at any TP size), zero-pad
    ``partition_dim`` to ``padded_size`` if given, and keep this rank's contiguous slice. The
    parameter carries its split (``tp_split``: ``split``, by default ``column`` along dim 0 and
    ``row`` along dim 1) at every TP size, and DeepSpeed's mark where it is split.

    Drawing the unpadded matrix keeps the number of random draws, and so every later parameter,
    independent of the TP size.
    """
    full = torch.empty(full_shape, dtype=torch.float32)
    init_method(full)
    if padded_size is not None and padded_size > full_shape[partition_dim]:
        pad_shape = list(full_shape)
        pad_shape[partition_dim] = padded_size - full_shape[partition_dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=partition_dim)
    size = group_size(group)
    local = divide(full.shape[partition_dim], size, f"dim {partition_dim} of a {tuple(full.shape)} weight")
    shard = full.narrow(partition_dim, group_rank(group) * local, local)
    param = nn.Parameter(shard.to(dtype=dtype or torch.get_default_dtype(), device=device).contiguous())
    kind = split or ("column" if partition_dim == 0 else "row")
    if kind not in SPLITS:
        raise ValueError(f"split={kind!r}: expected one of {SPLITS}")
    param.tp_split = (kind, partition_dim)
    if size > 1:
        mark_tensor_parallel(param, partition_dim)
    return param
