"""The output layer's loss: the full softmax and its cross-entropy fused into one op with a
hand-written gradient, or the adaptive softmax's own (`decoder_nll_sum` picks).

At vocabulary 33,278 the decoder is ~90 % of the FLOPs of `standard_lstm_lm_200`, and TensorFlow's
`SparseSoftmaxCrossEntropyWithLogits` kernel is slow on CPU (about as slow as one of the three big
matmuls). Here the matmuls stay on oneDNN, and the element-wise work on the [tokens, vocab]
logits (log-sum-exp forward; softmax minus one-hot, masked and scaled, plus the bias gradient,
backward) is compiled by XLA into single passes over memory.

Under bf16 mixed precision (a bfloat16 decoder) the three matmuls run in bfloat16 and the
[tokens, vocab] logits are never materialised in float32: the XLA passes read the matmul's
bfloat16 output, add the float32 bias and compute the log-sum-exp, the loss and the bias gradient
in float32, and write the logits' gradient in bfloat16 for the two gradient matmuls. The weight
gradients handed to the optimizer are float32.
"""

from __future__ import annotations

from keraslm.adaptive import AdaptiveSoftmax
from keraslm.backend import keras, tf
from keraslm.batching import PAD_TARGET
from keraslm.model import full_decoder_weights


@tf.function(jit_compile=True)
def _log_sum_exp_and_nll(raw_logits, bias, targets, weights):
    logits = tf.cast(raw_logits, tf.float32) + bias
    top = tf.reduce_max(logits, axis=1, keepdims=True)
    lse = tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=1, keepdims=True)) + top
    picked = tf.gather(logits, targets[:, None], batch_dims=1)
    return lse, tf.reduce_sum(weights * (lse - picked)[:, 0])


@tf.function(jit_compile=True)
def _logits_gradient(raw_logits, bias, lse, targets, weights, upstream):
    """The logits' gradient in the matmul's dtype, and the bias gradient (float32)."""
    logits = tf.cast(raw_logits, tf.float32) + bias
    scale = (weights * upstream)[:, None]
    grad = (tf.exp(logits - lse) - tf.one_hot(targets, tf.shape(logits)[1])) * scale
    return tf.cast(grad, raw_logits.dtype), tf.reduce_sum(grad, axis=0)


def decoder_nll_sum(decoder: keras.layers.Layer, hidden: tf.Tensor,
                    targets: tf.Tensor) -> tf.Tensor:
    """Sum over non-padding targets of -log p(target) under the model's output layer `decoder`
    (see `keraslm.model.split_decoder`): the fused full softmax, or the adaptive softmax's loss,
    which runs each tail only on its targets. The decoder computes in its own dtype (bfloat16
    under bf16 mixed precision) whatever the dtype of `hidden`."""
    hidden = tf.cast(hidden, decoder.compute_dtype)
    if isinstance(decoder, AdaptiveSoftmax):
        return decoder.nll_sum(hidden, targets)
    kernel, bias, transposed = full_decoder_weights(decoder)
    return full_softmax_nll_sum(hidden, kernel, bias, targets, transposed_kernel=transposed)


def full_softmax_nll_sum(hidden: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor,
                         targets: tf.Tensor, *, transposed_kernel: bool) -> tf.Tensor:
    """Sum over non-padding targets of -log softmax(hidden @ W + bias)[target].

    `hidden` is [..., H] and `targets` [...] (PAD_TARGET = padding). `kernel` is [V, H] when
    `transposed_kernel` (tied embeddings) and [H, V] otherwise.
    """
    width = tf.shape(hidden)[-1]
    flat_hidden = tf.reshape(hidden, [-1, width])
    flat_targets = tf.reshape(targets, [-1])
    mask = tf.not_equal(flat_targets, PAD_TARGET)
    safe_targets = tf.where(mask, flat_targets, tf.zeros_like(flat_targets))
    weights = tf.cast(mask, tf.float32)
    return _fused(flat_hidden, kernel, bias, safe_targets, weights, transposed_kernel)


def _fused(hidden, kernel, bias, targets, weights, transposed_kernel: bool):
    @tf.custom_gradient
    def forward(hidden, kernel, bias):
        compute = hidden.dtype  # float32, or bfloat16 under mixed precision
        kernel_c = tf.cast(kernel, compute)
        raw_logits = tf.matmul(hidden, kernel_c, transpose_b=transposed_kernel)  # no bias
        lse, nll_sum = _log_sum_exp_and_nll(raw_logits, bias, targets, weights)

        def backward(upstream):
            grad, bias_grad = _logits_gradient(raw_logits, bias, lse, targets, weights, upstream)
            hidden_grad = tf.matmul(grad, kernel_c, transpose_b=not transposed_kernel)
            if transposed_kernel:
                kernel_grad = tf.matmul(grad, hidden, transpose_a=True)
            else:
                kernel_grad = tf.matmul(hidden, grad, transpose_a=True)
            return hidden_grad, tf.cast(kernel_grad, kernel.dtype), bias_grad

        return nll_sum, backward

    return forward(hidden, kernel, bias)
