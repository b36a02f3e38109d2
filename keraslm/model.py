"""The LSTM language model: config, GluonNLP presets, and the functional Keras graph.

The model maps `(tokens, noise_keys, state) -> (logits, new_state)`. The LSTM state (h and c of
every layer) is an explicit input and output so the training loop can carry it from batch to batch
per replica, evaluate at any batch size, and export the same graph.
"""

from __future__ import annotations

from keraslm.adaptive import AdaptiveSoftmax
from keraslm.backend import keras, tf
from keraslm.config import PRESETS, LMConfig, preset_config
from keraslm.precision import FEATURES_POLICY, keras_policy
from keraslm.recurrence import block_lstm

__all__ = ["PRESETS", "AdaptiveSoftmax", "FusedLSTM", "KeyedDropout", "LMConfig", "TiedOutput",
           "build_model", "full_decoder_weights", "lstm_biases", "preset_config",
           "split_decoder", "state_sizes"]


def _fmix32(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    mask = 0xFFFFFFFF
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
    h = tf.bitwise.bitwise_and(h * 0x85EBCA6B, mask)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 13))
    h = tf.bitwise.bitwise_and(h * 0xC2B2AE35, mask)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


@tf.function(jit_compile=True)
def _keep_mask(keys: tf.Tensor, time: tf.Tensor, width: tf.Tensor, salt: int,
               rate: float) -> tf.Tensor:
    """Which units dropout keeps (1.0) or drops (0.0), [batch, time, width], from each row's key
    hashed with the (time, unit) position. XLA fuses the hash's dozen integer ops into one
    pass, instead of a [batch, time, width] int64 tensor per op."""
    position = tf.cast(tf.range(time)[:, None] * width + tf.range(width)[None, :], tf.int64)
    row = _fmix32(tf.cast(keys, tf.int64) % (1 << 32) ^ (salt * 0x9E3779B9 % (1 << 32)))
    bits = _fmix32(tf.bitwise.bitwise_xor(row[:, None, None], position[None]) % (1 << 32))
    uniform = tf.cast(bits, tf.float32) * (1.0 / 4294967296.0)
    return tf.cast(uniform >= rate, tf.float32)


@tf.function(jit_compile=True)
def hashed_uniform(key: tf.Tensor, salt: int, shape: tuple[int, ...]) -> tf.Tensor:
    """Uniform numbers in [0, 1], float32 of `shape`, a pure function of (key, salt, position):
    integer arithmetic only, so they are the same on every device and under XLA (TensorFlow's
    stateless random ops are not: with a seed known only at run time, XLA's differ)."""
    size = 1
    for dim in shape:
        size *= int(dim)
    row = _fmix32(tf.cast(key, tf.int64) % (1 << 32) ^ (salt * 0x9E3779B9 % (1 << 32)))
    bits = _fmix32(tf.bitwise.bitwise_xor(row, tf.range(size, dtype=tf.int64)) % (1 << 32))
    return tf.reshape(tf.cast(bits, tf.float32) * (1.0 / 4294967296.0), shape)


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
        keep = _keep_mask(keys, time, shape[2], self.salt, self.rate)  # [batch, time or 1, width]
        return x * tf.cast(keep, x.dtype) / (1.0 - self.rate)

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
        # Never autocast: the logits are float32 whatever the compute precision.
        self.bias = self.add_weight(
            name="bias", shape=(self.embedding.input_dim,), initializer="zeros", autocast=False
        )

    def call(self, x):
        kernel = tf.cast(self.embedding.embeddings, x.dtype)  # bf16 under mixed precision
        return tf.cast(tf.matmul(x, kernel, transpose_b=True), "float32") + self.bias


