"""The fused decoder + cross-entropy: its value and hand-written gradient equal autodiff through
the plain logits path."""

from __future__ import annotations

import numpy as np
import pytest

from keraslm.backend import tf
from keraslm.batching import PAD_TARGET
from keraslm.evaluation import masked_nll_sum
from keraslm.losses import full_softmax_nll_sum


@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_and_gradients_equal_autodiff_through_the_logits(tied):
    rng = np.random.default_rng(0)
    batch, time, width, vocab = 3, 5, 16, 97
    hidden = tf.constant(rng.normal(size=(batch, time, width)).astype(np.float32))
    shape = (vocab, width) if tied else (width, vocab)
    kernel = tf.constant(rng.normal(scale=0.3, size=shape).astype(np.float32))
    bias = tf.constant(rng.normal(size=vocab).astype(np.float32))
    targets = rng.integers(0, vocab, size=(batch, time)).astype(np.int32)
    targets[0, 3:] = PAD_TARGET  # padding must count for nothing, in the loss and the gradient
    targets[2, 0] = PAD_TARGET
    targets = tf.constant(targets)
    upstream = 0.37  # a loss scaled as the trainer scales it (1 / number of targets)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([hidden, kernel, bias])
        fused = upstream * full_softmax_nll_sum(hidden, kernel, bias, targets,
                                                transposed_kernel=tied)
        logits = tf.matmul(hidden, kernel, transpose_b=tied) + bias
        plain = upstream * masked_nll_sum(logits, targets)
    np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=1e-5)
    for got, want in zip(tape.gradient(fused, [hidden, kernel, bias]),
                         tape.gradient(plain, [hidden, kernel, bias])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    padded_hidden_grad = tape.gradient(fused, hidden).numpy()[0, 3:]
    assert not padded_hidden_grad.any()
