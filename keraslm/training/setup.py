"""Set a training run up, once: `prepare` resolves its inputs, `build` its model and trainer.

`prepare` resolves, in order, everything a user can get wrong (corpus files, tokenization,
vocabulary, model sizes, batch shapes, disk space) and only then creates the run directory, so a
mistake costs one line and leaves nothing behind; it builds nothing in TensorFlow. `build`, under
the strategy, makes the model and optimizer, starts a fine-tune from its source run's best
weights or restores a resumed run's checkpoint, and checks that every worker of a multi-worker
run agrees. The epoch loop (`loop.py`) then only runs epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keraslm import __version__
from keraslm.backend import keras, tf
from keraslm.batching import BPTTBatches
from keraslm.config import LMConfig, OptimConfig, TrainConfig
from keraslm.corpora import sha1_of
from keraslm.data import EncodedSplit, build_vocab, corpus_format, encode_file, resolve_paths
from keraslm.errors import UserError
from keraslm.model import build_model
from keraslm.precision import check_supported as check_precision
from keraslm.rundir import RunDir, new_run_name, resolve_run
from keraslm.text import TextPipeline, pipeline_for_format, use_data_root
from keraslm.training import checkpoint
from keraslm.training.averaging import WeightAverage
from keraslm.training.devices import is_multiworker
from keraslm.training.regularisers import Regularisers
from keraslm.training.step import Trainer, make_optimizer
from keraslm.vocab import Vocab


@dataclass(frozen=True)
class Prepared:
    """A run's inputs and its run directory, resolved and checked (see `prepare`)."""

    config: TrainConfig
    model_config: LMConfig
    run: RunDir
    resuming: bool
    is_chief: bool
    scratch: Path | None            # a non-chief worker's private folder, removed at the end
    finetune_source: RunDir | None  # the run whose best weights a fine-tune starts from
    pipeline: TextPipeline
    vocab: Vocab
    splits: dict[str, EncodedSplit]
    batches: dict[str, BPTTBatches]


@dataclass(frozen=True)
class Setup:
    """A run ready for its next step: its inputs, and the model, optimizer and trainer built
    under the strategy, with the checkpoint (if resuming) restored into them."""

    prepared: Prepared
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    trainer: Trainer
    progress: checkpoint.Progress            # where training stands (updated as it goes)
    average: WeightAverage                   # NT-ASGD's average of the weights (off until on)
    saved_state: list[np.ndarray] | None     # the checkpoint's LSTM state, saved mid-epoch


def prepare(config: TrainConfig, is_chief: bool = True,
            command: list[str] | None = None) -> Prepared:
    """Resolve data, vocabulary, model and the run directory, failing early on any mistake."""
    data, options, optim = config.data, config.run, config.optim
    check_precision(optim.precision)
    resumed = resolve_run(options.resume, options.runs_dir) if options.resume else None
    corpus = data.corpus or (None if data.train else "wikitext-2")
    paths = resolve_paths(corpus, {"train": data.train, "valid": data.valid, "test": data.test},
                          data.data_root)
    if data.data_root:
        use_data_root(data.data_root)
    source = None
    if resumed is not None:
        model_config = resumed.model_config()
        vocab = resumed.read_vocab(model_config.vocab_size)
        pipeline = TextPipeline.from_dict(resumed.read_config()["pipeline"])
    elif options.finetune_from:
        source = resolve_run(options.finetune_from, options.runs_dir)
        model_config = dataclasses.replace(source.model_config(), **config.model.regularisers())
        vocab = source.read_vocab(model_config.vocab_size)
        source.require_best_weights("to fine-tune from")
        pipeline = pipeline_for_format(
            corpus_format(corpus, data.format), data.moses_tutorial,
            inherited=TextPipeline.from_dict(source.read_config()["pipeline"]))
    else:
        pipeline = pipeline_for_format(corpus_format(corpus, data.format), data.moses_tutorial)
        vocab = build_vocab(paths["train"], pipeline, data.min_freq, data.max_vocab)
        model_config = config.model.resolve(len(vocab))
    splits = {name: encode_file(name, path, pipeline, vocab) for name, path in paths.items()}
    batches = {
        "train": _batches(splits["train"], optim.batch_size, optim.bptt, optim.last_batch),
        "valid": _batches(splits["valid"], optim.eval_batch_size, optim.bptt, "keep"),
        "test": _batches(splits["test"], optim.test_batch_size, optim.bptt, "keep"),
    }

    # Only now, with every input checked, does the run directory appear. The other workers of a
    # multi-worker run read the chief's (on a shared filesystem) but never write it.
    scratch = None
    if resumed is not None:
        run = resumed
        if is_chief:
            _check_free_space(run.path, model_config, optim, fresh=False)
    elif is_chief:
        path = Path(options.runs_dir) / (options.name or new_run_name())
        _check_free_space(path, model_config, optim, fresh=True)
        run = RunDir(path).create()
    else:
        scratch = Path(tempfile.mkdtemp(prefix="keraslm-worker-"))
        run = RunDir(scratch)
    prepared = Prepared(config, model_config, run, resumed is not None, is_chief, scratch, source,
                        pipeline, vocab, splits, batches)
    if resumed is None and is_chief:
        run.write_config(run_record(prepared, command))
        vocab.save(run.vocab_path)
    return prepared