@keras.saving.register_keras_serializable("keraslm")
class FusedLSTM(keras.layers.LSTM):
    """Keras' LSTM run by TensorFlow's fused `BlockLSTM` kernel: same weights, same numbers.

    The generic Keras LSTM (no cuDNN) runs a `while_loop` of small ops per time step; the fused
    kernel computes every step's gates, cell and output in one op (measured 1.9x faster on the
    2-layer LSTM of standard_lstm_lm_200), and `keraslm.recurrence` backpropagates through it
    with whole-sequence matmuls. The weights are the parent's
    (kernel, recurrent_kernel and bias in Keras' i, f, c, o gate order, handed to the kernel in
    its i, c, f, o order), so a weights file loads into either class, and export rebuilds the
    plain LSTM, which tf2onnx turns into a native ONNX LSTM. Where the kernel does not apply
    (another backend or dtype, masks, dropout inside the cell, other activations) the layer is
    exactly its parent. `BlockLSTMV2`, the kernel with Keras' gate order, is not used: its
    gradient is wrong in the TensorFlow measured (2.20).
    """

    def _fusable(self, mask) -> bool:
        cell = self.cell
        return (keras.backend.backend() == "tensorflow" and mask is None
                and self.compute_dtype in ("float32", "float16") and cell.use_bias
                and cell.activation is keras.activations.tanh
                and cell.recurrent_activation is keras.activations.sigmoid
                and cell.dropout == 0 and cell.recurrent_dropout == 0
                and self.return_sequences and self.return_state
                and not (self.go_backwards or self.unroll or self.stateful))

    def call(self, sequences, initial_state=None, mask=None, training=False):
        if not self._fusable(mask):
            return super().call(sequences, initial_state=initial_state, mask=mask,
                                training=training)
        x = tf.transpose(tf.convert_to_tensor(sequences, self.compute_dtype), (1, 0, 2))
        if initial_state is None:
            zeros = tf.zeros((tf.shape(x)[1], self.units), x.dtype)
            initial_state = [zeros, zeros]
        h0, c0 = (tf.cast(s, x.dtype) for s in initial_state)
        cell = self.cell
        weights = tf.concat([cell.kernel, cell.recurrent_kernel], axis=0)
        hidden, last_cell = block_lstm(x, h0, c0, _icfo(tf.cast(weights, x.dtype)),
                                       _icfo(tf.cast(cell.bias, x.dtype)))  # [time, batch, units]
        return [tf.transpose(hidden, (1, 0, 2)), hidden[-1], last_cell]


# Keras' weights files address a model's layers by class name: under LSTM's name, a file saved
# from a fused model loads into a plain one (export) and old runs' files into fused models.
FusedLSTM.__name__ = FusedLSTM.__qualname__ = "LSTM"


def _icfo(gates: tf.Tensor) -> tf.Tensor:
    """Keras' gate blocks (i, f, c, o) on the last axis in BlockLSTM's order (i, c, f, o)."""
    i, f, c, o = tf.split(gates, 4, axis=-1)
    return tf.concat([i, c, f, o], axis=-1)


EMBEDDING_INIT_RANGE = 0.1  # GluonNLP's and PyTorch's examples: Uniform(-0.1, 0.1)


