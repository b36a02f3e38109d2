"""FusedLSTM (TensorFlow's BlockLSTM kernel) is Keras' LSTM: same weights, outputs, gradients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from keraslm.backend import keras, tf
from keraslm.model import FusedLSTM, build_model, preset_config


def twin_layers(units: int, features: int) -> tuple[keras.layers.LSTM, FusedLSTM]:
    kwargs = {"return_sequences": True, "return_state": True, "use_cudnn": False,
                  "bias_initializer": "random_normal"}
    plain, fused = keras.layers.LSTM(units, **kwargs), FusedLSTM(units, **kwargs)
    x = np.zeros((1, 2, features), np.float32)
    plain(x)
    fused(x)
    rng = np.random.default_rng(0)
    kernel, recurrent, bias = (rng.normal(size=w.shape).astype(np.float32)
                               for w in plain.get_weights())
    bias[units:3 * units] += 4  # forget gates open, cell input large: the cell state grows
    weights = [kernel, recurrent, bias]
    plain.set_weights(weights)
    fused.set_weights(weights)
    return plain, fused


@pytest.mark.parametrize("batch, time", [(3, 7), (1, 1), (4, 40)])
def test_fused_lstm_equals_keras_lstm_forward_and_backward(batch, time):
    units, features = 6, 5
    plain, fused = twin_layers(units, features)
    rng = np.random.default_rng(batch * 100 + time)
    x = tf.constant(rng.normal(scale=2.0, size=(batch, time, features)).astype(np.float32))
    h0 = tf.constant(rng.normal(size=(batch, units)).astype(np.float32))
    c0 = tf.constant(rng.normal(scale=3.0, size=(batch, units)).astype(np.float32))
    weight = tf.constant(rng.normal(size=(batch, time, units)).astype(np.float32))

    def run(layer):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            y, h, c = layer(x, initial_state=[h0, c0])
            loss = tf.reduce_sum(y * weight) + tf.reduce_sum(h * h) + tf.reduce_sum(c * c)
        return [y, h, c], tape.gradient(loss, [x, h0, c0, *layer.trainable_variables])

    (outputs, grads), (fused_outputs, fused_grads) = run(plain), run(fused)
    if time > 1:  # the cell state went past BlockLSTM's default clip of 3, and was not clipped
        assert float(tf.reduce_max(tf.abs(outputs[2]))) > 3
    for a, b in zip(outputs + grads, fused_outputs + fused_grads):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4)  # float32 sums


def test_a_fused_model_and_a_plain_one_share_weights_files(tmp_path):
    config = dataclasses.replace(preset_config("standard_lstm_lm_200", 50), emsize=8, nhid=8)
    fused, plain = build_model(config, seed=1), build_model(config, seed=2, fused=False)
    assert any(isinstance(layer, FusedLSTM) for layer in fused.layers)
    assert not any(isinstance(layer, FusedLSTM) for layer in plain.layers)
    plain.save_weights(tmp_path / "plain.weights.h5")  # an old run's file loads when fused
    build_model(config).load_weights(tmp_path / "plain.weights.h5")
    fused.save_weights(tmp_path / "w.weights.h5")
    plain.load_weights(tmp_path / "w.weights.h5")
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 50, size=(2, 9)).astype(np.int32)
    states = [rng.normal(size=(2, 8)).astype(np.float32) for _ in config.state_names()]
    inputs = [tokens, np.zeros(2, np.int32), *states]
    for a, b in zip(fused(inputs, training=False), plain(inputs, training=False)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
