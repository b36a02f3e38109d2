"""A training run end to end: set up strategy, data, model and run directory, then the epoch loop.

The loop reads top to bottom: reset state, train with carried state, validate, keep the best
weights (and report test perplexity) or decay the learning rate, record the epoch.
"""

from __future__ import annotations

import argparse
import math
import platform
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


# What `--resume` may change; everything else comes from the interrupted run's config.
RESUME_OVERRIDES = ("epochs", "quiet", "log_interval", "checkpoint_every")


@dataclass
class Setup:
    """Everything a training run needs, resolved from the command line."""

    args: argparse.Namespace
    run: RunDir
    is_chief: bool
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
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_training(args: argparse.Namespace, argv: list[str]) -> RunDir:
    """Train as the command line says; returns the run directory."""
    from keraslm.devices import make_strategy

    resumed = None
    if args.resume:
        resumed = resolve_run(args.resume, args.runs_dir)
        saved = resumed.read_config()["args"]
        from keraslm.train import build_parser

        defaults = vars(build_parser().parse_args([]))
        overrides = {k: v for k, v in vars(args).items()  # flags given again on the command line
                     if k in RESUME_OVERRIDES and v != defaults[k]}
        args = argparse.Namespace(**{**saved, **overrides, "resume": args.resume})
    strategy = make_strategy(args.strategy, args.cpu_replicas)
    is_chief = _is_chief(strategy)
    setup = prepare(args, resumed, is_chief)
    try:
        _train(setup, strategy, argv, resumed is not None)
    finally:
        if not is_chief:
            shutil.rmtree(setup.run.path, ignore_errors=True)
    return setup.run


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0


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

    # Only now, with every input checked, does the run directory appear.
    if resumed is not None:
        run = resumed
    elif is_chief:
        run = RunDir(Path(args.runs_dir) / (args.name or new_run_name())).create()
    else:
        run = RunDir(tempfile.mkdtemp(prefix="keraslm-worker-"))
    return Setup(args, run, is_chief, pipeline, vocab, splits, config, batches)


def _model_config(args, vocab_size: int):
    from keraslm.model import LMConfig, preset_config

    if args.finetune_from:
        source = resolve_run(args.finetune_from, args.runs_dir)
        return LMConfig.from_dict(source.read_config()["model"])
    return preset_config(args.preset, vocab_size, emsize=args.emsize, nhid=args.nhid,
                         nlayers=args.nlayers, dropout=args.dropout, tied=args.tied)


def _train(setup: Setup, strategy, argv: list[str], resuming: bool) -> None:
    import tensorflow as tf

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
    else:
        progress = checkpoint.Progress()
        if setup.is_chief:
            run.write_config(_run_config(setup, config, argv))
            setup.vocab.save(run.vocab_path)
    writer = tf.summary.create_file_writer(str(run.logs_dir)) if setup.is_chief else None
    n_batches = len(train) if args.max_batches is None else min(len(train), args.max_batches)
    trained_tokens, trained_seconds = 0, 0.0

    def save_checkpoint(state) -> None:
        if setup.is_chief:
            lstm = trainer.state_to_numpy(state) if state is not None else None
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
                    raise TrainingDiverged(
                        f"loss became {result.nll_sum} at epoch {epoch + 1}, batch {i + 1}; "
                        f"the last good checkpoint is in {run.checkpoint_dir}")
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
                    save_checkpoint(state)
        except KeyboardInterrupt:
            progress.epoch_seconds = time.perf_counter() - epoch_clock
            save_checkpoint(state)
            raise
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - epoch_clock
        trained_tokens += progress.epoch_tokens
        trained_seconds += seconds
        train_ppl = ppl(progress.epoch_nll, progress.epoch_targets)
        val_nll, val_count = trainer.evaluate(valid)
        val_loss = val_nll / val_count
        record = {"epoch": epoch + 1, "lr": trainer.learning_rate, "train_ppl": train_ppl,
                  "val_ppl": ppl(val_nll, val_count), "val_tokens": val_count,
                  "tokens_per_s": progress.epoch_tokens / seconds, "seconds": seconds,
                  "batch_size": args.batch_size, "bptt": args.bptt,
                  "eval_batch_size": args.eval_batch_size, "test_batch_size": args.test_batch_size}
        if val_loss < progress.best_val_loss:
            progress.best_val_loss = val_loss
            if setup.is_chief:
                with atomic_path(run.best_weights_path) as tmp:
                    model.save_weights(tmp)
            test_nll, test_count = trainer.evaluate(test)
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
        save_checkpoint(None)
    if trained_tokens:
        _say(f"done | {trained_tokens:,} training tokens at {trained_tokens / trained_seconds:,.0f}"
             f" tokens/s (training time only) | best valid ppl "
             f"{math.exp(progress.best_val_loss):.2f} | {run.path}")


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

