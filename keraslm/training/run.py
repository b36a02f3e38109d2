"""Set up a training run and run it: `train(config)`.

Set-up resolves, in order, everything a user can get wrong (corpus files, tokenization,
vocabulary, model sizes, batch shapes, disk space) and only then creates the run directory, so a
mistake costs one line and leaves nothing behind. Running is the epoch loop (`loop.py`) under the
strategy (`devices.py`) with Ctrl-C and SIGTERM turned into stop requests (`signals.py`).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from keraslm import __version__
from keraslm.batching import BPTTBatches
from keraslm.config import LMConfig, OptimConfig, TrainConfig
from keraslm.corpora import sha1_of
from keraslm.data import EncodedSplit, build_vocab, choose_pipeline, encode_file, resolve_paths
from keraslm.errors import UserError
from keraslm.precision import check_supported as check_precision
from keraslm.rundir import RunDir, new_run_name, resolve_run
from keraslm.text import TextPipeline, use_data_root
from keraslm.training.devices import is_chief, is_multiworker, make_strategy
from keraslm.training.loop import EpochLoop
from keraslm.training.signals import StopRequest
from keraslm.vocab import Vocab

PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                 tf.errors.AbortedError, tf.errors.CancelledError)


@dataclass
class Setup:
    """Everything a training run needs, resolved and checked."""

    config: TrainConfig
    model_config: LMConfig
    run: RunDir
    resuming: bool
    is_chief: bool
    scratch: Path | None  # a non-chief worker's private folder, removed at the end
    pipeline: TextPipeline
    vocab: Vocab
    splits: dict[str, EncodedSplit]
    batches: dict[str, BPTTBatches]


def train(config: TrainConfig, command: list[str] | None = None) -> RunDir:
    """Train as `config` says and return the run directory.

    `config.run.resume` names a run to continue (see `keraslm.config.resume_config` for how its
    saved settings combine with new ones). `command` is recorded in config.json (by default, the
    command line equivalent to `config`). A SIGINT or
    SIGTERM stops at the next consistent point and raises `signals.Stopped` after saving.
    """
    strategy = make_strategy(config.run.strategy, config.run.cpu_replicas)
    setup = prepare(config, is_chief(strategy), command)
    try:
        with StopRequest() as stop:
            EpochLoop(setup, strategy, stop).run()
    except PEER_FAILURES as err:
        if not is_multiworker(strategy):
            raise
        raise UserError(_peer_failure(err, strategy, setup)) from None
    finally:
        if setup.scratch is not None:
            shutil.rmtree(setup.scratch, ignore_errors=True)
    return setup.run


def prepare(config: TrainConfig, is_chief: bool = True,
            command: list[str] | None = None) -> Setup:
    """Resolve data, vocabulary, model and the run directory, failing early on any mistake."""
    data, options, optim = config.data, config.run, config.optim
    check_precision(optim.precision)
    resumed = resolve_run(options.resume, options.runs_dir) if options.resume else None
    corpus = data.corpus or (None if data.train else "wikitext-2")
    paths = resolve_paths(corpus, {"train": data.train, "valid": data.valid, "test": data.test},
                          data.data_root)
    if data.data_root:
        use_data_root(data.data_root)
    if resumed is not None:
        model_config = resumed.model_config()
        vocab = resumed.read_vocab(model_config.vocab_size)
        pipeline = TextPipeline.from_dict(resumed.read_config()["pipeline"])
    elif options.finetune_from:
        source = resolve_run(options.finetune_from, options.runs_dir)
        model_config = source.model_config()
        vocab = source.read_vocab(model_config.vocab_size)
        if not source.best_weights_path.is_file():
            raise UserError(f"{source.path}: no {source.best_weights_path.name} to fine-tune "
                            f"from (the run has not finished an epoch)")
        pipeline = choose_pipeline(corpus, data.format, data.moses_tutorial,
                                   inherited=TextPipeline.from_dict(
                                       source.read_config()["pipeline"]))
    else:
        pipeline = choose_pipeline(corpus, data.format, data.moses_tutorial)
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
    setup = Setup(config, model_config, run, resumed is not None, is_chief, scratch, pipeline,
                  vocab, splits, batches)
    if resumed is None and is_chief:
        run.write_config(run_record(setup, command))
        vocab.save(run.vocab_path)
    return setup


def run_record(setup: Setup, command: list[str] | None) -> dict:
    """What config.json records: enough to understand, resume, export and reproduce the run."""
    return {
        "model": setup.model_config.to_dict(),
        "pipeline": setup.pipeline.to_dict(),
        "train": setup.config.to_dict(),
        "corpora": {name: {"path": str(s.path), "sha1": sha1_of(s.path), "tokens": s.num_tokens,
                           "oov": s.num_oov} for name, s in setup.splits.items()},
        "command": command or [sys.executable, "-m", "keraslm.train",
                               *setup.config.to_argv()],
        "git_commit": git_commit(),
        "versions": package_versions(),
    }


def package_versions() -> dict[str, str]:
    import keras

    return {"keraslm": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def checkpoint_bytes(model_config: LMConfig, optim: OptimConfig) -> tuple[int, int]:
    """Approximate sizes of (a checkpoint, the best weights) for this model and optimizer."""
    slots = 2 if optim.optimizer == "adam" else (1 if optim.momentum else 0)
    weights = 4 * model_config.num_parameters()
    state = 4 * optim.batch_size * model_config.nhid * 2 * model_config.nlayers
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


def _peer_failure(err: Exception, strategy, setup: Setup) -> str:
    """One line for collectives aborted because another worker died or cannot be reached."""
    resolver = strategy.cluster_resolver
    me = (resolver.task_type, str(resolver.task_id))
    peers = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", str(err))) - {me})
    who = ", ".join(f"{job} {task}" for job, task in peers) or "another worker"
    run = "<run>" if setup.scratch is not None else str(setup.run.path)
    return (f"multi-worker training stopped: {who} failed or cannot be reached "
            f"({type(err).__name__}); restart every worker with --resume {run} to continue "
            f"from the last checkpoint")
