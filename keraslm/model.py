"""The LSTM language model: config, GluonNLP presets, and the functional Keras graph.

The model maps `(tokens, noise_keys, state) -> (logits, new_state)`. The LSTM state (h and c of
every layer) is an explicit input and output so the training loop can carry it from batch to batch
per replica, evaluate at any batch size, and export the same graph.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from keraslm.config import PRESETS, LMConfig, preset_config
from keraslm.errors import UserError
from keraslm.rundir import RunDir, resolve_run

__all__ = ["PRESETS", "KeyedDropout", "LMConfig", "TiedOutput", "build_model", "load_run_model",
           "lstm_biases", "preset_config", "split_decoder"]


def _fmix32(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    mask = 0xFFFFFFFF
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
    h = tf.bitwise.bitwise_and(h * 0x85EBCA6B, mask)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 13))
    h = tf.bitwise.bitwise_and(h * 0xC2B2AE35, mask)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


@keras.saving.register_keras_serializable("keraslm")
class KeyedDropout(keras.layers.Layer):
    """Dropout whose mask is a pure function of a per-column key.

    Each batch row (a BPTT column) brings its own int32 key, derived by the trainer from
    (seed, epoch, batch, global column). The mask therefore does not depend on which replica
    holds the column, replicas draw different masks, and a resumed run draws exactly the masks
    the uninterrupted run would have. With `shared_over_time` one mask per (column, unit) is used
    at every time step (GluonNLP's output dropout, `Dropout(axes=(0,))` on time-major data).
    """

    def __init__(self, rate: float, salt: int, shared_over_time: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.salt = int(salt)
        self.shared_over_time = bool(shared_over_time)

    def call(self, x, keys, training=None):
        if not training or self.rate == 0.0:
            return x
        shape = tf.shape(x)
        time = 1 if self.shared_over_time else shape[1]
        width = shape[2]
        position = tf.cast(tf.range(time)[:, None] * width + tf.range(width)[None, :], tf.int64)
        row = _fmix32(tf.cast(keys, tf.int64) % (1 << 32) ^ (self.salt * 0x9E3779B9 % (1 << 32)))
        bits = _fmix32(tf.bitwise.bitwise_xor(row[:, None, None], position[None]) % (1 << 32))
        uniform = tf.cast(bits, tf.float32) * (1.0 / 4294967296.0)
        keep = tf.cast(uniform >= self.rate, x.dtype)  # [batch, time or 1, width]
        return x * keep / (1.0 - self.rate)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "salt": self.salt,
                "shared_over_time": self.shared_over_time}


@keras.saving.register_keras_serializable("keraslm")
class TiedOutput(keras.layers.Layer):
    """Output projection that reuses the embedding matrix (transposed) plus its own bias."""

    def __init__(self, embedding: keras.layers.Embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def build(self, input_shape):
        self.bias = self.add_weight(
            name="bias", shape=(self.embedding.input_dim,), initializer="zeros"
        )

    def call(self, x):
        return tf.matmul(x, self.embedding.embeddings, transpose_b=True) + self.bias


EMBEDDING_INIT_RANGE = 0.1  # GluonNLP's and PyTorch's examples: Uniform(-0.1, 0.1)


def build_model(config: LMConfig, seed: int | None = None) -> keras.Model:
    """The functional LM: inputs `tokens` [B, T], `noise_keys` [B] and the state; outputs logits.

    As GluonNLP's `StandardRNN`: the embedding (and so a tied decoder) starts Uniform(-0.1, 0.1),
    the LSTM kernels Glorot-uniform (MXNet's Xavier), every bias at zero (Keras' differing
    defaults, orthogonal recurrent kernels and unit forget bias, are overridden). Dropout is
    element-wise on the embedding and between layers, and shared over time on the last output.
    """
    def glorot(offset: int):
        return keras.initializers.GlorotUniform(seed=None if seed is None else seed + offset)

    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    keys = keras.Input(shape=(), dtype="int32", name="noise_keys")
    states = [keras.Input(shape=(config.nhid,), name=name) for name in config.state_names()]

    embedding = keras.layers.Embedding(
        config.vocab_size, config.emsize, name="embedding",
        embeddings_initializer=keras.initializers.RandomUniform(
            -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE, seed=None if seed is None else seed),
    )
    x = KeyedDropout(config.dropout, salt=0, name="embedding_dropout")(embedding(tokens), keys)
    new_states = []
    for layer in range(config.nlayers):
        lstm = keras.layers.LSTM(
            config.nhid,
            return_sequences=True,
            return_state=True,
            kernel_initializer=glorot(1 + 2 * layer),
            recurrent_initializer=glorot(2 + 2 * layer),
            bias_initializer="zeros",
            unit_forget_bias=False,
            use_cudnn=False,
            name=f"lstm{layer}",
        )
        x, h, c = lstm(x, initial_state=states[2 * layer : 2 * layer + 2])
        last = layer == config.nlayers - 1
        x = KeyedDropout(config.dropout, salt=layer + 1, shared_over_time=last,
                         name=f"lstm{layer}_dropout")(x, keys)
        new_states += [h, c]
    if config.tied:
        logits = TiedOutput(embedding, name="decoder")(x)
    else:
        logits = keras.layers.Dense(
            config.vocab_size, kernel_initializer=glorot(99), name="decoder"
        )(x)
    return keras.Model([tokens, keys, *states], [logits, *new_states], name="lstm_lm")


def lstm_biases(model: keras.Model) -> list[keras.Variable]:
    """The bias variable of every LSTM layer, in layer order."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
    return [layer.cell.bias for layer in layers]


def split_decoder(model: keras.Model) -> tuple[keras.Model, keras.Variable, keras.Variable, bool]:
    """The model up to the decoder's input, and the decoder's (kernel, bias, transposed).

    Training applies the decoder fused with its loss (see `keraslm.losses`), so it needs the
    features and the decoder weights apart; both share the model's variables.
    """
    decoder = model.get_layer("decoder")
    features = keras.Model(model.inputs, [decoder.input, *model.outputs[1:]], name="features")
    if isinstance(decoder, TiedOutput):
        return features, decoder.embedding.embeddings, decoder.bias, True
    return features, decoder.kernel, decoder.bias, False


def load_run_model(run: RunDir | str | os.PathLike) -> tuple[keras.Model, LMConfig]:
    """A run's model with its best weights (what evaluation and export use), and its config."""
    run = run if isinstance(run, RunDir) else resolve_run(run)
    config = run.model_config()
    if not run.best_weights_path.is_file():
        raise UserError(f"{run.path}: no {run.best_weights_path.name} "
                        "(the run has not finished an epoch)")
    model = build_model(config)
    try:
        model.load_weights(run.best_weights_path)
    except (ValueError, OSError, KeyError) as err:  # what Keras raises for a bad file
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{run.best_weights_path}: cannot load the weights ({first_line})") from None
    return model, config
