"""The distributed truncated-BPTT training step under a tf.distribute strategy.

Each replica owns a fixed slice of the batch columns and its own LSTM state, which the loop
carries from batch to batch as the per-replica values `strategy.run` returns. The loss is the
mean token NLL over the global batch; the global gradient norm comes from an all-reduced copy of
the gradients, and each replica hands its own gradients, scaled by the same clip factor, to
`apply_gradients` (which sums them across replicas: the sum is exactly the clipped global
gradient). Everything else (logging, checkpoints, learning-rate decisions) is plain Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from keraslm.backend import keras, tf
from keraslm.batching import PAD_TARGET
from keraslm.errors import UserError
from keraslm.evaluation import Evaluator, masked_nll_sum
from keraslm.losses import decoder_nll_sum
from keraslm.model import lstm_biases
from keraslm.training.regularisers import Regularisers, WeightNoise, activation_terms


@dataclass(frozen=True)
class StepResult:
    """What one step reports: the global batch's summed NLL, its targets, the gradient norm."""

    nll_sum: float
    num_targets: int
    grad_norm: float


def noise_keys(seed: int, epoch: int, batch: int, columns: int) -> np.ndarray:
    """Per-column dropout keys: a pure function of (seed, epoch, batch, global column)."""
    mask = (1 << 64) - 1
    base = (seed * 0x9E3779B97F4A7C15 ^ epoch * 0xBF58476D1CE4E5B9 ^ batch * 0x94D049BB133111EB) & mask
    with np.errstate(over="ignore"):
        x = np.arange(columns, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93) + np.uint64(base)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
    return (x & np.uint64(0x7FFFFFFF)).astype(np.int32)


def make_optimizer(name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """SGD (the tutorial's) or Adam; clipping is done by the trainer, not the optimizer."""
    wd = weight_decay or None
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum, weight_decay=wd)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, weight_decay=wd)
    raise UserError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


def gradient_copies(model: keras.Model, two_biases: bool) -> list[float]:
    """How many parameters each trainable variable stands for: 2 for MXNet's twin LSTM biases.

    MXNet's LSTM adds an i2h and an h2h bias. Both start at zero and always get the same gradient,
    so they stay equal: one variable holding their sum is exact if its gradient counts twice in
    the global norm (two copies of it) and its update is doubled (both copies move).
    """
    twins = {id(v) for v in lstm_biases(model)} if two_biases else set()
    return [2.0 if id(v) in twins else 1.0 for v in model.trainable_variables]


def distribute_columns(strategy: tf.distribute.Strategy, array: np.ndarray):
    """Split `array` by rows (batch columns) into equal consecutive slices, one per replica.

    Replica r gets rows [r * B/N, (r+1) * B/N) by its global replica id, so every worker of a
    multi-worker run builds the same global batch and takes its own share.
    """
    replicas = strategy.num_replicas_in_sync
    if len(array) % replicas:
        raise UserError(f"batch size {len(array)} is not divisible by the {replicas} replicas")
    per = len(array) // replicas

    def local(ctx):
        r = ctx.replica_id_in_sync_group
        return tf.constant(array[r * per:(r + 1) * per])

    return strategy.experimental_distribute_values_from_function(local)


