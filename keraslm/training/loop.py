"""The epoch loop of a training run: plain Python bookkeeping around the distributed step.

Each epoch reads top to bottom: reset (or restore) the LSTM state, train with the state carried
from batch to batch, validate, keep the best weights and report test perplexity, let the
learning-rate schedule (`schedule.py`) decide, record the epoch, checkpoint. A stop request
(Ctrl-C, SIGTERM) is honoured only at consistent points: after a step's bookkeeping, or after
the end of an epoch was recorded and checkpointed, so a resumed run is bit-identical to an
uninterrupted one.

A multi-worker run executes this same loop on every worker in lock step: each collective (the
gradient all-reduce, gathering the LSTM state for a checkpoint, agreeing on validation figures)
is reached by every worker at the same point. Only the chief writes the run directory.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

from keraslm.backend import tf
from keraslm.batching import BPTTBatches
from keraslm.errors import UserError
from keraslm.files import atomic_path
from keraslm.scores import perplexity
from keraslm.training import checkpoint
from keraslm.training.averaging import nonmonotonic_trigger
from keraslm.training.devices import is_multiworker
from keraslm.training.regularisers import step_key
from keraslm.training.schedule import LRSchedule
from keraslm.training.setup import Setup, checkpoint_path
from keraslm.training.signals import Stopped, StopRequest
from keraslm.training.step import noise_keys
from keraslm.variable_bptt import VariableBPTTBatches


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite."""


