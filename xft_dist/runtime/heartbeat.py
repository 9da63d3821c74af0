"""Lost peers are named and the survivors exit with status 3, on GPUs too.

Over gloo a lost peer surfaces as an error of the next collective (a reset connection within
milliseconds, or the collective's timeout), which ``faults.explain`` turns into one line and exit
status 3. Over NCCL nothing surfaces on the host: collectives are queued on the GPU, the host
blocks in the next device sync (``.tolist()``) until ProcessGroupNCCL's own watchdog aborts the
process (SIGABRT, exit 134, no line naming anyone) after ``parallel.timeout_s``.

So every rank also beats on the rendezvous store, from a thread of its own with a connection of
its own: a counter under ``xft/heartbeat/<rank>``, every ``every_s``. The same thread reads the
peers' counters. A peer whose counter has not moved for ``lost_after_s`` (its process died or
froze, its host or link is gone), or a store that does not answer for that long (the host of rank
0 is gone), is lost; once this rank has also made no progress for ``lost_after_s`` (it waits for
the lost peer in a collective), it prints one line naming the lost ranks and hosts from the rank
table, calls ``on_lost`` (the trainer writes ``status.json``: ``lost_peer``) and exits with status
``EXIT_LOST`` (3) without tearing anything down. ``lost_after_s`` is well below
``parallel.timeout_s``, so this happens before NCCL's watchdog.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

EXIT_LOST = 3
KEY = "xft/heartbeat/{}"


class Heartbeat:
    def __init__(self, *, rank: int, world_size: int, host: str, port: int, table=None, every_s: float = 5.0,
                 lost_after_s: float = 60.0, idle_s: Callable[[], float] | None = None,
                 on_lost: Callable[[str], None] | None = None):
        if lost_after_s <= 2 * every_s:
            raise ValueError(f"heartbeat: lost after {lost_after_s} s must exceed two beats of {every_s} s")
        self.rank, self.world_size, self.table = rank, world_size, table
        self.every_s, self.lost_after_s = every_s, lost_after_s
        self.idle_s, self.on_lost = idle_s or (lambda: float("inf")), on_lost
        self._address = (host, port)
        self._stop = threading.Event()
        self._seen: dict[int, tuple[bytes, float]] = {}  # peer -> (its last counter, when it changed)
        self._store_ok = time.monotonic()                 # the last round trip to the store
        self._threads = [threading.Thread(target=self._beat, name="xft-heartbeat", daemon=True),
                         threading.Thread(target=self._judge, name="xft-heartbeat-judge", daemon=True)]

    def start(self) -> "Heartbeat":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------------------------- threads
    def _connect(self):
        import torch.distributed as dist

        host, port = self._address
        return dist.TCPStore(host, port, self.world_size, is_master=False,
                             timeout=timedelta(seconds=max(self.every_s, 1.0)), wait_for_workers=False)

    def _beat(self) -> None:
        """The store's I/O, which may block on a frozen store host: judged by another thread."""
        store, count = None, 0
        while not self._stop.wait(self.every_s):
            try:
                store = store or self._connect()
                count += 1
                store.set(KEY.format(self.rank), str(count))
                now = time.monotonic()
                for peer in range(self.world_size):
                    if peer != self.rank:
                        key = KEY.format(peer)
                        value = store.get(key) if store.check([key]) else b""
                        if self._seen.get(peer, (None,))[0] != value:
                            self._seen[peer] = (value, now)
                self._store_ok = time.monotonic()
            except Exception:  # noqa: BLE001 - the store's host is gone, or the link to it
                store = None

    def _judge(self) -> None:
        while not self._stop.wait(self.every_s):
            now, seen = time.monotonic(), dict(self._seen)
            lost = {p: t for p, (_, t) in seen.items() if now - t > self.lost_after_s}
            if now - self._store_ok > self.lost_after_s and self.rank != 0:
                lost[0] = min(self._store_ok, lost.get(0, self._store_ok))  # rank 0's process serves the store
            if lost and self.idle_s() > self.lost_after_s and not self._stop.is_set():
                self._fire(sorted(lost), now - min(lost.values()))

    def _fire(self, lost: list[int], silent_s: float) -> None:
        msg = describe_lost(lost, self.table, me=self.rank, silent_s=silent_s, lost_after_s=self.lost_after_s)
        print(f"\npretrain: {msg}", file=sys.stderr, flush=True)
        try:
            if self.on_lost is not None:
                self.on_lost(msg)
        finally:
            sys.stderr.flush()
            os._exit(EXIT_LOST)


def describe_lost(lost: list[int], table, *, me: int, silent_s: float, lost_after_s: float) -> str:
    """One line, as ``faults.explain`` writes a failed collective's: who is lost, from the rank table."""
    if table:
        mine = table[me]
        peers = [r for r in table if r.rank in lost]
        hosts = ", ".join(sorted({f"{p.host} ({p.addr})" for p in peers}))
        ranks = ", ".join(str(p) for p in peers)
        return (f"rank {me} on {mine.host} ({mine.addr}): lost contact with host {hosts}, ranks "
                f"[{ranks}]: no heartbeat for {silent_s:.0f} s (parallel.heartbeat_lost_s="
                f"{lost_after_s:g}); that rank died, froze or its link went down")
    return f"rank {me}: lost contact with ranks {lost}: no heartbeat for {silent_s:.0f} s"
