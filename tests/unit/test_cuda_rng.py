"""RNG streams carry a CUDA state whenever CUDA is available, initialised or not.

This machine has no GPU, so ``torch.cuda`` is replaced by a stand-in whose "device generator" is a
real CPU ``torch.Generator``: the streams code under test is the real one, and what it does with the
CUDA generator (seed, capture, swap in, restore) is observable.
"""

from __future__ import annotations

import pytest
import torch

from xft_dist.parallel import capture_rng_state, restore_rng_state, seed_all


class FakeCuda:
    def __init__(self):
        self.gen = torch.Generator()
        self.gen.manual_seed(12345)

    def draw(self) -> torch.Tensor:  # what a dropout mask on the device would consume
        return torch.rand(4, generator=self.gen)


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # not initialised yet
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake.gen.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": fake.gen.set_state(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [fake.gen.get_state()])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: fake.gen.set_state(states[0]))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: fake.gen.manual_seed(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: fake.gen.manual_seed(seed))
    return fake


def _tp_draw(cuda: FakeCuda, tp_rank: int) -> torch.Tensor:
    streams = seed_all(7, tp_rank=tp_rank)
    with streams.fork():
        return cuda.draw()


def test_tp_ranks_draw_different_cuda_masks_in_split_regions(cuda):
    assert not torch.equal(_tp_draw(cuda, 0), _tp_draw(cuda, 1))
    assert torch.equal(_tp_draw(cuda, 1), _tp_draw(cuda, 1))  # and each is reproducible


def test_the_default_cuda_generator_is_shared_by_tp_ranks_and_untouched_by_forks(cuda):
    seed_all(7, tp_rank=0)
    outside_0 = cuda.draw()
    streams = seed_all(7, tp_rank=1)
    with streams.fork():
        cuda.draw()
    assert torch.equal(cuda.draw(), outside_0)  # the fork advanced its own stream, not the default


def test_capture_and_restore_cover_the_cuda_generator_and_streams(cuda):
    streams = seed_all(3, tp_rank=1)
    state = capture_rng_state(streams)
    assert state["torch_cuda"] is not None
    with streams.fork():
        want_stream = cuda.draw()
    want_default = cuda.draw()
    restore_rng_state(state, streams)
    with streams.fork():
        assert torch.equal(cuda.draw(), want_stream)
    assert torch.equal(cuda.draw(), want_default)
