"""The distributed harness itself: failures are reported per rank, hangs time out, crashes are
named, later checks still get a verdict, and no process is left behind."""

from __future__ import annotations

import os
import time

import psutil
import torch
import torch.distributed as dist

from .harness import CheckSet

FAILING = CheckSet(world_size=2)
HANGING = CheckSet(world_size=2, timeout_s=8, collective_timeout_s=60)
CRASHING = CheckSet(world_size=2)


@FAILING.check
def passes_first():
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2


@FAILING.check
def rank1_raises_while_rank0_waits():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # never completes: rank 1 is gone


@FAILING.check
def passes_after_the_failure():
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2


@HANGING.check
def rank0_hangs():
    if dist.get_rank() == 0:
        time.sleep(600)


@CRASHING.check
def rank1_dies():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _no_children_left():
    alive = [p for p in psutil.Process().children(recursive=True) if p.is_running()
             and p.status() != psutil.STATUS_ZOMBIE]
    # multiprocessing's resource tracker may outlive a launch; it is not a rank.
    ranks = [p for p in alive if "resource_tracker" not in " ".join(p.cmdline())]
    assert not ranks, f"leftover processes: {[(p.pid, p.cmdline()) for p in ranks]}"


def test_failure_is_reported_with_the_rank_and_later_checks_still_run():
    report = FAILING.run()
    report.assert_passed("passes_first")
    report.assert_passed("passes_after_the_failure")
    try:
        report.assert_passed("rank1_raises_while_rank0_waits")
    except AssertionError as e:
        assert "rank(s) 1" in str(e) and "boom from rank 1" in str(e), str(e)
    else:
        raise AssertionError("a failing check was reported as passed")
    _no_children_left()


def test_hang_times_out_and_names_the_check():
    t0 = time.monotonic()
    report = HANGING.run()
    assert time.monotonic() - t0 < 45
    try:
        report.assert_passed("rank0_hangs")
    except AssertionError as e:
        assert "timed out after 8s" in str(e) and "rank 0: rank0_hangs" in str(e), str(e)
    else:
        raise AssertionError("a hanging check was reported as passed")
    _no_children_left()


def test_crashed_rank_is_named():
    report = CRASHING.run()
    try:
        report.assert_passed("rank1_dies")
    except AssertionError as e:
        assert "rank 1 died with exit code 3" in str(e), str(e)
    else:
        raise AssertionError("a crashed rank was reported as passed")
    _no_children_left()
