"""A wait on one rank's long host work (a checkpoint's conversion to another layout) has its own
timeout: with the process group's timeout at 3 s, the other rank waits through rank 0's 7 s."""

from __future__ import annotations

import time

import pytest

from .harness import CheckSet

SHORT = CheckSet(world_size=2, timeout_s=120, collective_timeout_s=3)


@SHORT.check
def a_barrier_with_its_own_timeout_outlasts_the_groups():
    import torch
    import torch.distributed as dist

    from xft_dist.parallel import all_reduce, barrier

    if dist.get_rank() == 0:
        time.sleep(7)  # longer than the group's 3 s
    barrier(timeout_s=60)
    assert all_reduce(torch.ones(1), dist.group.WORLD).item() == 2  # the world is still usable afterwards


@pytest.fixture(scope="module")
def report():
    return SHORT.run()


@pytest.mark.parametrize("name", SHORT.names())
def test_waits(report, name):
    report.assert_passed(name)
