"""The loader in real processes at TP=2 x DP=2: TP peers get identical batches, and the DP ranks'
batches concatenate to the single-rank (global) batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from xft_dist.data import LoaderConfig, StreamingLoader
from xft_dist.parallel import ParallelGroups

from ..helpers import make_corpus
from .harness import CheckSet

DATA = CheckSet(world_size=4)
CFG = LoaderConfig(seq_len=24, global_rows=8, num_streams=4, seed=5, num_workers=1)


@DATA.check
def tp_peers_identical_and_dp_slices_make_the_global_batch():
    g = ParallelGroups.build(tp_size=2)
    corpus = os.environ["XFT_TEST_CORPUS"]
    loader = StreamingLoader(corpus, CFG, dp_rank=g.dp_rank, dp_size=g.dp_size)
    reference = StreamingLoader(corpus, CFG)  # DP=1 on every rank: the global sequence
    for step, (mine, full) in enumerate(zip(loader, reference)):
        for key, local in mine.tensors().items():
            peers = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(peers, local.contiguous(), group=g.tp_group)
            assert torch.equal(peers[0], peers[1]), f"step {step}: TP peers got different {key}"
            slices = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(slices, local.contiguous(), group=g.dp_group)
            assert torch.equal(torch.cat(slices), full.tensors()[key]), f"step {step}: DP slices != global {key}"
        if step == 5:
            break


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_corpus")
    make_corpus(out, num_docs=200, shard_tokens=800)
    os.environ["XFT_TEST_CORPUS"] = str(out)
    try:
        return DATA.run()
    finally:
        os.environ.pop("XFT_TEST_CORPUS", None)


@pytest.mark.parametrize("name", DATA.names())
def test_data_tp2_dp2(report, name):
    report.assert_passed(name)
