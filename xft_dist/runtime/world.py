"""Joining the distributed world: this rank's device, the process group, the TP x DP groups and the
rank table. The trainer (``build_run``) and the doctor both come through here, so the order that
NCCL needs (CUDA device first, then the process group) is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..parallel import ParallelGroups
from .env import DistEnv
from .faults import RankInfo, rank_table


def accelerator() -> str:
    """``"cuda"`` on GPU ranks, ``"cpu"`` for CPU ranks, as DeepSpeed's accelerator reports it
    (``DS_ACCELERATOR=cpu`` forces CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def rank_device(env: DistEnv, kind: str | None = None) -> torch.device:
    """This rank's device: ``cuda:<local rank % visible GPUs>`` on GPU ranks, else the CPU. The
    modulo covers a scheduler that binds one GPU per task (SLURM's ``--gpus-per-task=1``: every
    task sees one device, ``cuda:0``, whatever its local rank)."""
    kind = kind or accelerator()
    if kind != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))


def matmul_precision(device: torch.device, *, allow_tf32: bool) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores on GPU ranks (``parallel.allow_tf32``, as
    Megatron does; ~8x the fp32 throughput, 10-bit mantissa products with fp32 accumulation), or
    exact fp32 where it is off. CPU ranks are left alone."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = allow_tf32


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend=nccl needs GPU ranks; CPU ranks use gloo (or backend: auto)")
    return backend


@dataclass
class World:
    env: DistEnv
    device: torch.device
    backend: str
    groups: ParallelGroups
    table: list[RankInfo]


def init_world(env: DistEnv, *, tp: int = 1, pp: int = 1, backend: str = "auto", timeout_s: float = 600.0,
               device: torch.device | None = None) -> World:
    """Set the CUDA device (GPU ranks), form (or adopt) the process group, build the PP x DP x TP
    groups and exchange the rank table. Collective: every rank calls it with the same ``tp`` and ``pp``."""
    device = device or rank_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
    env.export()
    timeout = timedelta(seconds=timeout_s)
    backend = resolve_backend(backend, device)
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    groups = ParallelGroups.build(tp_size=tp, pp_size=pp, timeout=timeout)
    return World(env=env, device=device, backend=str(dist.get_backend()), groups=groups,
                 table=rank_table(env.local_rank, groups))


def device_report(device: torch.device) -> str:
    """GPU name, CUDA and NCCL versions on GPU ranks; the CPU thread count otherwise."""
    if device.type != "cuda":
        return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    nccl = ".".join(str(v) for v in torch.cuda.nccl.version()) if hasattr(torch.cuda, "nccl") else "n/a"
    return (f"{torch.cuda.get_device_name(device)} (cuda:{device.index}), CUDA {torch.version.cuda}, "
            f"NCCL {nccl}, torch {torch.__version__}")
