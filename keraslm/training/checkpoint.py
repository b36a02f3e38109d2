"""Resumable training state: one atomic file holding weights, optimizer, LSTM state and position.

    latest.npz    weight_<i>     the model's weights, in `model.get_weights()` order
                  optimizer_<i>  the optimizer's variables (iterations, learning rate, slots)
                  state_<i>      the carried LSTM state, gathered from every replica (mid-epoch)
                  average_<i>    NT-ASGD's running average of the trainable weights, once on,
                  average_steps  and how many snapshots it is the mean of
                  progress       `Progress` as UTF-8 JSON

Reading never lets a zip, npy or JSON error escape: a truncated, corrupt or foreign file is one
`UserError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keraslm.errors import UserError, first_line
from keraslm.files import atomic_path

if TYPE_CHECKING:
    from keraslm.training.averaging import WeightAverage

CHECKPOINT_FILE = "latest.npz"


@dataclass
class Progress:
    """Where training stands: the next batch to run and what the run has learned so far."""

    epoch: int = 0          # epoch in progress (0-based)
    batch: int = 0          # next batch of that epoch
    best_val_loss: float = float("inf")
    stale_epochs: int = 0   # validations without improvement since the last one or lr update
    val_losses: list = field(default_factory=list)  # NT-ASGD's trigger: validations before it
    epoch_nll: float = 0.0  # partial sums of the epoch in progress
    epoch_targets: int = 0
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0
    history: list = field(default_factory=list)


def save(path: Path, model, optimizer, progress: Progress,
         lstm_state: list[np.ndarray] | None, average: WeightAverage | None = None) -> None:
    """Write the whole training state to `path` atomically; a failed write keeps the old file."""
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"optimizer_{i}": np.asarray(v.numpy())
                   for i, v in enumerate(optimizer.variables)})
    for i, s in enumerate(lstm_state or []):
        arrays[f"state_{i}"] = s
    if average is not None and average.active:
        arrays.update({f"average_{i}": a for i, a in enumerate(average.values())})
        arrays["average_steps"] = np.asarray(average.count, np.int64)
    arrays["progress"] = np.frombuffer(json.dumps(asdict(progress)).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    except OSError as err:
        raise UserError(f"{path}: cannot save the checkpoint ({err.strerror or err}); the "
                        f"previous checkpoint is kept") from None


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint file, or a one-line UserError saying why it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint to resume from") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a checkpoint") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                        f"{first_line(err)})") from None


def read_progress(path: Path, arrays: dict[str, np.ndarray] | None = None) -> Progress:
    """The training position recorded in a checkpoint (reading the file unless `arrays`)."""
    arrays = read_arrays(path) if arrays is None else arrays
    if "progress" not in arrays:
        raise UserError(f"{path}: not a keraslm checkpoint (no training progress in it)")
    try:
        recorded = json.loads(arrays["progress"].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: the checkpoint's progress record is corrupt ({err})") from None
    known = {f.name for f in dataclasses.fields(Progress)}
    if not isinstance(recorded, dict) or not set(recorded) <= known:
        raise UserError(f"{path}: not a keraslm checkpoint (unexpected progress record)")
    return Progress(**recorded)


def load(path: Path, model, optimizer, average: WeightAverage | None = None
         ) -> tuple[Progress, list[np.ndarray] | None]:
    """Restore weights and optimizer (and NT-ASGD's average, if saved) from `path`; return the
    progress and the saved LSTM state.

    Everything is checked before anything is assigned, so a mismatched file changes nothing.
    """
    arrays = read_arrays(path)
    progress = read_progress(path, arrays)
    weights = _numbered(arrays, "weight_")
    expected = model.get_weights()
    if [w.shape for w in weights] != [w.shape for w in expected]:
        raise UserError(f"{path}: the checkpoint's weights do not match the model "
                        f"({len(weights)} arrays for {len(expected)}, or other shapes): it "
                        f"belongs to another model")
    slots = _numbered(arrays, "optimizer_")
    if [np.shape(s) for s in slots] != [tuple(v.shape) for v in optimizer.variables]:
        raise UserError(f"{path}: the checkpoint's optimizer state does not match this "
                        f"optimizer ({len(slots)} variables for {len(optimizer.variables)})")
    averaged = _numbered(arrays, "average_")
    if averaged and (average is None or [a.shape for a in averaged] != [
            tuple(w.shape) for w in model.trainable_variables]):
        raise UserError(f"{path}: the checkpoint's weight average does not match this run "
                        f"(it averages other weights, or the run does not use --ntasgd)")
    model.set_weights(weights)
    for variable, value in zip(optimizer.variables, slots):
        variable.assign(value)
    if averaged:
        average.restore(averaged, int(arrays["average_steps"]))
    return progress, _numbered(arrays, "state_") or None


def _numbered(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """arrays[prefix0], arrays[prefix1], ... up to the first missing number."""
    found = []
    while f"{prefix}{len(found)}" in arrays:
        found.append(arrays[f"{prefix}{len(found)}"])
    return found
