"""The on-disk contract of a training run (`runs/<name>/`), with atomic writes throughout.

    config.json        model config, hyper-parameters, corpora, text pipeline, command, versions
    vocab.json         the vocabulary
    best.weights.h5    weights of the best validation epoch (what export uses)
    checkpoint/        latest complete training state, for --resume
    metrics.jsonl      one JSON object per epoch
    logs/              TensorBoard event files

This module does not import TensorFlow, not even lazily (export reads and checks a run before it
starts TensorFlow); `keraslm.runs.load_run_model` builds a run's model. Weight files are written
by callers through `atomic_path` (keraslm.files), which hands out a temporary name and renames it
into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from keraslm.config import LMConfig
from keraslm.errors import UserError
from keraslm.files import atomic_path, read_json, write_json_atomic, write_text_atomic
from keraslm.vocab import Vocab

__all__ = ["RunDir", "atomic_path", "new_run_name", "newest", "read_json", "resolve_run",
           "write_json_atomic", "write_text_atomic"]

DEFAULT_RUNS_ROOT = Path("runs")
CONFIG = "config.json"
VOCAB = "vocab.json"
BEST_WEIGHTS = "best.weights.h5"
CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
LOGS = "logs"


class RunDir:
    """A training run's folder and the files in it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / CONFIG)
    vocab_path = property(lambda self: self.path / VOCAB)
    best_weights_path = property(lambda self: self.path / BEST_WEIGHTS)
    checkpoint_dir = property(lambda self: self.path / CHECKPOINT)
    metrics_path = property(lambda self: self.path / METRICS)
    logs_dir = property(lambda self: self.path / LOGS)

    def create(self) -> RunDir:
        """Make the folder, failing early with a clear error if it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as err:
            raise UserError(f"cannot write the run directory {self.path}: {err.strerror}") from None
        return self

    def read_config(self) -> dict:
        return read_json(self.config_path)

    def model_config(self) -> LMConfig:
        """The model the run trains, from its config.json."""
        model = self.read_config().get("model")
        if not isinstance(model, dict):
            raise UserError(f"{self.config_path}: no model config")
        return LMConfig.from_dict(model)

    def read_vocab(self, expected_size: int) -> Vocab:
        """The run's vocabulary, checked against the model's `expected_size`."""
        vocab = Vocab.load(self.vocab_path)
        if len(vocab) != expected_size:
            raise UserError(f"{self.vocab_path}: {len(vocab)} tokens but the run's model has "
                            f"{expected_size}: vocabulary and run do not match")
        return vocab

    def require_best_weights(self, purpose: str = "") -> Path:
        """The best weights' file, or a UserError when the run has not saved them yet.

        `purpose` ends the error's first clause, e.g. "to fine-tune from"."""
        path = self.best_weights_path
        if not path.is_file():
            wanted = f"{path.name} {purpose}" if purpose else path.name
            raise UserError(f"{self.path}: no {wanted} (the run has not finished an epoch)")
        return path

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_path, config)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def append_metrics(self, record: dict) -> None:
        """Add one epoch's record (rewriting the small file atomically)."""
        records = [r for r in self.read_metrics() if r.get("epoch") != record.get("epoch")]
        records.append(record)
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))


def new_run_name(prefix: str = "run") -> str:
    """A sortable, unique-enough run name: `<prefix>-YYYYmmdd-HHMMSS`."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def newest(root: str | os.PathLike, required_file: str) -> Path:
    """The most recently modified folder under `root` that holds `required_file`."""
    root = Path(root)
    candidates = [p for p in root.glob("*") if (p / required_file).is_file()] if root.is_dir() else []
    if not candidates:
        raise UserError(f"no folder with {required_file} found under {root.resolve()}")
    return max(candidates, key=lambda p: (p / required_file).stat().st_mtime)


def resolve_run(spec: str | os.PathLike | None, root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> RunDir:
    """A run given by path or by name under `root`; the newest run with a config when None."""
    if spec is None:
        return RunDir(newest(root, CONFIG))
    for candidate in (Path(spec), Path(root) / str(spec)):
        if (candidate / CONFIG).is_file():
            return RunDir(candidate)
    raise UserError(f"{spec}: not a training run (no {CONFIG} there or under {Path(root).resolve()})")
