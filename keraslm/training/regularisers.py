"""The AWD-LSTM's training-only regularisers (Merity et al. 2018, as GluonNLP's script has them).

Two act on the weights, with one mask a training step drawn from a key of (seed, epoch, batch)
and a salt per weight, so that every replica draws the same mask (2 replicas train as 1) and a
resumed run draws the masks the uninterrupted one would have:

    embedding dropout  whole words of the input embedding: its rows times a keep mask over the
                       vocabulary, scaled by 1 / (1 - rate); a tied decoder reads the undropped
                       embedding (GluonNLP's decoder runs in predict mode)
    weight dropout     DropConnect on each LSTM's hidden-to-hidden kernel: element-wise, scaled

The model's graph never holds them: the trainer runs the features through `stateless_call` with
the dropped values in place of the variables, so evaluation and export see the weights as they
are. Two act on the loss, AR on the dropped last-layer output and TAR on the undropped one, and
one on the update: L2 weight decay added to the clipped gradient, as MXNet's optimizers do.
"""

from __future__ import annotations

from dataclasses import dataclass

from keraslm.backend import keras, tf
from keraslm.batching import PAD_TARGET
from keraslm.config import LMConfig, OptimConfig
from keraslm.model import hashed_uniform

EMBEDDING_SALT = 0       # embedding dropout's mask; weight dropout of LSTM layer l: 1 + l
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Regularisers:
    """The rates and coefficients of a run (all zero: none, and the trainer's plain path)."""

    dropout_e: float = 0.0       # embedding dropout
    weight_dropout: float = 0.0  # DropConnect on the hidden-to-hidden kernels
    alpha: float = 0.0           # AR
    beta: float = 0.0            # TAR
    wd: float = 0.0              # L2 weight decay

    @classmethod
    def of(cls, model: LMConfig, optim: OptimConfig) -> Regularisers:
        return cls(model.dropout_e, model.weight_dropout, optim.alpha, optim.beta, optim.wd)

    @property
    def weight_noise(self) -> bool:
        """Whether the features run on dropped weights."""
        return self.dropout_e > 0 or self.weight_dropout > 0

    @property
    def activations(self) -> bool:
        """Whether the loss has AR or TAR terms."""
        return self.alpha > 0 or self.beta > 0


def step_key(seed: int, epoch: int, batch: int) -> int:
    """The weight masks' key of one training step: a pure function of (seed, epoch, batch), a
    non-negative int32."""
    x = (seed * 0xD1B54A32D192ED03 + epoch * 0xAEF17502108EF2D9 + batch * 0x9E3779B97F4A7C15
         + 0x632BE59BD9B4E019) & _MASK64
    for shift, factor in ((32, 0xE9846AF9B1A615D), (29, 0xE9846AF9B1A615D)):
        x = ((x ^ (x >> shift)) * factor) & _MASK64
    return (x ^ (x >> 32)) & 0x7FFFFFFF


def keep_mask(key: tf.Tensor, salt: int, shape, rate: float) -> tf.Tensor:
    """1.0 where a weight is kept, 0.0 where dropped (probability `rate`), float32 of `shape`:
    the same for the same (key, salt) on any replica, device, and under XLA."""
    shape = tuple(int(dim) for dim in shape)
    return tf.cast(hashed_uniform(key, salt, shape) >= rate, tf.float32)


def dropped(value: tf.Tensor, mask: tf.Tensor, rate: float) -> tf.Tensor:
    """Inverted dropout of a weight: kept entries scaled by 1 / (1 - rate)."""
    return value * tf.cast(mask, value.dtype) * (1.0 / (1.0 - rate))


class WeightNoise:
    """The values a model's feature variables take in one training step: embedding rows and
    recurrent kernels dropped, everything else as it is."""

    def __init__(self, model: keras.Model, regularisers: Regularisers):
        self.regularisers = regularisers
        self.embedding = model.get_layer("embedding").embeddings
        lstms = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
        self.recurrent = {id(layer.cell.recurrent_kernel): 1 + i for i, layer in enumerate(lstms)}

    def values(self, variables: list, key: tf.Tensor) -> list[tf.Tensor]:
        """`variables` as tensors, the dropped ones replaced, for `stateless_call`."""
        rates = self.regularisers
        out = []
        for variable in variables:
            value = tf.convert_to_tensor(variable)
            if variable is self.embedding and rates.dropout_e > 0:
                words = keep_mask(key, EMBEDDING_SALT, (value.shape[0], 1), rates.dropout_e)
                value = dropped(value, words, rates.dropout_e)
            elif id(variable) in self.recurrent and rates.weight_dropout > 0:
                mask = keep_mask(key, self.recurrent[id(variable)], value.shape,
                                 rates.weight_dropout)
                value = dropped(value, mask, rates.weight_dropout)
            out.append(value)
        return out


def activation_terms(regularisers: Regularisers, dropped_output: tf.Tensor,
                     raw_output: tf.Tensor, targets: tf.Tensor, num_targets: tf.Tensor,
                     num_pairs: tf.Tensor) -> tf.Tensor:
    """This replica's share of alpha * AR + beta * TAR over the global batch.

    AR is the mean of the squared dropped last-layer output, TAR the mean of the squared step
    `h_t - h_{t-1}` of the undropped one within the batch; both [batch, time, units]. Means run
    over the global batch's positions that have a target (`num_targets` of them) and the pairs
    of consecutive such positions (`num_pairs`), so the replicas' shares sum to the global
    value (GluonNLP averages over every position: it has no padding)."""
    has_target = tf.cast(tf.not_equal(targets, PAD_TARGET), tf.float32)[..., None]
    units = tf.cast(tf.shape(raw_output)[-1], tf.float32)
    total = tf.constant(0.0)
    if regularisers.alpha > 0:
        squares = tf.square(tf.cast(dropped_output, tf.float32)) * has_target
        total += regularisers.alpha * tf.reduce_sum(squares) / (num_targets * units)
    if regularisers.beta > 0:
        raw = tf.cast(raw_output, tf.float32)
        pairs = has_target[:, 1:] * has_target[:, :-1]
        steps = tf.square(raw[:, 1:] - raw[:, :-1]) * pairs
        total += regularisers.beta * tf.reduce_sum(steps) / (tf.maximum(num_pairs, 1.0) * units)
    return total
