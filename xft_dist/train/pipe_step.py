"""One optimizer step through DeepSpeed's pipeline engine (``parallel.pp > 1``, 1F1B).

The same contract as ``step.train_step``: the loss is normalised by the global batch's loss
tokens (counted from the batch on every stage: every stage of a DP rank loads the same batch), the
last stage computes the sums, and every rank returns the same numbers. The engine runs the whole
schedule (forwards, backwards, tied-gradient and DP reductions, the update) in ``train_batch``;
the step's numbers (loss sum, non-finite flag, stop request) travel in one world collective at the
one point every stage reaches after its last backward and before any reduction: DeepSpeed's
``ReduceTiedGrads`` instruction, which this step runs its check in front of. So a non-finite loss
stops the run before the update is applied, and a dropped update (``train.spike.action=skip``)
carries NaN gradients into DeepSpeed's overflow check, as at ``pp = 1``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..data.batch import Batch
from ..parallel import ParallelGroups, all_reduce

log = logging.getLogger("xft_dist.train")


def _before_update(engine, hook: Callable[[], None]) -> None:
    """Run ``hook`` at the engine's ``ReduceTiedGrads`` instruction, before DeepSpeed's own work."""
    from deepspeed.runtime.pipe import schedule

    base = engine.__dict__.get("_xft_instructions")
    if base is None:  # the engine's table as first seen (DeepSpeed's, or a profiler's wrapping it)
        base = engine._xft_instructions = dict(engine._INSTRUCTION_MAP)
    original = base[schedule.ReduceTiedGrads]

    def reduce_tied_grads(self, **kwargs):
        hook()
        return original(self, **kwargs)

    engine._INSTRUCTION_MAP = {**base, schedule.ReduceTiedGrads: reduce_tied_grads}


def _poison_gradients(engine) -> None:
    """NaN in every gradient this rank holds: DeepSpeed's overflow check then skips the update."""
    for p in engine.module.parameters():
        for grad in (getattr(p, "_hp_grad", None), p.grad):
            if grad is not None:
                grad.fill_(float("nan"))


def pipeline_train_step(engine, batch: Batch, *, groups: ParallelGroups, micro_batch: int, nonfinite: str = "stop",
                        step: int = 0, stop_requested: bool = False, writer: tuple[int, int] = (0, 0),
                        drop_update: Callable[[float], bool] | None = None):
    from .step import NonFiniteLoss, _world, step_flags, step_inputs, step_result

    micro, counts, scale = step_inputs(engine, batch, groups, micro_batch)
    feed = engine.module.feed
    feed.start(micro, scale)
    state: dict = {"dropped": False}

    def numbers() -> None:
        device = counts.device
        own = torch.zeros((), dtype=torch.float64, device=device)
        if groups.last_stage and groups.tp_rank == 0:  # the sums live on the last stage; TP peers hold the same
            own = torch.stack(feed.sums).to(torch.float64).sum()
        bad = (~torch.isfinite(own)).to(torch.float64)
        flags = step_flags(stop_requested, writer, device)
        got = all_reduce(torch.cat([torch.stack([torch.where(bad > 0, 0.0, own), bad]), flags]), _world(groups))
        values = torch.cat([counts, got]).tolist()
        state["numbers"] = values
        if values[4] > 0 and nonfinite == "stop":
            msg = f"step {step}: non-finite loss on at least one rank (train.nonfinite=stop): stopping"
            log.error("%s", msg)
            raise NonFiniteLoss(msg)
        if drop_update is not None and drop_update(values[3] / max(values[2], 1.0)):
            state["dropped"] = True
            _poison_gradients(engine)

    _before_update(engine, numbers)
    placeholder = torch.zeros(1)
    engine.train_batch(data_iter=iter([(placeholder, placeholder)] * len(micro)))
    return step_result(engine, state["numbers"], step=step, skipped=0, dropped=state["dropped"])
