"""Loss-spike guard: a step whose loss (or gradient norm) is far above its recent history is
logged, skipped, or rolled back (``train.spike``).

The history is the last ``window`` accepted values; a value is a spike when at least ``warmup``
values are known and its z-score against them exceeds ``zscore`` (or, with ``ratio``, it exceeds
``ratio`` times their mean). Every rank sees the same reduced loss and gradient norm, so every rank
decides alike. The history is saved with each checkpoint and restored on resume and rollback, so
the decisions of a resumed run are those of an uninterrupted one.

``skip``: the step's loss is judged before the update, which is then discarded (no optimizer or
scheduler step; the batch is consumed), counted as ``spike/skipped``. The gradient norm exists only
inside the optimizer step, after that decision: a gradient-norm spike is logged.

``rollback``: every rank reloads the newest complete checkpoint (weights, optimizer, schedule,
RNG, data position, this history), skips the next ``skip_batches`` global batches of data, counted
and logged, and trains on; after ``max_rollbacks`` the run stops instead.
"""

from __future__ import annotations

import math
from collections import deque


class SpikeGuard:
    """Decides and counts; the step and the loop apply. Per step: ``drop_update`` (given to
    ``train_step``, ``action="skip"`` only) judges the loss before the update; ``after_step`` says
    why the finished step is a spike (or None) and keeps the counts; ``metrics`` reports them."""

    def __init__(self, *, window: int, warmup: int, zscore: float, ratio: float | None, grad_norm: bool,
                 action: str = "log"):
        self.window, self.warmup, self.zscore, self.ratio, self.grad_norm = window, warmup, zscore, ratio, grad_norm
        self.action = action
        self.history: dict[str, deque] = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}
        self.rollbacks = 0
        self.spikes = 0
        self.skipped = 0
        self._dropped_why: str | None = None

    @classmethod
    def from_config(cls, spike) -> "SpikeGuard":
        return cls(window=spike.window, warmup=spike.warmup, zscore=spike.zscore, ratio=spike.ratio,
                   grad_norm=spike.grad_norm, action=spike.action)

    @property
    def drop_update(self):
        """``train_step``'s ``drop_update``: with ``action="skip"``, whether the step's global loss
        is a spike whose update must be discarded (every rank sees the same loss); else None."""
        return self._judge_update if self.action == "skip" else None

    def _judge_update(self, loss: float) -> bool:
        self._dropped_why = self.why(loss, None)
        return self._dropped_why is not None

    def after_step(self, loss: float, grad_norm: float | None, *, dropped: bool) -> str | None:
        """Why the finished step is a spike, or None (its values then join the history);
        ``dropped``: its update was discarded on ``drop_update``'s word (counted as skipped)."""
        if dropped:
            self.spikes, self.skipped = self.spikes + 1, self.skipped + 1
            why, self._dropped_why = self._dropped_why, None
            return why
        return self.check(loss, grad_norm)

    def metrics(self) -> dict:
        return {"spike": 1, "spike/count": self.spikes, "spike/skipped": self.skipped}

    def _judge(self, key: str, value: float | None) -> str | None:
        if value is None or not math.isfinite(value):
            return None
        past = self.history[key]
        if len(past) < self.warmup:
            return None
        mean = sum(past) / len(past)
        std = math.sqrt(sum((x - mean) ** 2 for x in past) / len(past))
        z = (value - mean) / std if std > 0 else (math.inf if value > mean else 0.0)
        if z > self.zscore:
            return f"{key} {value:.4g} is {z:.1f} standard deviations above the mean {mean:.4g} of the last {len(past)}"
        if self.ratio is not None and value > self.ratio * mean:
            return f"{key} {value:.4g} is over {self.ratio:g} x the mean {mean:.4g} of the last {len(past)}"
        return None

    def why(self, loss: float, grad_norm: float | None) -> str | None:
        """Why these values are a spike, or None; the history is left as it is."""
        return self._judge("loss", loss) or (self._judge("grad_norm", grad_norm) if self.grad_norm else None)

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        """Why this step is a spike, or None (then its values join the history)."""
        why = self.why(loss, grad_norm)
        if why is not None:
            self.spikes += 1
            return why
        self.history["loss"].append(loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.history["grad_norm"].append(grad_norm)
        return None

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "rollbacks": self.rollbacks,
                "spikes": self.spikes, "skipped": self.skipped}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        for k, values in state["history"].items():
            self.history[k] = deque(values, maxlen=self.window)
        self.rollbacks, self.spikes = state["rollbacks"], state["spikes"]
        self.skipped = state.get("skipped", 0)
