"""Run test bodies in N real processes over gloo.

One launch runs many named checks in order on every rank (process start, imports and the process
group cost seconds, so they are shared). Each check becomes its own pytest test through
``CheckSet.pytest_params`` and a module-scoped report fixture:

    CHECKS = CheckSet(world_size=2)

    @CHECKS.check
    def column_row_mlp():          # runs on every rank, the world already initialised
        ...

    @pytest.fixture(scope="module")
    def report():
        return CHECKS.run()

    @pytest.mark.parametrize("name", CHECKS.names())
    def test_tp2(report, name):
        report.assert_passed(name)

A rank whose check raises stops there (its peers may be blocked in a collective it will never
join); the launcher then terminates every rank after a short grace period, reports each rank's
traceback, and marks later checks as not run. A launch past its timeout is killed and reported
with the check each rank was in. No process outlives ``run``.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """Variables a rank sees, as the deepspeed launcher or torchrun would set them."""
    return {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
        # DeepSpeed JIT-builds a C++ op on first init; keep the build cached in the repo.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                               str(REPO / ".cache" / "torch_extensions")),
    }


def _worker(rank, world_size, port, checks, results, collective_timeout_s):
    os.environ.update(child_env(rank, world_size, port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    current = "<init>"
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        for fn in checks:
            current = fn.__name__
            results.put(("start", rank, current, None))
            t0 = time.monotonic()
            fn()
            results.put(("pass", rank, current, time.monotonic() - t0))
        current = "<teardown>"
        dist.barrier()
        dist.destroy_process_group()
        results.put(("done", rank, None, None))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        results.put(("fail", rank, current, traceback.format_exc()))


@dataclass
class Report:
    world_size: int
    names: list[str]
    passed: dict[str, set[int]] = field(default_factory=dict)
    failures: dict[str, dict[int, str]] = field(default_factory=dict)
    fatal: str | None = None  # a failure outside any check (init, timeout, a crashed process)
    seconds: dict[str, float] = field(default_factory=dict)

    def assert_passed(self, name: str) -> None:
        __tracebackhide__ = True
        if name in self.failures:
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(self.failures[name].items()))
            raise AssertionError(f"check {name!r} failed:\n{details}")
        ranks = self.passed.get(name, set())
        if len(ranks) != self.world_size:
            missing = sorted(set(range(self.world_size)) - ranks)
            why = self.fatal or (
                "an earlier check failed: " + ", ".join(sorted(self.failures)) if self.failures
                else "unknown")
            raise AssertionError(f"check {name!r} did not complete on ranks {missing}: {why}")


class CheckSet:
    def __init__(self, world_size: int, *, timeout_s: float = 300.0, collective_timeout_s: float = 120.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.collective_timeout_s = collective_timeout_s
        self._checks: list[Callable[[], None]] = []

    def check(self, fn: Callable[[], None]) -> Callable[[], None]:
        self._checks.append(fn)
        return fn

    def names(self) -> list[str]:
        return [fn.__name__ for fn in self._checks]

    def run(self, only: list[str] | None = None) -> Report:
        checks = [fn for fn in self._checks if only is None or fn.__name__ in only]
        return launch(checks, self.world_size, timeout_s=self.timeout_s,
                      collective_timeout_s=self.collective_timeout_s)


def launch(checks, world_size: int, *, timeout_s: float = 300.0,
           collective_timeout_s: float = 120.0, grace_s: float = 5.0) -> Report:
    """Run ``checks`` in order on ``world_size`` spawned ranks; never leaves a process behind."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    report = Report(world_size=world_size, names=[fn.__name__ for fn in checks])
    current: dict[int, str] = {}
    done: set[int] = set()
    # Children read OMP_NUM_THREADS when torch is imported during unpickling, before _worker runs.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_worker, name=f"rank{rank}",
                            args=(rank, world_size, port, checks, results, collective_timeout_s))
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while len(done) < world_size:
            now = time.monotonic()
            if failed_at is not None and now > failed_at + grace_s:
                break
            if now > deadline:
                where = ", ".join(f"rank {r}: {current.get(r, '<init>')}"
                                  for r in range(world_size) if r not in done)
                report.fatal = f"timed out after {timeout_s:.0f}s ({where})"
                break
            try:
                kind, rank, name, payload = results.get(timeout=0.2)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and rank not in done and failed_at is None:
                        report.fatal = f"rank {rank} died with exit code {p.exitcode} in {current.get(rank, '<init>')}"
                        failed_at = time.monotonic()
                continue
            if kind == "start":
                current[rank] = name
            elif kind == "pass":
                report.passed.setdefault(name, set()).add(rank)
                report.seconds[name] = max(report.seconds.get(name, 0.0), payload)
            elif kind == "done":
                done.add(rank)
            elif kind == "fail":
                done.add(rank)
                if name in report.names:
                    report.failures.setdefault(name, {})[rank] = payload
                else:
                    report.fatal = f"rank {rank} failed in {name}:\n{payload}"
                failed_at = failed_at or time.monotonic()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return report
