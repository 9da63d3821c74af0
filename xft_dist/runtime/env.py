"""Rank, world size and master address from the deepspeed launcher, torchrun or SLURM, read one way."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed/torchrun", "slurm" or "single"

    @classmethod
    def single(cls) -> "DistEnv":
        """One process, no launcher (tools that build a model without a world)."""
        return cls(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, launcher="single")

    @classmethod
    def from_environ(cls, env=None, *, local_rank_arg: int | None = None) -> "DistEnv":
        env = os.environ if env is None else env

        def num(key):
            try:
                return int(env[key])
            except ValueError:
                raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from None

        if "RANK" in env and "WORLD_SIZE" in env:
            launcher = "deepspeed/torchrun"
            rank, world = num("RANK"), num("WORLD_SIZE")
            local = num("LOCAL_RANK") if "LOCAL_RANK" in env else (local_rank_arg if local_rank_arg is not None else 0)
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            launcher = "slurm"
            rank, world = num("SLURM_PROCID"), num("SLURM_NTASKS")
            local = num("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        else:
            launcher, rank, world, local = "single", 0, 1, local_rank_arg or 0
        if not 0 <= rank < world:
            raise LaunchError(f"rank {rank} is outside world size {world} (launcher: {launcher})")
        if local_rank_arg is not None and local_rank_arg != local:
            raise LaunchError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local} in the environment")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchError(f"{launcher} launch with {world} ranks but MASTER_ADDR is not set")
        port = int(env.get("MASTER_PORT", 0)) or (_free_port() if world == 1 else 29500)
        return cls(rank, world, local, addr, port, launcher)

    @staticmethod
    def inconsistencies(env=None) -> list[str]:
        """Launcher variables that contradict each other, each explained."""
        env = os.environ if env is None else env
        out = []
        slurm = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
        if slurm and "RANK" in env and "WORLD_SIZE" in env and env["SLURM_NTASKS"] == env["WORLD_SIZE"]:
            # One SLURM task per rank: the two numberings must agree.
            if env["SLURM_PROCID"] != env["RANK"]:
                out.append(f"RANK={env['RANK']} but SLURM_PROCID={env['SLURM_PROCID']} with one task per rank "
                           f"(SLURM_NTASKS=WORLD_SIZE={env['WORLD_SIZE']}): set RANK from SLURM_PROCID in the "
                           "sbatch script, or let xft_dist read the SLURM variables by not setting RANK")
            if "SLURM_LOCALID" in env and "LOCAL_RANK" in env and env["SLURM_LOCALID"] != env["LOCAL_RANK"]:
                out.append(f"LOCAL_RANK={env['LOCAL_RANK']} but SLURM_LOCALID={env['SLURM_LOCALID']}")
        if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
            if not 0 <= int(env["LOCAL_RANK"]) < int(env["LOCAL_WORLD_SIZE"]):
                out.append(f"LOCAL_RANK={env['LOCAL_RANK']} is outside LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}")
        return out

    def export(self) -> None:
        """Set the variables ``env://`` initialisation (and DeepSpeed) read."""
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                           "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr,
                           "MASTER_PORT": str(self.master_port)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
