"""Which steps do what, beyond training: metrics, log lines, validation, samples, data skips and
checkpoints. Every answer depends on the step and the config alone, so every rank agrees."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config


@dataclass(frozen=True)
class Cadence:
    steps: int
    log_every: int
    save_every: int
    valid_every: int | None = None        # None: no validation set
    sample_every: int | None = None       # None: no sample prompts
    skips: dict[int, int] = field(default_factory=dict)  # train.skip_data: after step -> batches

    @classmethod
    def from_config(cls, cfg: Config, *, validation: bool) -> "Cadence":
        return cls(steps=cfg.train.steps, log_every=cfg.logging.every, save_every=cfg.checkpoint.every,
                   valid_every=(cfg.data.valid.every or 0) if validation else None,
                   sample_every=(cfg.logging.sample_every or 0) if cfg.logging.sample_prompts else None,
                   skips=dict(cfg.train.skip_data))

    def _due(self, step: int, every: int | None) -> bool:
        return every is not None and (step == self.steps or (every > 0 and step % every == 0))

    def data_metrics(self, step: int) -> bool:
        """The per-source data metrics (a collective) join this step's metrics."""
        return step == 1 or self._due(step, self.log_every)

    def prints(self, step: int) -> bool:
        """Rank 0 writes this step's log line."""
        return step == 1 or step % self.log_every == 0

    def validates(self, step: int) -> bool:
        return self._due(step, self.valid_every)

    def samples(self, step: int) -> bool:
        return self._due(step, self.sample_every)

    def skip_after(self, step: int) -> int:
        """Global batches of data to skip after this step (``train.skip_data``)."""
        return self.skips.get(step, 0)

    def saves(self, step: int, *, stopping: bool) -> bool:
        return stopping or self._due(step, self.save_every)