def build(prepared: Prepared, strategy: tf.distribute.Strategy) -> Setup:
    """The model, optimizer and trainer of `prepared` under `strategy`, started from the
    fine-tune source's best weights or the resumed run's checkpoint."""
    optim, options = prepared.config.optim, prepared.config.run
    keras.utils.set_random_seed(optim.seed)
    with strategy.scope():
        model = build_model(prepared.model_config, seed=optim.seed,
                            fused=not options.jit,  # XLA has no BlockLSTM
                            precision=optim.precision)
        optimizer = make_optimizer(optim.optimizer, optim.lr, optim.momentum, optim.weight_decay)
    if prepared.finetune_source is not None:
        model.load_weights(prepared.finetune_source.best_weights_path)
    trainer = Trainer(model, optimizer, strategy, clip=optim.clip,
                      two_biases=prepared.model_config.two_biases, jit_compile=options.jit,
                      regularisers=Regularisers.of(prepared.model_config, optim))
    average = WeightAverage(model)
    saved_state = None
    if prepared.resuming:
        progress, saved_state = checkpoint.load(checkpoint_path(prepared.run), model, optimizer,
                                                average)
        if prepared.is_chief:
            remove_temporaries(prepared.run)
    else:
        progress = checkpoint.Progress()
        if optim.ntasgd and prepared.finetune_source is not None:
            average.start()  # the AWD-LSTM's fine-tuning: averaged from the first step
    if is_multiworker(strategy):
        mine = fingerprint(prepared, progress)
        if not np.array_equal(trainer.agree(mine), mine):
            raise UserError(
                "this worker's corpus, vocabulary, settings or checkpoint differ from the "
                "chief's: every worker must run the same command on the same files")
    return Setup(prepared, model, optimizer, trainer, progress, average, saved_state)


def checkpoint_path(run: RunDir) -> Path:
    """The run's resumable checkpoint file."""
    return run.checkpoint_dir / checkpoint.CHECKPOINT_FILE


def run_record(prepared: Prepared, command: list[str] | None) -> dict:
    """What config.json records: enough to understand, resume, export and reproduce the run."""
    return {
        "model": prepared.model_config.to_dict(),
        "pipeline": prepared.pipeline.to_dict(),
        "train": prepared.config.to_dict(),
        "corpora": {name: {"path": str(s.path), "sha1": sha1_of(s.path), "tokens": s.num_tokens,
                           "oov": s.num_oov} for name, s in prepared.splits.items()},
        "command": command or [sys.executable, "-m", "keraslm.train",
                               *prepared.config.to_argv()],
        "git_commit": git_commit(),
        "versions": package_versions(),
    }


def package_versions() -> dict[str, str]:
    return {"keraslm": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def fingerprint(prepared: Prepared, progress: checkpoint.Progress) -> np.ndarray:
    """What must be identical on every worker, hashed: data, vocabulary, settings, position."""
    digest = hashlib.sha1()
    settings = {"optim": dataclasses.asdict(prepared.config.optim),
                "checkpoint_every": prepared.config.run.checkpoint_every}
    digest.update(json.dumps([settings, prepared.model_config.to_dict(), progress.epoch,
                              progress.batch, len(prepared.vocab)], sort_keys=True).encode())
    for name in ("train", "valid", "test"):
        digest.update(np.ascontiguousarray(prepared.splits[name].ids).tobytes())
    return np.array([int(digest.hexdigest()[:12], 16)], np.float64)  # exact in a float64


def remove_temporaries(run: RunDir) -> None:
    """Temporary files a killed process left beside the checkpoint and the best weights."""
    for folder, final in ((run.checkpoint_dir, checkpoint.CHECKPOINT_FILE),
                          (run.path, run.best_weights_path.name)):
        stem = final.split(".")[0]
        for leftover in folder.glob(f".{stem}.*"):
            leftover.unlink(missing_ok=True)


def checkpoint_bytes(model_config: LMConfig, optim: OptimConfig) -> tuple[int, int]:
    """Approximate sizes of (a checkpoint, the best weights) for this model and optimizer."""
    slots = 2 if optim.optimizer == "adam" else (1 if optim.momentum else 0)
    slots += 1 if optim.ntasgd else 0  # the weights' average
    weights = 4 * model_config.num_parameters()
    state = 4 * optim.batch_size * sum(model_config.state_sizes())
    return weights * (1 + slots) + state, weights


def _check_free_space(path: Path, model_config: LMConfig, optim: OptimConfig, *,
                      fresh: bool) -> None:
    """Fail before training, not an hour into it, when the disk cannot take the checkpoints.

    Every file is written beside its previous version before the rename: a fresh run needs room
    for two copies of the checkpoint and of the best weights, a resumed one for one more of each.
    """
    ckpt, weights = checkpoint_bytes(model_config, optim)
    need = (ckpt + weights) * (2 if fresh else 1)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # not a folder: RunDir.create reports it
    if free < need:
        raise UserError(f"not enough free disk space for {path}: checkpoints and best weights "
                        f"need about {_mb(need)}, only {_mb(free)} free")


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def _batches(split: EncodedSplit, batch_size: int, bptt: int, last_batch: str) -> BPTTBatches:
    try:
        return BPTTBatches(split.ids, batch_size, bptt, last_batch)
    except UserError as err:
        raise UserError(f"{split.path} ({split.name} split): {err}") from None
