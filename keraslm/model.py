"""The LSTM language model: config, GluonNLP presets, and the functional Keras graph.

The model maps `(tokens, noise_keys, state) -> (logits, new_state)`. The LSTM state (h and c of
every layer) is an explicit input and output so the training loop can carry it from batch to batch
per replica, evaluate at any batch size, and export the same graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
import tensorflow as tf

from keraslm.errors import UserError


@dataclass(frozen=True)
class LMConfig:
    """Shape of an LSTM language model."""

    vocab_size: int
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = True
    # MXNet's LSTM keeps two summed biases (i2h + h2h) that both get the same gradient: the
    # effective bias learns twice as fast and counts twice in the clipping norm. The trainer
    # reproduces that exactly (see keraslm.training.step); on for the GluonNLP presets.
    two_biases: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise UserError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if min(self.emsize, self.nhid, self.nlayers) < 1:
            raise UserError("--emsize, --nhid and --nlayers must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.tied and self.emsize != self.nhid:
            raise UserError(
                f"tied embeddings need --emsize == --nhid (got {self.emsize} and {self.nhid}); "
                "use --no-tied for different sizes"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def state_names(self) -> list[str]:
        """Names of the state tensors, in the order the model takes and returns them."""
        return [f"{kind}{layer}" for layer in range(self.nlayers) for kind in ("h", "c")]

    def num_parameters(self) -> int:
        """Trainable parameters (tied weights counted once)."""
        v, e, h = self.vocab_size, self.emsize, self.nhid
        lstm = sum(4 * h * ((e if i == 0 else h) + h + 1) for i in range(self.nlayers))
        decoder = v + (0 if self.tied else v * h)
        return v * e + lstm + decoder


# GluonNLP's standard_lstm_lm_* models: embedding = hidden size, 2 layers, tied weights, and
# MXNet's two LSTM biases.
PRESETS: dict[str, dict] = {
    name: {"emsize": size, "nhid": size, "nlayers": 2, "dropout": dropout, "tied": True,
           "two_biases": True}
    for name, size, dropout in (("standard_lstm_lm_200", 200, 0.2),
                                ("standard_lstm_lm_650", 650, 0.5),
                                ("standard_lstm_lm_1500", 1500, 0.65))
}


def preset_config(name: str, vocab_size: int, **overrides) -> LMConfig:
    """The preset `name` for a vocabulary, with any fields overridden (None means keep)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LMConfig(vocab_size=vocab_size, **fields)


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
