"""The one thing the trainer asks of a model.

``train/step.py`` and ``train/evaluate.py`` hand a model (through its DeepSpeed engine, which calls
``forward``) one ``data.Batch`` per micro-batch and get back the sum of its token losses and the
number of targets that count. The count equals ``batch.num_loss_tokens``: the step normalises by
the batches' counts, all-reduced over data-parallel ranks, before any forward runs.

A new model kind implements ``loss_sums`` (and ``forward(batch)`` returning it), is built in
``models/factory.py``, and touches nothing under ``train/``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..data.batch import Batch


@runtime_checkable
class LossModel(Protocol):
    def loss_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, num_loss_tokens)``: the sum over ``batch``'s counted targets (labels other
        than ``IGNORE_INDEX``) of their losses, and how many there are, as 0-d tensors."""
        ...
