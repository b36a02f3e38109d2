"""A training run end to end: set up strategy, data, model and run directory, then the epoch loop.

The loop reads top to bottom: reset state, train with carried state, validate, keep the best
weights (and report test perplexity) or decay the learning rate, record the epoch.

A multi-worker run executes this same loop on every worker in lock step: each collective (the
gradient all-reduce, gathering the LSTM state for a checkpoint, agreeing on validation figures)
is reached by every worker at the same point. Only the chief writes the run directory.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keraslm import __version__
from keraslm.batching import BPTTBatches
from keraslm.corpora import CORPORA
from keraslm.data import EncodedSplit, build_vocab, encode_file, make_pipeline, resolve_paths
from keraslm.errors import UserError
from keraslm.rundir import RunDir, new_run_name, resolve_run
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

# What `--resume` may change when given again; everything else comes from the interrupted run's
# config. The global batch is what matters, so a run may resume on other devices or workers.
RESUME_OVERRIDES = ("epochs", "quiet", "log_interval", "checkpoint_every", "strategy",
                    "cpu_replicas")
# This process's own debug output: never inherited from the run.
PER_PROCESS = ("log_losses",)
@dataclass
class Setup:
    """Everything a training run needs, resolved from the command line."""

    args: argparse.Namespace
    run: RunDir
    is_chief: bool
    scratch: Path | None  # a non-chief worker's private folder, removed at the end
    pipeline: TextPipeline
    vocab: Vocab
    splits: dict[str, EncodedSplit]
    config: object  # LMConfig
    batches: dict[str, BPTTBatches]


def package_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"keraslm": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_training(args: argparse.Namespace, argv: list[str]) -> RunDir:
    """Train as the command line says; returns the run directory."""
    import tensorflow as tf

    from keraslm.devices import is_chief, is_multiworker, make_strategy
    from keraslm.loop import EpochLoop
    from keraslm.train import build_parser

    resumed = None
    if args.resume:
        resumed = resolve_run(args.resume, args.runs_dir)
        saved = resumed.read_config()["args"]
        given = _flags_given(argv)
        overrides = {k: v for k, v in vars(args).items() if k in RESUME_OVERRIDES and k in given}
        own = {k: getattr(args, k) for k in PER_PROCESS}
        defaults = vars(build_parser().parse_args([]))
        args = argparse.Namespace(**{**defaults, **saved, **overrides, **own,
                                     "resume": args.resume})
    strategy = make_strategy(args.strategy, args.cpu_replicas)
    setup = prepare(args, resumed, is_chief(strategy))
    try:
        EpochLoop(setup, strategy, argv, resuming=resumed is not None).run()
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError) as err:
        if not is_multiworker(strategy):
            raise
        raise UserError(_peer_failure(err, strategy, setup)) from None
    finally:
        if setup.scratch is not None:
            shutil.rmtree(setup.scratch, ignore_errors=True)
    return setup.run


def _flags_given(argv: list[str]) -> set[str]:
    """The options present on the command line, whatever their values."""
    from keraslm.train import build_parser

    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


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


def prepare(args: argparse.Namespace, resumed: RunDir | None, is_chief: bool) -> Setup:
    """Resolve data, vocabulary and the run directory (failing early on any user mistake)."""
    corpus = args.corpus or (None if args.train else "wikitext-2")
    pipeline = make_pipeline(corpus, args.format, args.moses_tutorial)
    # A named corpus or an explicit format decides the tokenization; your own files with neither
    # are read the way the run you resume or fine-tune from read its text.
    inherit_pipeline = not (args.format or args.moses_tutorial or corpus in CORPORA)
    overrides = {"train": args.train, "valid": args.valid, "test": args.test}
    paths = resolve_paths(corpus, overrides, args.data_root)

    if resumed is not None:
        vocab = Vocab.load(resumed.vocab_path)
        pipeline = TextPipeline.from_dict(resumed.read_config()["pipeline"])
    elif args.finetune_from:
        source = resolve_run(args.finetune_from, args.runs_dir)
        vocab = Vocab.load(source.vocab_path)
        if inherit_pipeline:
            pipeline = TextPipeline.from_dict(source.read_config()["pipeline"])
    else:
        vocab = build_vocab(paths["train"], pipeline, args.min_freq, args.max_vocab)
    splits = {name: encode_file(name, path, pipeline, vocab) for name, path in paths.items()}
    config = _model_config(args, len(vocab))
    if config.vocab_size != len(vocab):
        raise UserError(f"vocabulary has {len(vocab)} tokens but the model expects "
                        f"{config.vocab_size}")
    batches = {
        "train": _batches(splits["train"], args.batch_size, args.bptt, args.last_batch),
        "valid": _batches(splits["valid"], args.eval_batch_size, args.bptt, "keep"),
        "test": _batches(splits["test"], args.test_batch_size, args.bptt, "keep"),
    }

    # Only now, with every input checked, does the run directory appear. The other workers of a
    # multi-worker run read the chief's (on a shared filesystem) but never write it.
    scratch = None
    if resumed is not None:
        run = resumed
        if is_chief:
            _check_free_space(run.path, config, args, fresh=False)
    elif is_chief:
        path = Path(args.runs_dir) / (args.name or new_run_name())
        _check_free_space(path, config, args, fresh=True)
        run = RunDir(path).create()
    else:
        scratch = Path(tempfile.mkdtemp(prefix="keraslm-worker-"))
        run = RunDir(scratch)
    return Setup(args, run, is_chief, scratch, pipeline, vocab, splits, config, batches)


def checkpoint_bytes(config, args: argparse.Namespace) -> tuple[int, int]:
    """Approximate sizes of (a checkpoint, the best weights) for this model and optimizer."""
    slots = 2 if args.optimizer == "adam" else (1 if args.momentum else 0)
    weights = 4 * config.num_parameters()
    state = 4 * args.batch_size * config.nhid * 2 * config.nlayers
    return weights * (1 + slots) + state, weights


def _check_free_space(path: Path, config, args: argparse.Namespace, *, fresh: bool) -> None:
    """Fail before training, not an hour into it, when the disk cannot take the checkpoints.

    Every file is written beside its previous version before the rename: a fresh run needs room
    for two copies of the checkpoint and of the best weights, a resumed one for one more of each.
    """
    ckpt, weights = checkpoint_bytes(config, args)
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


def _model_config(args, vocab_size: int):
    from keraslm.model import LMConfig, preset_config

    if args.finetune_from:
        source = resolve_run(args.finetune_from, args.runs_dir)
        return LMConfig.from_dict(source.read_config()["model"])
    return preset_config(args.preset, vocab_size, emsize=args.emsize, nhid=args.nhid,
                         nlayers=args.nlayers, dropout=args.dropout, tied=args.tied,
                         two_biases=args.two_biases)


def _batches(split: EncodedSplit, batch_size: int, bptt: int, last_batch: str) -> BPTTBatches:
    try:
        return BPTTBatches(split.ids, batch_size, bptt, last_batch)
    except UserError as err:
        raise UserError(f"{split.path} ({split.name} split): {err}") from None


def run_config(setup: Setup, argv: list[str]) -> dict:
    """What config.json records: enough to understand and reproduce the run."""
    from keraslm.corpora import sha1_of

    args = setup.args
    return {
        "model": setup.config.to_dict(),
        "pipeline": setup.pipeline.to_dict(),
        "args": vars(args),
        "corpora": {name: {"path": str(s.path), "sha1": sha1_of(s.path), "tokens": s.num_tokens,
                           "oov": s.num_oov} for name, s in setup.splits.items()},
        "command": [sys.executable, "-m", "keraslm.train", *argv],
        "git_commit": git_commit(),
        "versions": package_versions(),
    }
