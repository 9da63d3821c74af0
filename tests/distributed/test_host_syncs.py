"""The hot loop waits for the device at most twice per training step, and copies host numbers to it
once, from pinned memory on GPU ranks: every ``Tensor.item``,
``tolist``, ``cpu``, ``__bool__``, ``__float__`` and ``__int__`` made during ``train_step`` is
counted, on real engines fed by the real loader, for both model kinds, and attributed: xft_dist's
own (at most 2), DeepSpeed's (its overflow check and its clipping, once per parameter group, read
the grad norm: at most 3) and anything else (none). ``torch.optim``'s AdamW reads its step
counters with ``item()``; those live on the host (``capturable=False``), so they are not device
syncs on a GPU and are not held here."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from .harness import CheckSet

SYNCS = CheckSet(world_size=2, timeout_s=400)
METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


def _origin() -> str:
    """Who asked: the innermost frame in xft_dist, DeepSpeed or torch.optim (else "other")."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        for key, name in (("/xft_dist/", "xft_dist"), ("/deepspeed/", "deepspeed"), ("/torch/optim/", "torch.optim")):
            if key in path:
                return name
    return "other"


@contextmanager
def counting():
    calls: list[str] = []
    saved = {m: getattr(torch.Tensor, m) for m in METHODS}

    def wrap(name, fn):
        def counted(self, *a, **kw):
            calls.append(_origin())
            return fn(self, *a, **kw)
        return counted

    for m, fn in saved.items():
        setattr(torch.Tensor, m, wrap(m, fn))
    try:
        yield calls
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)


@contextmanager
def host_data_tensors():
    """Each ``torch.tensor(host data)`` made by ``xft_dist/train`` (on a GPU rank, a host-to-device
    copy): ``(pinned, device)`` per call, ``pinned`` as asked with ``pin_memory=``."""
    import traceback

    made: list[tuple[bool, str]] = []
    real = torch.tensor

    def tensor(data, *a, **kw):
        if any("/xft_dist/train/" in f.filename.replace("\\", "/") for f in traceback.extract_stack()[-3:-1]):
            made.append((bool(kw.get("pin_memory")), str(kw.get("device", "cpu"))))
        return real(data, *a, **kw)

    torch.tensor = tensor
    try:
        yield made
    finally:
        torch.tensor = real


def _syncs_per_step(kind: str, tp: int) -> list[int]:
    from xft_dist.config.load import validate
    from xft_dist.train.setup import build_run
    from xft_dist.train.step import train_step

    root = os.environ["XFT_SYNC_DIR"]
    model = {"kind": kind, "dim": 32, "depth": 2, "heads": 4, "dim_head": 8}
    data = {"shards": f"{root}/corpus", "seq_len": 16, "num_streams": 2}
    if kind == "encoder_decoder":
        model.update(enc_depth=1, enc_dim=48, depth=1)
        data.update(mode="span", enc_len=32)
    cfg = validate({"model": model, "data": data, "parallel": {"tp": tp, "zero_stage": 1},
                    "train": {"global_batch": 8, "micro_batch": 2 if tp == 1 else 4},
                    "run": {"out_dir": f"{root}/runs", "name": f"{kind}-{tp}"}, "checkpoint": {"resume": False},
                    "logging": {"wandb": "disabled", "progress_bar": False}})
    run = build_run(cfg)
    batches, counts = iter(run.loader), []
    for step in range(4):
        batch = next(batches)
        with counting() as calls, host_data_tensors() as made:
            train_step(run.engine, batch, groups=run.groups, micro_batch=cfg.train.micro_batch, step=step + 1)
        counts.append({who: calls.count(who) for who in ("xft_dist", "deepspeed", "other")})
        # the step's host numbers go to the device once, from memory pinned on GPU ranks (the flags
        # are made on the device): no pageable host-to-device copy of our own
        assert made == [(run.device.type == "cuda", "cpu")], f"{kind} TP={tp}: host data made into tensors {made}"
    run.engine.destroy()
    # ours: the step's numbers (one collective, read once) and the grad norm DeepSpeed computed
    assert max(c["xft_dist"] for c in counts[1:]) <= 2, f"{kind} TP={tp}: host syncs per step {counts}"
    # DeepSpeed's ZeRO-1/2 reads the grad norm to check for overflow (fp32 / fp16) and once per
    # parameter group (decay, no decay) to clip
    assert max(c["deepspeed"] for c in counts[1:]) <= 3, f"{kind} TP={tp}: host syncs per step {counts}"
    assert max(c["other"] for c in counts[1:]) == 0, f"{kind} TP={tp}: host syncs per step {counts}"
    return counts


@SYNCS.check
def decoder_dp2_accumulating_at_most_two_syncs_per_step():
    _syncs_per_step("decoder", 1)


@SYNCS.check
def decoder_tp2_at_most_two_syncs_per_step():
    _syncs_per_step("decoder", 2)


@SYNCS.check
def encoder_decoder_dp2_at_most_two_syncs_per_step():
    _syncs_per_step("encoder_decoder", 1)


def test_the_counter_sees_a_sync():
    with counting() as calls:
        torch.ones(2).sum().item()
        bool(torch.ones(()) > 0)
    assert len(calls) == 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from ..helpers import make_corpus

    root = tmp_path_factory.mktemp("syncs")
    make_corpus(root / "corpus", num_docs=150, shard_tokens=400, max_len=60)
    os.environ["XFT_SYNC_DIR"] = str(root)
    try:
        return SYNCS.run()
    finally:
        os.environ.pop("XFT_SYNC_DIR")


@pytest.mark.parametrize("name", SYNCS.names())
def test_host_syncs(report, name):
    report.assert_passed(name)
