"""A training run end to end: set up strategy, data, model and run directory, then the epoch loop.

The loop reads top to bottom: reset state, train with carried state, validate, keep the best
weights (and report test perplexity) or decay the learning rate, record the epoch.

A multi-worker run executes this same loop on every worker in lock step: each collective (the
gradient all-reduce, gathering the LSTM state for a checkpoint, agreeing on validation figures)
is reached by every worker at the same point. Only the chief writes the run directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keraslm import __version__, checkpoint
from keraslm.batching import BPTTBatches
from keraslm.corpora import CORPORA
from keraslm.data import EncodedSplit, build_vocab, encode_file, make_pipeline, resolve_paths
from keraslm.errors import UserError
from keraslm.rundir import RunDir, atomic_path, new_run_name, resolve_run
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

# What `--resume` may change when given again; everything else comes from the interrupted run's
# config. The global batch is what matters, so a run may resume on other devices or workers.
RESUME_OVERRIDES = ("epochs", "quiet", "log_interval", "checkpoint_every", "strategy",
                    "cpu_replicas")
# This process's own debug output: never inherited from the run.
PER_PROCESS = ("log_losses",)
# What every worker of a multi-worker run must share, or their collectives would not line up.
SHARED_ARGS = ("epochs", "batch_size", "bptt", "lr", "clip", "lr_decay", "optimizer", "momentum",
               "weight_decay", "last_batch", "eval_batch_size", "test_batch_size", "seed",
               "max_batches", "checkpoint_every")


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
        _train(setup, strategy, argv, resumed is not None)
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
                         nlayers=args.nlayers, dropout=args.dropout, tied=args.tied)


def _train(setup: Setup, strategy, argv: list[str], resuming: bool) -> None:
    import tensorflow as tf

    from keraslm.devices import is_multiworker
    from keraslm.model import build_model
    from keraslm.trainer import Throughput, Trainer, TrainingDiverged, make_optimizer, noise_keys
    from keraslm.trainer import perplexity as ppl

    args, run = setup.args, setup.run
    config = setup.config
    train, valid, test = (setup.batches[k] for k in ("train", "valid", "test"))
    tf.keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        model = build_model(config, seed=args.seed)
        optimizer = make_optimizer(args.optimizer, args.lr, args.momentum, args.weight_decay)
    if args.finetune_from and not resuming:
        source = resolve_run(args.finetune_from, args.runs_dir)
        model.load_weights(source.best_weights_path)
    trainer = Trainer(model, optimizer, strategy, clip=args.clip, jit_compile=args.jit)

    ckpt_path = run.checkpoint_dir / checkpoint.CHECKPOINT_FILE
    saved_state = None
    if resuming:
        progress, saved_state = checkpoint.load(ckpt_path, model, optimizer)
        if setup.is_chief:
            _remove_temporaries(run)
    else:
        progress = checkpoint.Progress()
        if setup.is_chief:
            run.write_config(_run_config(setup, config, argv))
            setup.vocab.save(run.vocab_path)
    if is_multiworker(strategy):
        mine = _fingerprint(setup, progress)
        if not np.array_equal(trainer.agree(mine), mine):
            raise UserError("this worker's corpus, vocabulary, settings or checkpoint differ from "
                            "the chief's: every worker must run the same command on the same files")
    writer = tf.summary.create_file_writer(str(run.logs_dir)) if setup.is_chief else None
    n_batches = len(train) if args.max_batches is None else min(len(train), args.max_batches)
    trained_tokens, trained_seconds = 0, 0.0

    def last_good() -> str:
        if not ckpt_path.is_file():
            return "no checkpoint was saved before"
        with np.load(ckpt_path) as saved:
            at = json.loads(saved["progress"].tobytes())
        return (f"the last good checkpoint (epoch {at['epoch'] + 1}, batch {at['batch']}) "
                f"is in {run.checkpoint_dir}")

    def require_finite_weights(where: str) -> None:
        """All workers check (their weights are identical), so all stop together."""
        if not all(np.isfinite(w).all() for w in model.get_weights()):
            raise TrainingDiverged(f"the weights are not finite at {where}; they were not "
                                   f"saved and {last_good()}")

    def save_checkpoint(state, where: str) -> None:
        lstm = trainer.state_to_numpy(state) if state is not None else None  # every worker
        require_finite_weights(where)
        if setup.is_chief:
            checkpoint.save(ckpt_path, model, optimizer, progress, lstm)

    _say(f"run {run.path} | {config.num_parameters():,} parameters | {strategy.num_replicas_in_sync}"
         f" replica(s) | {n_batches} batches/epoch | vocab {len(setup.vocab):,}")
    while progress.epoch < args.epochs:
        epoch = progress.epoch
        if progress.batch > 0 and saved_state is not None:
            state = trainer.state_from_numpy(saved_state)
        else:
            state = trainer.zero_state(args.batch_size)
        saved_state = None
        window = Throughput()
        window_nll, window_targets = 0.0, 0
        bar = _progress_bar(n_batches, progress.batch, epoch, args.quiet)
        epoch_clock = time.perf_counter() - progress.epoch_seconds
        try:
            for i in range(progress.batch, n_batches):
                inputs, targets = train[i]
                keys = noise_keys(args.seed, epoch, i, args.batch_size)
                result, state = trainer.train_step(inputs, targets, keys, state)
                if not math.isfinite(result.nll_sum):
                    raise TrainingDiverged(f"loss became {result.nll_sum} at epoch {epoch + 1}, "
                                           f"batch {i + 1}; {last_good()}")
                if args.log_losses:
                    _append_line(args.log_losses, {
                        "epoch": epoch + 1, "batch": i + 1, "lr": trainer.learning_rate,
                        "loss": result.nll_sum / max(result.num_targets, 1),
                        "grad_norm": result.grad_norm})
                progress.batch = i + 1
                progress.epoch_nll += result.nll_sum
                progress.epoch_targets += result.num_targets
                progress.epoch_tokens += result.num_targets
                window_nll += result.nll_sum
                window_targets += result.num_targets
                window.add(result.num_targets, inputs.shape[0])
                if bar is not None:
                    bar.update(1)
                if args.log_interval and progress.batch % args.log_interval == 0:
                    loss = window_nll / window_targets
                    _say(f"epoch {epoch + 1} | batch {progress.batch}/{n_batches} | "
                         f"lr {trainer.learning_rate:.4g} | loss {loss:.2f} | ppl {math.exp(loss):.2f}"
                         f" | {window.tokens_per_second():,.0f} tokens/s | "
                         f"{window.samples_per_second():,.1f} samples/s", bar)
                    window.reset()
                    window_nll, window_targets = 0.0, 0
                if args.checkpoint_every and progress.batch % args.checkpoint_every == 0:
                    progress.epoch_seconds = time.perf_counter() - epoch_clock
                    save_checkpoint(state, f"epoch {epoch + 1}, batch {progress.batch}")
        except KeyboardInterrupt:
            if is_multiworker(strategy):
                # A save needs every worker (the state is gathered); the others are not stopping.
                raise KeyboardInterrupt("no checkpoint is saved on an interrupt in a multi-worker "
                                        "run; --resume continues from the last periodic one") from None
            progress.epoch_seconds = time.perf_counter() - epoch_clock
            save_checkpoint(state, f"epoch {epoch + 1}, batch {progress.batch}")
            raise
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - epoch_clock
        trained_tokens += progress.epoch_tokens
        trained_seconds += seconds
        train_ppl = ppl(progress.epoch_nll, progress.epoch_targets)
        val_nll, val_count = trainer.agree(trainer.evaluate(valid))  # the chief's, everywhere
        val_count = int(val_count)
        val_loss = val_nll / val_count
        record = {"epoch": epoch + 1, "lr": trainer.learning_rate, "train_ppl": train_ppl,
                  "val_ppl": ppl(val_nll, val_count), "val_tokens": val_count,
                  "tokens_per_s": progress.epoch_tokens / seconds, "seconds": seconds,
                  "batch_size": args.batch_size, "bptt": args.bptt,
                  "eval_batch_size": args.eval_batch_size, "test_batch_size": args.test_batch_size}
        if val_loss < progress.best_val_loss:
            progress.best_val_loss = val_loss
            require_finite_weights(f"the end of epoch {epoch + 1}")
            if setup.is_chief:
                with atomic_path(run.best_weights_path) as tmp:
                    model.save_weights(tmp)
            test_nll, test_count = trainer.agree(trainer.evaluate(test))
            test_count = int(test_count)
            record.update(test_ppl=ppl(test_nll, test_count), test_tokens=test_count, best=True)
        else:
            trainer.learning_rate = trainer.learning_rate * args.lr_decay
            record.update(best=False)
        _say(f"end of epoch {epoch + 1} | {seconds:.0f}s | train ppl {train_ppl:.2f} | valid ppl "
             f"{record['val_ppl']:.2f}" + (f" | test ppl {record['test_ppl']:.2f} (new best)"
                                           if record["best"] else
                                           f" | lr -> {trainer.learning_rate:.4g}"))
        if setup.is_chief:
            run.append_metrics(record)
            with writer.as_default(step=epoch + 1):
                for key in ("train_ppl", "val_ppl", "test_ppl", "lr", "tokens_per_s"):
                    if key in record:
                        tf.summary.scalar(key, record[key])
            writer.flush()
        progress.history.append(record)
        progress.epoch, progress.batch = epoch + 1, 0
        progress.epoch_nll, progress.epoch_targets = 0.0, 0
        progress.epoch_tokens, progress.epoch_seconds = 0, 0.0
        save_checkpoint(None, f"the end of epoch {epoch + 1}")
    if trained_tokens:
        _say(f"done | {trained_tokens:,} training tokens at {trained_tokens / trained_seconds:,.0f}"
             f" tokens/s (training time only) | best valid ppl "
             f"{math.exp(progress.best_val_loss):.2f} | {run.path}")


def _fingerprint(setup: Setup, progress: checkpoint.Progress) -> np.ndarray:
    """What must be identical on every worker, hashed: data, vocabulary, settings, position."""
    digest = hashlib.sha1()
    settings = {k: getattr(setup.args, k) for k in SHARED_ARGS}
    digest.update(json.dumps([settings, setup.config.to_dict(), progress.epoch, progress.batch,
                              len(setup.vocab)], sort_keys=True).encode())
    for name in ("train", "valid", "test"):
        digest.update(np.ascontiguousarray(setup.splits[name].ids).tobytes())
    return np.array([int(digest.hexdigest()[:12], 16)], np.float64)  # exact in a float64


def _append_line(path: str, record: dict) -> None:
    """One JSON line, flushed at once (a debug log that must survive a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _remove_temporaries(run: RunDir) -> None:
    """Temporary files a killed process left beside the checkpoint and the best weights."""
    for folder, final in ((run.checkpoint_dir, checkpoint.CHECKPOINT_FILE),
                          (run.path, run.best_weights_path.name)):
        stem = final.split(".")[0]
        for leftover in folder.glob(f".{stem}.*"):
            leftover.unlink(missing_ok=True)


def _batches(split: EncodedSplit, batch_size: int, bptt: int, last_batch: str) -> BPTTBatches:
    try:
        return BPTTBatches(split.ids, batch_size, bptt, last_batch)
    except UserError as err:
        raise UserError(f"{split.path} ({split.name} split): {err}") from None


def _run_config(setup: Setup, config, argv: list[str]) -> dict:
    from keraslm.corpora import sha1_of

    args = setup.args
    return {
        "model": config.to_dict(),
        "pipeline": setup.pipeline.to_dict(),
        "args": vars(args),
        "corpora": {name: {"path": str(s.path), "sha1": sha1_of(s.path), "tokens": s.num_tokens,
                           "oov": s.num_oov} for name, s in setup.splits.items()},
        "command": [sys.executable, "-m", "keraslm.train", *argv],
        "git_commit": git_commit(),
        "versions": package_versions(),
    }


def _progress_bar(total: int, initial: int, epoch: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", unit="batch", leave=False)


def _say(message: str, bar=None) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)

