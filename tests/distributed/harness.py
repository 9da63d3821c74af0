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
join); the launcher terminates every rank after a short grace period, keeps each rank's traceback,
and starts a fresh launch with the checks after the failed one, so every check gets a verdict. A
launch past its timeout (or with a crashed rank) is killed and the check it was in is failed with
that reason. No process outlives ``run``.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.multiprocessing as mp

from ..helpers import cpu_rank_env, free_port


def child_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """Variables a rank sees, as the deepspeed launcher or torchrun would set them."""
    env = cpu_rank_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


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
    stuck_in: str | None = None  # the check the launch was in when it timed out or a rank died
    seconds: dict[str, float] = field(default_factory=dict)

    def assert_passed(self, name: str) -> None:
        __tracebackhide__ = True
        if name in self.failures:
            by_text: dict[str, list[int]] = {}  # ranks failing the same way are shown once
            for r, tb in sorted(self.failures[name].items()):
                by_text.setdefault(tb, []).append(r)
            details = "\n".join(
                f"--- {'launcher' if ranks == [-1] else 'rank(s) ' + ', '.join(map(str, ranks))} ---\n{tb}"
                for tb, ranks in by_text.items())
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

    def run(self, only: list[str] | None = None, max_launches: int = 4) -> Report:
        """Run the checks; after a failure, relaunch the ones after it so each gets a verdict."""
        todo = [fn for fn in self._checks if only is None or fn.__name__ in only]
        merged = Report(world_size=self.world_size, names=[fn.__name__ for fn in todo])
        for _ in range(max_launches):
            if not todo:
                break
            rep = launch(todo, self.world_size, timeout_s=self.timeout_s,
                         collective_timeout_s=self.collective_timeout_s)
            for name, ranks in rep.passed.items():
                merged.passed.setdefault(name, set()).update(ranks)
            for name, tbs in rep.failures.items():
                merged.failures.setdefault(name, {}).update(tbs)
            merged.seconds.update(rep.seconds)
            names = [fn.__name__ for fn in todo]
            finished = [i for i, n in enumerate(names)
                        if n in rep.failures or len(rep.passed.get(n, ())) == self.world_size]
            if rep.fatal:
                stuck = rep.stuck_in
                if stuck in names:  # a timeout or a crash inside a check: blame it, go on after it
                    merged.failures.setdefault(stuck, {})[-1] = rep.fatal
                    finished.append(names.index(stuck))
                else:
                    merged.fatal = rep.fatal
                    break
            last = max(finished, default=-1)
            todo = todo[last + 1:]
        else:
            if todo:
                merged.fatal = f"gave up after {max_launches} launches"
        return merged


def _record_failure(report: Report, rank: int, name: str, text: str) -> None:
    if name in report.names:
        report.failures.setdefault(name, {})[rank] = text
    else:
        report.fatal = f"rank {rank} failed in {name}:\n{text}"
        report.stuck_in = None


def launch(checks, world_size: int, *, timeout_s: float = 300.0,
           collective_timeout_s: float = 120.0, grace_s: float = 5.0) -> Report:
    """Run ``checks`` in order on ``world_size`` spawned ranks; never leaves a process behind."""
    ctx = mp.get_context("spawn")
    # SimpleQueue writes synchronously: a rank that dies right after a put has still reported.
    results = ctx.SimpleQueue()
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
        seen_dead: set[int] = set()
        while len(done) < world_size:
            now = time.monotonic()
            if failed_at is not None and now > failed_at + grace_s:
                break
            if now > deadline:
                where = ", ".join(f"rank {r}: {current.get(r, '<init>')}"
                                  for r in range(world_size) if r not in done)
                report.fatal = f"timed out after {timeout_s:.0f}s ({where})"
                report.stuck_in = next((current[r] for r in range(world_size)
                                        if r not in done and r in current), None)
                break
            messages = []
            while not results.empty():  # drain first: a dead rank's last words are in here
                messages.append(results.get())
            if not messages:
                time.sleep(0.05)
            for kind, rank, name, payload in messages:
                if kind == "start":
                    current[rank] = name
                elif kind == "pass":
                    report.passed.setdefault(name, set()).add(rank)
                    report.seconds[name] = max(report.seconds.get(name, 0.0), payload)
                elif kind == "done":
                    done.add(rank)
                elif kind == "fail":
                    done.add(rank)
                    _record_failure(report, rank, name, payload)
                    failed_at = failed_at or time.monotonic()
            if not messages or failed_at is not None:
                # A rank that died without a word (segfault, os._exit, OOM kill) is named here.
                # Only once a full drain has happened after the death was first seen.
                for r, p in enumerate(procs):
                    if r not in done and p.exitcode not in (None, 0):
                        if r not in seen_dead:
                            seen_dead.add(r)
                            continue
                        done.add(r)
                        _record_failure(report, r, current.get(r, "<init>"),
                                        f"rank {r} died with exit code {p.exitcode}")
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