def build_model(config: LMConfig, seed: int | None = None, fused: bool = True,
                precision: str = "fp32") -> keras.Model:
    """The functional LM: inputs `tokens` [B, T], `noise_keys` [B] and the state; outputs logits.

    `fused` runs the LSTMs with TensorFlow's fused kernel (`FusedLSTM`, same weights and
    numbers); export builds the plain Keras LSTM (`fused=False`), which tf2onnx converts.
    `precision="bf16"` computes the output layer in bfloat16 (see `keraslm.precision`); the
    layers before it, the weights, the logits and the returned state are float32 in both
    precisions.

    As GluonNLP's `StandardRNN`: the embedding (and so a tied decoder) starts Uniform(-0.1, 0.1),
    the LSTM kernels Glorot-uniform (MXNet's Xavier), every bias at zero (Keras' differing
    defaults, orthogonal recurrent kernels and unit forget bias, are overridden). Dropout is
    element-wise on the embedding and between layers, and shared over time on the last output;
    with the AWD-LSTM's `dropout_i` / `dropout_h` it is shared over time everywhere (GluonNLP's
    AWDRNN). Embedding and weight dropout are not in this graph: the trainer applies them to the
    weights (`keraslm.training.weight_noise`), so evaluation and export never see them.
    The output layer is a full softmax (tied: the embedding's transpose plus a bias) or, for
    `config.softmax == "adaptive"`, an `AdaptiveSoftmax` whose outputs are log-probabilities.
    """
    def glorot(offset: int):
        return keras.initializers.GlorotUniform(seed=None if seed is None else seed + offset)

    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    keys = keras.Input(shape=(), dtype="int32", name="noise_keys")
    states = [keras.Input(shape=(size,), name=name)
              for name, size in zip(config.state_names(), config.state_sizes())]

    policy = keras_policy(precision)  # the output layer's
    embedding = keras.layers.Embedding(
        config.vocab_size, config.emsize, name="embedding", dtype=FEATURES_POLICY,
        embeddings_initializer=keras.initializers.RandomUniform(
            -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE, seed=None if seed is None else seed),
    )
    # the AWD-LSTM's locked dropout where its rate is given, else the standard element-wise one
    x = KeyedDropout(_rate(config.dropout_i, config.dropout), salt=0,
                     shared_over_time=config.dropout_i is not None, name="embedding_dropout",
                     dtype=FEATURES_POLICY)(embedding(tokens), keys)
    new_states = []
    for layer, units in enumerate(config.layer_sizes()):
        lstm = (FusedLSTM if fused else keras.layers.LSTM)(
            units,
            return_sequences=True,
            return_state=True,
            kernel_initializer=glorot(1 + 2 * layer),
            recurrent_initializer=glorot(2 + 2 * layer),
            bias_initializer="zeros",
            unit_forget_bias=False,
            use_cudnn=False,
            name=f"lstm{layer}",
            dtype=FEATURES_POLICY,
        )
        x, h, c = lstm(x, initial_state=states[2 * layer : 2 * layer + 2])
        last = layer == config.nlayers - 1
        x = KeyedDropout(config.dropout if last else _rate(config.dropout_h, config.dropout),
                         salt=layer + 1, shared_over_time=last or config.dropout_h is not None,
                         name=f"lstm{layer}_dropout", dtype=FEATURES_POLICY)(x, keys)
        new_states += [h, c]
    if config.softmax == "adaptive":  # log-probabilities, which are logits too
        logits = AdaptiveSoftmax(config.vocab_size, config.cutoffs, config.div_value,
                                 embedding=embedding if config.tied else None,
                                 seed=None if seed is None else seed + 100, use_bias=True,
                                 name="decoder", dtype=policy)(x)
    elif config.tied:
        logits = TiedOutput(embedding, name="decoder", dtype=policy)(x)
    else:
        logits = keras.layers.Dense(
            config.vocab_size, kernel_initializer=glorot(99), name="decoder", dtype=policy
        )(x)
        if precision != "fp32":
            logits = keras.ops.cast(logits, "float32")
    return keras.Model([tokens, keys, *states], [logits, *new_states], name="lstm_lm")


def _rate(locked: float | None, standard: float) -> float:
    return standard if locked is None else locked


def state_sizes(model: keras.Model) -> list[int]:
    """Units of each LSTM state input of `model`, in the order it takes them (h and c of every
    layer: the layer's width, which may differ from layer to layer)."""
    return [int(state.shape[-1]) for state in model.inputs[2:]]


def lstm_biases(model: keras.Model) -> list[keras.Variable]:
    """The bias variable of every LSTM layer, in layer order."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
    return [layer.cell.bias for layer in layers]


def split_decoder(model: keras.Model) -> tuple[keras.Model, keras.layers.Layer]:
    """The model up to the decoder's input, and the decoder layer (TiedOutput, Dense or
    AdaptiveSoftmax).

    Training applies the decoder fused with its loss (see `keraslm.losses`), so it needs the
    features and the decoder apart; both share the model's variables.
    """
    decoder = model.get_layer("decoder")
    features = keras.Model(model.inputs, [decoder.input, *model.outputs[1:]], name="features")
    return features, decoder


def full_decoder_weights(decoder: keras.layers.Layer
                         ) -> tuple[keras.Variable, keras.Variable, bool]:
    """A full-softmax decoder's (kernel, bias, transposed): the kernel is [V, H] when
    `transposed` (tied to the embedding) and [H, V] otherwise."""
    if isinstance(decoder, TiedOutput):
        return decoder.embedding.embeddings, decoder.bias, True
    return decoder.kernel, decoder.bias, False
