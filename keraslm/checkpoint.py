"""Resumable training state: one atomic file holding weights, optimizer, LSTM state and position."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from keraslm.errors import UserError
from keraslm.rundir import atomic_path

CHECKPOINT_FILE = "latest.npz"


@dataclass
class Progress:
    """Where training stands: the next batch to run and what the run has learned so far."""

    epoch: int = 0          # epoch in progress (0-based)
    batch: int = 0          # next batch of that epoch
    best_val_loss: float = float("inf")
    epoch_nll: float = 0.0  # partial sums of the epoch in progress
    epoch_targets: int = 0
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0
    history: list = field(default_factory=list)


def save(path: Path, model, optimizer, progress: Progress, lstm_state: list[np.ndarray] | None) -> None:
    """Write the whole training state to `path` atomically."""
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"optimizer_{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    for i, s in enumerate(lstm_state or []):
        arrays[f"state_{i}"] = s
    arrays["progress"] = np.frombuffer(json.dumps(asdict(progress)).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load(path: Path, model, optimizer) -> tuple[Progress, list[np.ndarray] | None]:
    """Restore weights and optimizer from `path`; return the progress and the saved LSTM state."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint to resume from") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable checkpoint ({err})") from None
    weights = [arrays[f"weight_{i}"] for i in range(len(model.get_weights()))
               if f"weight_{i}" in arrays]
    try:
        model.set_weights(weights)
    except ValueError as err:
        raise UserError(f"{path}: checkpoint does not match the model ({err})") from None
    for i, variable in enumerate(optimizer.variables):
        variable.assign(arrays[f"optimizer_{i}"])
    progress = Progress(**json.loads(arrays["progress"].tobytes().decode()))
    state_keys = sorted((k for k in arrays if k.startswith("state_")), key=lambda k: int(k[6:]))
    state = [arrays[k] for k in state_keys] or None
    return progress, state
