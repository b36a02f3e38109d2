"""The on-disk contract of a training run (`runs/<name>/`), with atomic writes throughout.

    config.json        model config, hyper-parameters, corpora, text pipeline, command, versions
    vocab.json         the vocabulary
    best.weights.h5    weights of the best validation epoch (what export uses)
    checkpoint/        latest complete training state, for --resume
    metrics.jsonl      one JSON object per epoch
    logs/              TensorBoard event files

This module does not import TensorFlow; weight files are written by callers through
`atomic_path`, which hands out a temporary name and renames it into place on success.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from keraslm.errors import UserError

DEFAULT_RUNS_ROOT = Path("runs")
CONFIG = "config.json"
VOCAB = "vocab.json"
BEST_WEIGHTS = "best.weights.h5"
CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
LOGS = "logs"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the final suffix (Keras insists on `.weights.h5`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, turning a missing or corrupt file into a one-line UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


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
