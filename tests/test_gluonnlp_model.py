"""GluonNLP's StandardRNN to the letter: initialisation, output dropout, MXNet's twin LSTM biases."""

from __future__ import annotations

import numpy as np
import pytest

from keraslm.backend import keras, tf
from keraslm.evaluation import masked_nll_sum
from keraslm.model import KeyedDropout, LMConfig, build_model, lstm_biases, preset_config
from keraslm.training.devices import make_strategy
from keraslm.training.step import Trainer, make_optimizer


def test_presets_use_two_biases_and_plain_configs_do_not():
    assert preset_config("standard_lstm_lm_200", 100).two_biases
    assert not LMConfig(vocab_size=100).two_biases
    assert not preset_config("standard_lstm_lm_650", 100, two_biases=False).two_biases


def test_embedding_starts_uniform_in_a_tenth_and_lstm_kernels_glorot_with_zero_biases():
    config = LMConfig(vocab_size=5000, emsize=64, nhid=64, nlayers=2)
    model = build_model(config, seed=3)
    embedding = model.get_layer("embedding").embeddings.numpy()
    assert np.abs(embedding).max() <= 0.1
    assert embedding.std() == pytest.approx(0.2 / np.sqrt(12), rel=0.02)  # U(-0.1, 0.1)
    for layer in range(2):
        cell = model.get_layer(f"lstm{layer}").cell
        for kernel in (cell.kernel.numpy(), cell.recurrent_kernel.numpy()):
            limit = np.sqrt(6 / (kernel.shape[0] + kernel.shape[1]))
            assert np.abs(kernel).max() <= limit
            assert kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.05)
        assert not cell.bias.numpy().any()


def test_output_dropout_shares_its_mask_over_time_and_inner_dropout_does_not():
    x = tf.ones((3, 50, 40))
    keys = tf.constant([1, 2, 3])
    shared = KeyedDropout(0.5, salt=2, shared_over_time=True)(x, keys, training=True).numpy()
    assert (shared == shared[:, :1]).all()  # the same mask at every time step
    assert not (shared[0, 0] == shared[1, 0]).all()  # but a different one per column
    assert 0.4 < (shared == 0).mean() < 0.6
    inner = KeyedDropout(0.5, salt=1)(x, keys, training=True).numpy()
    assert not (inner == inner[:, :1]).all()


CLIP = 0.24  # between the gradient norms of the steps below: some are clipped, some not


def _batches(vocab: int, steps: int, batch: int, bptt: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, vocab, size=(batch, steps * bptt + 1)).astype(np.int32)
    return [(data[:, s * bptt:(s + 1) * bptt], data[:, s * bptt + 1:(s + 1) * bptt + 1])
            for s in range(steps)]


def _mxnet_reference(model: keras.Model, batches, lr: float, clip: float):
    """Plain SGD on a model whose LSTM biases are each the sum of two variables (i2h + h2h),
    with the global norm over every variable, the twins included, as MXNet's script computes it.
    Returns the effective weights after the steps and the gradient norms."""
    twins = {id(v) for v in lstm_biases(model)}
    params = []  # per trainable variable: one tf.Variable, or two summed ones for an LSTM bias
    for v in model.trainable_variables:
        value = v.numpy()
        params.append([tf.Variable(value / 2), tf.Variable(value / 2)] if id(v) in twins
                      else [tf.Variable(value)])
    flat = [p for group in params for p in group]
    nhid = model.get_layer("lstm0").units
    state = [tf.zeros((batches[0][0].shape[0], nhid))] * (len(model.inputs) - 2)
    fixed = [v.numpy() for v in model.non_trainable_variables]  # the LSTMs' seed generators
    norms = []
    for inputs, targets in batches:
        keys = tf.zeros((inputs.shape[0],), tf.int32)
        with tf.GradientTape() as tape:
            values = [tf.add_n(group) for group in params]
            (logits, *state), _ = model.stateless_call(values, fixed, [inputs, keys, *state],
                                                       training=True)
            loss = masked_nll_sum(logits, targets) / targets.size
        grads = tape.gradient(loss, flat)
        clipped, norm = tf.clip_by_global_norm(grads, clip)
        norms.append(float(norm))
        for p, g in zip(flat, clipped):
            p.assign_sub(lr * g)
    return [sum(p.numpy() for p in group) for group in params], norms


@pytest.mark.parametrize("two_biases", [True, False])
def test_twin_biases_match_mxnet_lstm_with_two_summed_biases(two_biases):
    config = LMConfig(vocab_size=50, emsize=12, nhid=12, nlayers=2, dropout=0.0)
    batches = _batches(50, steps=5, batch=4, bptt=6)
    model = build_model(config, seed=1)
    rng = np.random.default_rng(1)  # non-zero biases, so a mistake in them shows
    model.set_weights([rng.uniform(-0.3, 0.3, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    initial = model.get_weights()
    want, want_norms = _mxnet_reference(model, batches, lr=1.0, clip=CLIP)
    assert min(want_norms) < CLIP < max(want_norms), "some steps must be clipped, some not"

    strategy = make_strategy(cpu_replicas=1)
    with strategy.scope():
        ours = build_model(config)
        ours.set_weights(initial)
        trainer = Trainer(ours, make_optimizer("sgd", 1.0), strategy, clip=CLIP,
                          two_biases=two_biases)
    state = trainer.zero_state(4)
    norms = []
    for inputs, targets in batches:
        result, state = trainer.train_step(inputs, targets, np.zeros(4, np.int32), state)
        norms.append(result.grad_norm)
    got = [v.numpy() for v in ours.trainable_variables]
    same = all(np.allclose(a, b, atol=2e-5) for a, b in zip(want, got))
    assert same == two_biases
    if two_biases:
        np.testing.assert_allclose(norms, want_norms, rtol=1e-4)