class EpochLoop:
    """Trains a set-up run (see `keraslm.training.setup`) for its remaining epochs."""

    def __init__(self, setup: Setup, stop: StopRequest):
        prepared = setup.prepared
        self.prepared, self.run_dir, self.stop = prepared, prepared.run, stop
        self.optim, self.options = prepared.config.optim, prepared.config.run
        self.is_chief, self.batches = prepared.is_chief, prepared.batches
        self.model, self.optimizer, self.trainer = setup.model, setup.optimizer, setup.trainer
        self.strategy = setup.trainer.strategy
        self.progress, self.average = setup.progress, setup.average
        self.schedule = LRSchedule.of(self.optim)
        self.saved_state = setup.saved_state  # used once, by the epoch that resumes
        self.checkpoint_path = checkpoint_path(self.run_dir)
        self.writer = (tf.summary.create_file_writer(str(self.run_dir.logs_dir))
                       if self.is_chief else None)

    def run(self) -> None:
        """Train until the configured number of epochs is done."""
        prepared, progress = self.prepared, self.progress
        batches = self.num_batches(self.epoch_batches(progress.epoch))
        say(f"run {self.run_dir.path} | {prepared.model_config.num_parameters():,} parameters | "
            f"{self.strategy.num_replicas_in_sync} replica(s) | "
            f"{'about ' if self.optim.variable_bptt else ''}{batches} batches/epoch"
            f" | vocab {len(prepared.vocab):,}")
        tokens, seconds = 0, 0.0
        while progress.epoch < self.optim.epochs:
            epoch_tokens, epoch_seconds = self.train_epoch()
            self.end_epoch(epoch_seconds)
            tokens, seconds = tokens + epoch_tokens, seconds + epoch_seconds
            if progress.epoch < self.optim.epochs:
                self.stop_if_requested(None)  # the end-of-epoch checkpoint is already saved
        if tokens:
            say(f"done | {tokens:,} training tokens at {tokens / seconds:,.0f} tokens/s (training "
                f"time only) | best valid ppl {math.exp(progress.best_val_loss):.2f} | "
                f"{self.run_dir.path}")

    def epoch_batches(self, epoch: int) -> BPTTBatches | VariableBPTTBatches:
        """The training batches of `epoch`: the fixed ones, or those drawn for this epoch
        (variable-length BPTT, a pure function of the seed and the epoch)."""
        train = self.batches["train"]
        if self.optim.variable_bptt:
            return VariableBPTTBatches(train, self.optim.seed, epoch)
        return train

    def num_batches(self, train: BPTTBatches | VariableBPTTBatches) -> int:
        """How many of an epoch's batches are trained (--max-batches)."""
        return min(len(train), self.optim.max_batches or len(train))

    def train_epoch(self) -> tuple[int, float]:
        """Train the rest of the current epoch; returns its (target tokens, seconds)."""
        optim, options, progress, trainer = self.optim, self.options, self.progress, self.trainer
        epoch = progress.epoch
        train = self.epoch_batches(epoch)
        num_batches = self.num_batches(train)
        if progress.batch > 0 and self.saved_state is not None:
            state = trainer.state_from_numpy(self.saved_state)
        else:
            state = trainer.zero_state(optim.batch_size)
        self.saved_state = None
        window, window_nll = Throughput(), 0.0
        bar = progress_bar(num_batches, progress.batch, epoch, options.quiet)
        clock = time.perf_counter() - progress.epoch_seconds
        try:
            for i in range(progress.batch, num_batches):
                inputs, targets = train[i]
                keys = noise_keys(optim.seed, epoch, i, optim.batch_size)
                lr_scale = train.lr_scale(i) if optim.variable_bptt else 1.0
                result, state = trainer.train_step(inputs, targets, keys, state,
                                                   step_key(optim.seed, epoch, i), lr_scale)
                if not math.isfinite(result.nll_sum):
                    raise TrainingDiverged(f"loss became {result.nll_sum} at epoch {epoch + 1}, "
                                           f"batch {i + 1}; {self.last_good()}")
                if self.average.active:
                    self.average.update()
                if options.log_losses:
                    append_line(options.log_losses, {
                        "epoch": epoch + 1, "batch": i + 1,
                        "lr": trainer.learning_rate * lr_scale, "bptt": inputs.shape[1],
                        "loss": result.nll_sum / max(result.num_targets, 1),
                        "grad_norm": result.grad_norm})
                progress.batch = i + 1
                progress.epoch_nll += result.nll_sum
                progress.epoch_targets += result.num_targets
                progress.epoch_tokens += result.num_targets
                progress.epoch_seconds = time.perf_counter() - clock
                window_nll += result.nll_sum
                window.add(result.num_targets, inputs.shape[0])
                if bar is not None:
                    bar.update(1)
                if options.log_interval and progress.batch % options.log_interval == 0:
                    loss = window_nll / max(window.tokens, 1)
                    say(f"epoch {epoch + 1} | batch {progress.batch}/{num_batches} | "
                        f"lr {trainer.learning_rate:.4g} | loss {loss:.2f} | ppl "
                        f"{math.exp(loss):.2f} | {window.tokens_per_second():,.0f} tokens/s | "
                        f"{window.samples_per_second():,.1f} samples/s", bar)
                    window, window_nll = Throughput(), 0.0
                if options.checkpoint_every and progress.batch % options.checkpoint_every == 0:
                    self.save_checkpoint(state, f"epoch {epoch + 1}, batch {progress.batch}")
                self.stop_if_requested(state)
        finally:
            if bar is not None:
                bar.close()
        return progress.epoch_tokens, time.perf_counter() - clock

    def end_epoch(self, seconds: float) -> dict:
        """Validate (the weights' average, once NT-ASGD is on); switch to averaging if its
        trigger fires; keep the best weights and test them; let the schedule set the learning
        rate; record."""
        started = time.perf_counter()
        optim, progress, trainer, average = self.optim, self.progress, self.trainer, self.average
        epoch = progress.epoch
        batches = self.batches
        train_ppl = perplexity(progress.epoch_nll, progress.epoch_targets)
        averaged = average.active
        with average.applied():
            val_nll, val_count = trainer.agree(trainer.evaluate(batches["valid"]))  # the chief's
        val_count = int(val_count)
        val_loss = val_nll / val_count
        record = {"epoch": epoch + 1, "lr": trainer.learning_rate, "train_ppl": train_ppl,
                  "val_ppl": perplexity(val_nll, val_count), "val_tokens": val_count,
                  "tokens_per_s": progress.epoch_tokens / seconds, "seconds": seconds,
                  "batch_size": optim.batch_size, "bptt": optim.bptt,
                  "eval_batch_size": optim.eval_batch_size,
                  "test_batch_size": optim.test_batch_size}
        if optim.ntasgd:
            record["averaged"] = averaged
        if optim.ntasgd and not averaged:
            if nonmonotonic_trigger(progress.val_losses, val_loss, optim.nonmono):
                average.start()
                record["ntasgd_switch"] = True
                say(f"epoch {epoch + 1}: validation did not improve on the best before the "
                    f"last {optim.nonmono}; averaging the weights from now on (NT-ASGD)")
            progress.val_losses.append(val_loss)
        improved = val_loss < progress.best_val_loss
        lr, progress.stale_epochs = self.schedule.after_validation(
            trainer.learning_rate, progress.stale_epochs, improved)
        if improved:
            progress.best_val_loss = val_loss
            with average.applied():
                self.require_finite_weights(f"the end of epoch {epoch + 1}")
                if self.is_chief:
                    with atomic_path(self.run_dir.best_weights_path) as tmp:
                        self.model.save_weights(tmp)
                test_nll, test_count = trainer.agree(trainer.evaluate(batches["test"]))
            record.update(test_ppl=perplexity(test_nll, int(test_count)),
                          test_tokens=int(test_count), best=True)
        else:
            trainer.learning_rate = lr
            record.update(best=False)
        record["eval_seconds"] = time.perf_counter() - started  # validation, test, best weights
        say(f"end of epoch {epoch + 1} | {seconds:.0f}s | train ppl {train_ppl:.2f} | valid ppl "
            f"{record['val_ppl']:.2f}" + (" (averaged weights)" if averaged else "") +
            (f" | test ppl {record['test_ppl']:.2f} (new best)" if record["best"] else
             f" | lr -> {trainer.learning_rate:.4g}"))
        if self.is_chief:
            # Keyed by epoch: a run stopped after this line but before the checkpoint below
            # redoes the epoch's end on resume and replaces the row instead of adding one.
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

    def stop_if_requested(self, state) -> None:
        """At a consistent point: if a signal asked to stop, save (single process) and stop.

        `state` is the carried LSTM state mid-epoch; None at the end of an epoch, whose
        checkpoint is already saved.
        """
        if not self.stop.requested:
            return
        where = f"epoch {self.progress.epoch + 1}, batch {self.progress.batch}"
        if is_multiworker(self.strategy):
            # A save needs every worker (the state is gathered); the others are not stopping.
            raise Stopped(self.stop.signum, f"stopped at {where} without saving (a multi-worker "
                                            f"run); --resume continues from the last periodic "
                                            f"checkpoint")
        if state is not None:
            self.save_checkpoint(state, where)
        raise Stopped(self.stop.signum, f"a resumable checkpoint was saved at {where}; continue "
                                        f"with --resume {self.run_dir.path}")

    def save_checkpoint(self, state, where: str) -> None:
        """Every worker gathers the LSTM state; the chief writes it with weights and optimizer."""
        lstm = self.trainer.state_to_numpy(state) if state is not None else None
        self.require_finite_weights(where)
        if self.is_chief:
            checkpoint.save(self.checkpoint_path, self.model, self.optimizer, self.progress, lstm,
                            self.average)

    def require_finite_weights(self, where: str) -> None:
        """All workers check (their weights are identical), so all stop together."""
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            raise TrainingDiverged(f"the weights are not finite at {where}; they were not "
                                   f"saved and {self.last_good()}")

    def last_good(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        if not self.checkpoint_path.is_file():
            return "no checkpoint was saved before"
        try:
            at = checkpoint.read_progress(self.checkpoint_path)
        except UserError as err:
            return f"the last checkpoint is unusable too ({err})"
        return (f"the last good checkpoint (epoch {at.epoch + 1}, batch {at.batch}) "
                f"is in {self.run_dir.checkpoint_dir}")


class Throughput:
    """Tokens per wall-clock second over a window."""

    def __init__(self):
        self.start, self.tokens, self.samples = time.perf_counter(), 0, 0

    def add(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def samples_per_second(self) -> float:
        return self.samples / self.seconds


def append_line(path: str, record: dict) -> None:
    """One JSON line, flushed at once (a debug log that must survive a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
