"""The epoch loop of a training run.

Each epoch reads top to bottom: reset (or restore) the LSTM state, train with the state carried
from batch to batch, validate, keep the best weights and report test perplexity or decay the
learning rate, record the epoch, checkpoint. The distributed step itself lives in `trainer.py`;
this is plain Python bookkeeping around it.

A multi-worker run executes this same loop on every worker in lock step: each collective (the
gradient all-reduce, gathering the LSTM state for a checkpoint, agreeing on validation figures)
is reached by every worker at the same point. Only the chief writes the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time

import numpy as np
import tensorflow as tf

from keraslm import checkpoint
from keraslm.devices import is_multiworker
from keraslm.errors import UserError
from keraslm.model import build_model
from keraslm.rundir import RunDir, atomic_path, resolve_run
from keraslm.trainer import (
    Throughput,
    Trainer,
    TrainingDiverged,
    make_optimizer,
    noise_keys,
    perplexity,
)

# What every worker of a multi-worker run must share, or their collectives would not line up.
SHARED_ARGS = ("epochs", "batch_size", "bptt", "lr", "clip", "lr_decay", "optimizer", "momentum",
               "weight_decay", "last_batch", "eval_batch_size", "test_batch_size", "seed",
               "max_batches", "checkpoint_every")


class EpochLoop:
    """Trains `setup` (see keraslm.fit.prepare) on `strategy` for the remaining epochs."""

    def __init__(self, setup, strategy: tf.distribute.Strategy, argv: list[str], *,
                 resuming: bool):
        from keraslm.fit import run_config

        self.setup, self.args, self.run_dir = setup, setup.args, setup.run
        self.strategy = strategy
        args = self.args
        tf.keras.utils.set_random_seed(args.seed)
        with strategy.scope():
            self.model = build_model(setup.config, seed=args.seed)
            self.optimizer = make_optimizer(args.optimizer, args.lr, args.momentum,
                                            args.weight_decay)
        if args.finetune_from and not resuming:
            self.model.load_weights(resolve_run(args.finetune_from, args.runs_dir)
                                    .best_weights_path)
        self.trainer = Trainer(self.model, self.optimizer, strategy, clip=args.clip,
                               two_biases=setup.config.two_biases, jit_compile=args.jit)
        self.checkpoint_path = self.run_dir.checkpoint_dir / checkpoint.CHECKPOINT_FILE
        self.saved_state = None
        if resuming:
            self.progress, self.saved_state = checkpoint.load(self.checkpoint_path, self.model,
                                                              self.optimizer)
            if setup.is_chief:
                remove_temporaries(self.run_dir)
        else:
            self.progress = checkpoint.Progress()
            if setup.is_chief:
                self.run_dir.write_config(run_config(setup, argv))
                setup.vocab.save(self.run_dir.vocab_path)
        if is_multiworker(strategy):
            mine = fingerprint(setup, self.progress)
            if not np.array_equal(self.trainer.agree(mine), mine):
                raise UserError(
                    "this worker's corpus, vocabulary, settings or checkpoint differ from the "
                    "chief's: every worker must run the same command on the same files")
        self.writer = (tf.summary.create_file_writer(str(self.run_dir.logs_dir))
                       if setup.is_chief else None)
        train = setup.batches["train"]
        self.num_batches = len(train) if args.max_batches is None else min(len(train),
                                                                          args.max_batches)

    def run(self) -> None:
        """Train until the configured number of epochs is done."""
        setup, progress = self.setup, self.progress
        say(f"run {self.run_dir.path} | {setup.config.num_parameters():,} parameters | "
            f"{self.strategy.num_replicas_in_sync} replica(s) | {self.num_batches} batches/epoch"
            f" | vocab {len(setup.vocab):,}")
        tokens, seconds = 0, 0.0
        while progress.epoch < self.args.epochs:
            epoch_tokens, epoch_seconds = self.train_epoch()
            self.end_epoch(epoch_seconds)
            tokens, seconds = tokens + epoch_tokens, seconds + epoch_seconds
        if tokens:
            say(f"done | {tokens:,} training tokens at {tokens / seconds:,.0f} tokens/s (training "
                f"time only) | best valid ppl {math.exp(progress.best_val_loss):.2f} | "
                f"{self.run_dir.path}")

    def train_epoch(self) -> tuple[int, float]:
        """Train the rest of the current epoch; returns its (target tokens, seconds)."""
        args, progress, trainer = self.args, self.progress, self.trainer
        epoch, train = progress.epoch, self.setup.batches["train"]
        if progress.batch > 0 and self.saved_state is not None:
            state = trainer.state_from_numpy(self.saved_state)
        else:
            state = trainer.zero_state(args.batch_size)
        self.saved_state = None
        window, window_nll = Throughput(), 0.0
        bar = progress_bar(self.num_batches, progress.batch, epoch, args.quiet)
        clock = time.perf_counter() - progress.epoch_seconds
        try:
            for i in range(progress.batch, self.num_batches):
                inputs, targets = train[i]
                keys = noise_keys(args.seed, epoch, i, args.batch_size)
                result, state = trainer.train_step(inputs, targets, keys, state)
                if not math.isfinite(result.nll_sum):
                    raise TrainingDiverged(f"loss became {result.nll_sum} at epoch {epoch + 1}, "
                                           f"batch {i + 1}; {self.last_good()}")
                if args.log_losses:
                    append_line(args.log_losses, {
                        "epoch": epoch + 1, "batch": i + 1, "lr": trainer.learning_rate,
                        "loss": result.nll_sum / max(result.num_targets, 1),
                        "grad_norm": result.grad_norm})
                progress.batch = i + 1
                progress.epoch_nll += result.nll_sum
                progress.epoch_targets += result.num_targets
                progress.epoch_tokens += result.num_targets
                window_nll += result.nll_sum
                window.add(result.num_targets, inputs.shape[0])
                if bar is not None:
                    bar.update(1)
                if args.log_interval and progress.batch % args.log_interval == 0:
                    loss = window_nll / max(window.tokens, 1)
                    say(f"epoch {epoch + 1} | batch {progress.batch}/{self.num_batches} | "
                        f"lr {trainer.learning_rate:.4g} | loss {loss:.2f} | ppl "
                        f"{math.exp(loss):.2f} | {window.tokens_per_second():,.0f} tokens/s | "
                        f"{window.samples_per_second():,.1f} samples/s", bar)
                    window, window_nll = Throughput(), 0.0
                if args.checkpoint_every and progress.batch % args.checkpoint_every == 0:
                    progress.epoch_seconds = time.perf_counter() - clock
                    self.save_checkpoint(state, f"epoch {epoch + 1}, batch {progress.batch}")
        except KeyboardInterrupt:
            if is_multiworker(self.strategy):
                # A save needs every worker (the state is gathered); the others are not stopping.
                raise KeyboardInterrupt("no checkpoint is saved on an interrupt in a multi-worker "
                                        "run; --resume continues from the last periodic one") from None
            progress.epoch_seconds = time.perf_counter() - clock
            self.save_checkpoint(state, f"epoch {epoch + 1}, batch {progress.batch}")
            raise
        finally:
            if bar is not None:
                bar.close()
        return progress.epoch_tokens, time.perf_counter() - clock

    def end_epoch(self, seconds: float) -> dict:
        """Validate; keep the best weights and test them, or decay the learning rate; record."""
        args, progress, trainer = self.args, self.progress, self.trainer
        epoch = progress.epoch
        batches = self.setup.batches
        train_ppl = perplexity(progress.epoch_nll, progress.epoch_targets)
        val_nll, val_count = trainer.agree(trainer.evaluate(batches["valid"]))  # the chief's
        val_count = int(val_count)
        record = {"epoch": epoch + 1, "lr": trainer.learning_rate, "train_ppl": train_ppl,
                  "val_ppl": perplexity(val_nll, val_count), "val_tokens": val_count,
                  "tokens_per_s": progress.epoch_tokens / seconds, "seconds": seconds,
                  "batch_size": args.batch_size, "bptt": args.bptt,
                  "eval_batch_size": args.eval_batch_size, "test_batch_size": args.test_batch_size}
        if val_nll / val_count < progress.best_val_loss:
            progress.best_val_loss = val_nll / val_count
            self.require_finite_weights(f"the end of epoch {epoch + 1}")
            if self.setup.is_chief:
                with atomic_path(self.run_dir.best_weights_path) as tmp:
                    self.model.save_weights(tmp)
            test_nll, test_count = trainer.agree(trainer.evaluate(batches["test"]))
            record.update(test_ppl=perplexity(test_nll, int(test_count)),
                          test_tokens=int(test_count), best=True)
        else:
            trainer.learning_rate = trainer.learning_rate * args.lr_decay
            record.update(best=False)
        say(f"end of epoch {epoch + 1} | {seconds:.0f}s | train ppl {train_ppl:.2f} | valid ppl "
            f"{record['val_ppl']:.2f}" + (f" | test ppl {record['test_ppl']:.2f} (new best)"
                                          if record["best"] else
                                          f" | lr -> {trainer.learning_rate:.4g}"))
        if self.setup.is_chief:
            self.run_dir.append_metrics(record)
            with self.writer.as_default(step=epoch + 1):
                for key in ("train_ppl", "val_ppl", "test_ppl", "lr", "tokens_per_s"):
                    if key in record:
                        tf.summary.scalar(key, record[key])
            self.writer.flush()
        progress.history.append(record)
        progress.epoch, progress.batch = epoch + 1, 0
        progress.epoch_nll, progress.epoch_targets = 0.0, 0
        progress.epoch_tokens, progress.epoch_seconds = 0, 0.0
        self.save_checkpoint(None, f"the end of epoch {epoch + 1}")
        return record

    def save_checkpoint(self, state, where: str) -> None:
        """Every worker gathers the LSTM state; the chief writes it with weights and optimizer."""
        lstm = self.trainer.state_to_numpy(state) if state is not None else None
        self.require_finite_weights(where)
        if self.setup.is_chief:
            checkpoint.save(self.checkpoint_path, self.model, self.optimizer, self.progress, lstm)

    def require_finite_weights(self, where: str) -> None:
        """All workers check (their weights are identical), so all stop together."""
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            raise TrainingDiverged(f"the weights are not finite at {where}; they were not "
                                   f"saved and {self.last_good()}")

    def last_good(self) -> str:
        if not self.checkpoint_path.is_file():
            return "no checkpoint was saved before"
        with np.load(self.checkpoint_path) as saved:
            at = json.loads(saved["progress"].tobytes())
        return (f"the last good checkpoint (epoch {at['epoch'] + 1}, batch {at['batch']}) "
                f"is in {self.run_dir.checkpoint_dir}")


def fingerprint(setup, progress: checkpoint.Progress) -> np.ndarray:
    """What must be identical on every worker, hashed: data, vocabulary, settings, position."""
    digest = hashlib.sha1()
    settings = {k: getattr(setup.args, k) for k in SHARED_ARGS}
    digest.update(json.dumps([settings, setup.config.to_dict(), progress.epoch, progress.batch,
                              len(setup.vocab)], sort_keys=True).encode())
    for name in ("train", "valid", "test"):
        digest.update(np.ascontiguousarray(setup.splits[name].ids).tobytes())
    return np.array([int(digest.hexdigest()[:12], 16)], np.float64)  # exact in a float64


def append_line(path: str, record: dict) -> None:
    """One JSON line, flushed at once (a debug log that must survive a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def remove_temporaries(run: RunDir) -> None:
    """Temporary files a killed process left beside the checkpoint and the best weights."""
    for folder, final in ((run.checkpoint_dir, checkpoint.CHECKPOINT_FILE),
                          (run.path, run.best_weights_path.name)):
        stem = final.split(".")[0]
        for leftover in folder.glob(f".{stem}.*"):
            leftover.unlink(missing_ok=True)


def progress_bar(total: int, initial: int, epoch: int, quiet: bool):
    """A tqdm bar on an interactive terminal, else None."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", unit="batch", leave=False)


def say(message: str, bar=None) -> None:
    """Print a log line without breaking the progress bar."""
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)
