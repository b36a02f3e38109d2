"""Shared by the resume tests: a stop request that arrives after a given number of consistent
points, and the arrays of a run's saved checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np

from keraslm.training import checkpoint
from keraslm.training.signals import StopRequest


class StopAfter(StopRequest):
    """A stop request that arrives as a SIGTERM would, after `checks` consistent points."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks = checks

    @property
    def requested(self) -> bool:
        self.checks -= 1
        if self.checks < 0:
            self.signum = signal.SIGTERM
        return self.signum is not None


def saved_arrays(run: Path) -> dict[str, np.ndarray]:
    """Every array of `run`'s checkpoint (weights, optimizer, state, averages), by name."""
    with np.load(run / "checkpoint" / checkpoint.CHECKPOINT_FILE) as saved:
        return {k: saved[k] for k in saved.files if k != "progress"}
