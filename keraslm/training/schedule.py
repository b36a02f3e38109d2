"""The learning rate after each validation: the tutorial's plateau decay or GluonNLP's step schedule.

Both are one rule. A validation that improves on the best so far resets a count of stale
validations; one that does not adds to it, and when the count reaches `interval` the learning
rate is multiplied by `factor` and the count starts again (GluonNLP's language-model script,
`--lr_update_interval` / `--lr_update_factor`). The tutorial's plateau decay is that rule with
an interval of 1: every validation without improvement multiplies the rate by `--lr-decay`.
"""

from __future__ import annotations

from dataclasses import dataclass

from keraslm.config import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """Multiply the learning rate by `factor` after `interval` validations without improvement."""

    interval: int = 1
    factor: float = 0.25

    @classmethod
    def of(cls, optim: OptimConfig) -> LRSchedule:
        """The step schedule when `--lr-update-interval` is given, else the plateau decay."""
        if optim.lr_update_interval:
            return cls(optim.lr_update_interval, optim.lr_update_factor)
        return cls(1, optim.lr_decay)

    def after_validation(self, lr: float, stale: int, improved: bool) -> tuple[float, int]:
        """The learning rate and the count of stale validations after a validation."""
        if improved:
            return lr, 0
        stale += 1
        if stale % self.interval == 0:
            return lr * self.factor, 0
        return lr, stale
