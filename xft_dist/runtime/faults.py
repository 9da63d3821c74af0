"""Knowing who is who, and saying who was lost when a collective fails.

At start-up every rank publishes (rank, local rank, host, address). When a collective raises
(a peer died: gloo reports "connection reset/closed by peer [ip]:port" within milliseconds; a link
is down: the collective times out after ``parallel.timeout_s``), ``explain`` turns the error into
one line naming the lost host and ranks, and the caller exits non-zero instead of hanging.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch.distributed as dist

from ..parallel.comm import all_gather_object

_PEER = re.compile(r"\[([0-9a-fA-F:.]+)\]:(\d+)")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    host: str
    addr: str
    pid: int
    place: str = ""  # "stage 1, tp 0, dp 1": the rank's coordinates in the PP x DP x TP grid

    def __str__(self) -> str:
        return f"{self.rank} ({self.place})" if self.place else str(self.rank)


def local_address(master_addr: str, master_port: int) -> str:
    """The source address this host uses to reach the master (the interface gloo will use)."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if ifname:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.connect((master_addr, master_port or 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def rank_table(local_rank: int, groups=None) -> list[RankInfo]:
    """Every rank's host, address, pid and (with ``groups``) place in the grid. Collective."""
    place = f"stage {groups.pp_rank}, tp {groups.tp_rank}, dp {groups.dp_rank}" if groups is not None else ""
    me = RankInfo(dist.get_rank(), local_rank, socket.gethostname(),
                  local_address(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 0))),
                  os.getpid(), place)
    return all_gather_object(me)


def is_comm_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        key in text for key in ("gloo", "Connection reset", "Connection closed", "Timed out", "timed out",
                                "NCCL", "Broken pipe", "DistBackendError", "connect"))


def explain(exc: BaseException, table: list[RankInfo] | None, *, me: int, timeout_s: float) -> str:
    """One line: who (as far as the error tells) was lost, and what to look at."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if table:
        mine = table[me]
        where = f"rank {me} on {mine.host} ({mine.addr})"
        m = _PEER.search(str(exc))
        if m:
            peers = [r for r in table if r.addr == m.group(1) and r.rank != me]
            if peers:
                hosts = sorted({p.host for p in peers})
                ranks = ", ".join(str(p) for p in peers)
                return (f"{where}: lost contact with host {', '.join(hosts)} ({m.group(1)}), ranks "
                        f"[{ranks}]: that rank died or its link went down. Error: {text}")
        if "timed out" in text.lower() or "timeout" in text.lower():
            others = sorted({f"{r.host} ({r.addr})" for r in table if r.addr != mine.addr})
            return (f"{where}: no answer within parallel.timeout_s={timeout_s:g}s; a peer is hung or a link "
                    f"is down (other hosts: {', '.join(others) or 'none'}). Error: {text}")
        return f"{where}: a collective failed: {text}"
    return f"rank {me}: a collective failed before the rank table existed: {text}"