class Trainer:
    """Runs train and eval steps of one model on one strategy, carrying per-replica state."""

    def __init__(self, model: keras.Model, optimizer, strategy: tf.distribute.Strategy,
                 *, clip: float = 0.25, two_biases: bool = False, jit_compile: bool = False,
                 fused_decoder: bool = True, regularisers: Regularisers | None = None):
        self.model = model
        self.evaluate = Evaluator(model, jit_compile=jit_compile)
        # The model's parts as the evaluator split them: shared, not derived twice.
        self.features, self.decoder = self.evaluate.features, self.evaluate.decoder
        self.state_sizes = self.evaluate.state_sizes
        self.optimizer = optimizer
        self.strategy = strategy
        self.clip = float(clip)
        self.fused_decoder = fused_decoder
        self.num_replicas = strategy.num_replicas_in_sync
        self.copies = gradient_copies(model, two_biases)
        self.regularisers = regularisers or Regularisers()
        self.noise = WeightNoise(model, self.regularisers)
        # the features with the last LSTM layer's undropped output too (for TAR)
        last = model.get_layer(f"lstm{len(self.state_sizes) // 2 - 1}")
        self.train_features = keras.Model(
            model.inputs, [self.features.outputs[0], last.output[0], *self.features.outputs[1:]],
            name="train_features")
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        self._forward_backward = tf.function(self._forward_backward_impl, jit_compile=jit_compile)
        # Batches of another length (variable-length BPTT) trace the step once more, with the
        # time dimension left open, and then never again; XLA still compiles each length.
        self._train_step = tf.function(self._distributed_train_step, reduce_retracing=True)

    # ---- learning rate -------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.numpy())

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate.assign(value)

    # ---- state ---------------------------------------------------------------------------
    def distribute(self, array: np.ndarray):
        """Give each replica its own slice of the global batch columns (axis 0)."""
        return distribute_columns(self.strategy, array)

    def zero_state(self, batch_size: int):
        """Fresh LSTM state for `batch_size` global columns, distributed by column."""
        return tuple(self.distribute(np.zeros((batch_size, size), np.float32))
                     for size in self.state_sizes)

    def state_to_numpy(self, state) -> list[np.ndarray]:
        """Gather a distributed state back into global [batch, units] arrays (units: each
        layer's own), every replica's columns.

        A collective under MultiWorkerMirroredStrategy: every worker must call it at the same point.
        """
        return [np.asarray(self.strategy.gather(s, axis=0)) for s in state]

    def state_from_numpy(self, arrays: list[np.ndarray]):
        return tuple(self.distribute(np.asarray(a, np.float32)) for a in arrays)

    def agree(self, values) -> np.ndarray:
        """The chief's `values` (as float64) on every worker, so that all take the same decisions.

        Workers hold identical weights (the all-reduce hands each the same sum), but different
        CPUs may round a long evaluation differently; broadcasting the chief's figures (a sum to
        which only global replica 0 contributes) keeps learning-rate and best-epoch decisions in
        step. A collective under MultiWorkerMirroredStrategy; a no-op within one process.
        """
        values = np.asarray(values, np.float64)
        if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return values
        zeros = np.zeros_like(values)
        shared = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values if ctx.replica_id_in_sync_group == 0 else zeros))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, shared, axis=None).numpy()

    # ---- steps ---------------------------------------------------------------------------
    def _forward_backward_impl(self, inputs, targets, keys, state, num_targets, step_key=0,
                               num_pairs=1.0):
        variables = self.model.trainable_variables
        if self.regularisers.weight_noise or self.regularisers.activations:
            return self._regularised_forward_backward(inputs, targets, keys, state, num_targets,
                                                      step_key, num_pairs)
        with tf.GradientTape() as tape:
            if self.fused_decoder:
                hidden, *new_state = self.features([inputs, keys, *state], training=True)
                nll_sum = decoder_nll_sum(self.decoder, hidden, targets)
            else:
                logits, *new_state = self.model([inputs, keys, *state], training=True)
                nll_sum = masked_nll_sum(logits, targets)
            loss = nll_sum / num_targets
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        return grads, nll_sum, tuple(new_state)

    def _regularised_forward_backward(self, inputs, targets, keys, state, num_targets, step_key,
                                      num_pairs):
        """The forward and backward pass with the AWD-LSTM's regularisers: the features on
        this step's dropped weights, AR and TAR added to the loss (not to the NLL returned)."""
        variables = self.model.trainable_variables
        features = self.train_features
        with tf.GradientTape() as tape:
            args = [inputs, keys, *state]
            if self.regularisers.weight_noise:
                values = self.noise.values(features.trainable_variables, step_key)
                fixed = [tf.convert_to_tensor(v) for v in features.non_trainable_variables]
                outputs, _ = features.stateless_call(values, fixed, args, training=True)
            else:
                outputs = features(args, training=True)
            hidden, raw, *new_state = outputs
            if self.fused_decoder:
                nll_sum = decoder_nll_sum(self.decoder, hidden, targets)
            else:
                logits = tf.cast(self.decoder(hidden), tf.float32)
                nll_sum = masked_nll_sum(logits, targets)
            loss = nll_sum / num_targets + activation_terms(
                self.regularisers, hidden, raw, targets, num_targets, num_pairs)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        return grads, nll_sum, tuple(new_state)

    def _replica_train_step(self, inputs, targets, keys, state, num_targets, step_key,
                            num_pairs):
        grads, nll_sum, new_state = self._forward_backward(inputs, targets, keys, state,
                                                           num_targets, step_key, num_pairs)
        ctx = tf.distribute.get_replica_context()
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads) if self.num_replicas > 1 else grads
        norm = tf.sqrt(tf.add_n([copies * tf.reduce_sum(tf.square(g))
                                 for g, copies in zip(total, self.copies)]))
        scale = tf.minimum(1.0, self.clip / tf.maximum(norm, 1e-12)) if self.clip > 0 else 1.0
        grads = [g * (scale * copies) for g, copies in zip(grads, self.copies)]
        if self.regularisers.wd > 0:  # after clipping, as MXNet's optimizers add it
            grads = weight_decayed(grads, self.model.trainable_variables, self.regularisers.wd,
                                   self.num_replicas)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return nll_sum, norm, new_state

    def _distributed_train_step(self, inputs, targets, keys, state, num_targets, step_key,
                                num_pairs):
        nll_sum, norm, new_state = self.strategy.run(
            self._replica_train_step,
            args=(inputs, targets, keys, state, num_targets, step_key, num_pairs))
        total_nll = self.strategy.reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None)
        norm = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, norm, axis=None)  # same on every replica
        return total_nll, norm, new_state

    def train_step(self, inputs: np.ndarray, targets: np.ndarray, keys: np.ndarray, state,
                   step_key: int = 0, lr_scale: float = 1.0):
        """One SGD step on a global batch; returns the result and the carried state.

        `keys` are the columns' dropout keys (`noise_keys`), `step_key` the step's weight-mask
        key (`regularisers.step_key`), the same for every replica. The step runs at the
        learning rate times `lr_scale` (variable-length BPTT's length / bptt); the optimizer's
        rate is put back exactly afterwards."""
        has_target = targets != PAD_TARGET
        num_targets = int(np.count_nonzero(has_target))
        if num_targets == 0:
            return StepResult(0.0, 0, 0.0), state
        num_pairs = int(np.count_nonzero(has_target[:, 1:] & has_target[:, :-1]))
        with self.scaled_learning_rate(lr_scale):
            nll, norm, new_state = self._train_step(
                self.distribute(inputs), self.distribute(targets), self.distribute(keys), state,
                tf.constant(float(num_targets)), tf.constant(step_key, tf.int32),
                tf.constant(float(num_pairs)),
            )
        return StepResult(float(nll), num_targets, float(norm)), new_state

    @contextmanager
    def scaled_learning_rate(self, scale: float) -> Iterator[None]:
        """The optimizer's learning rate times `scale` inside the block (as GluonNLP's script
        sets it for a step), then exactly the rate it was."""
        if scale == 1.0:
            yield
            return
        base = self.optimizer.learning_rate.numpy()
        self.learning_rate = float(base) * scale
        try:
            yield
        finally:
            self.optimizer.learning_rate.assign(base)


def weight_decayed(grads: list[tf.Tensor], variables: list, wd: float,
                   num_replicas: int) -> list[tf.Tensor]:
    """Each replica's gradients plus its share of the L2 term `wd * weight` (the shares sum to
    it in `apply_gradients`). An MXNet twin bias adds `wd` times each twin, so `wd` times their
    sum: the term is not doubled like the gradient."""
    share = wd / num_replicas
    return [g + share * tf.convert_to_tensor(v) for g, v in zip(grads, variables)]
