"""The adaptive softmax's math (keraslm/adaptive.py) against a NumPy reference written from the
paper's formulas: normalised log-probabilities, the loss over the targets only, its gradients,
the default cutoffs and the parameter count."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from keraslm.adaptive import AdaptiveSoftmax, check_cutoffs, default_cutoffs
from keraslm.backend import keras
from keraslm.batching import PAD_TARGET
from keraslm.errors import UserError

VOCAB, HIDDEN, CUTOFFS, DIV = 50, 16, (10, 30), 2.0


@pytest.fixture
def layer() -> AdaptiveSoftmax:
    keras_layer = AdaptiveSoftmax(VOCAB, CUTOFFS, DIV)
    keras_layer.build((None, HIDDEN))
    rng = np.random.default_rng(0)
    for weight in keras_layer.weights:  # larger than Glorot's: distributions far from uniform
        weight.assign(rng.normal(0, 0.5, weight.shape).astype(np.float32))
    return keras_layer


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference_log_probs(layer: AdaptiveSoftmax, hidden: np.ndarray) -> np.ndarray:
    """log p(w) for every word, straight from the formulas, one word at a time."""
    head = log_softmax(hidden @ layer.head.numpy())
    bounds = (0, *CUTOFFS, VOCAB)
    tails = [log_softmax(hidden @ p.numpy() @ o.numpy())
             for p, o in zip(layer.projections, layer.outputs)]
    out = np.zeros((len(hidden), VOCAB))
    for w in range(VOCAB):
        cluster = next(i for i in range(len(bounds) - 1) if w < bounds[i + 1])
        if cluster == 0:
            out[:, w] = head[:, w]
        else:
            out[:, w] = head[:, CUTOFFS[0] + cluster - 1] + tails[cluster - 1][:, w - bounds[cluster]]
    return out


def test_log_probs_are_the_formulas_and_sum_to_one(layer):
    hidden = np.random.default_rng(1).normal(size=(7, HIDDEN)).astype(np.float32)
    got = layer.log_probs(tf.constant(hidden)).numpy()
    np.testing.assert_allclose(got, reference_log_probs(layer, hidden), atol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)


def test_log_probs_keep_the_leading_shape(layer):
    hidden = tf.random.normal((3, 4, HIDDEN), seed=2)
    assert layer(hidden).shape == (3, 4, VOCAB)


def test_nll_sum_is_the_targets_negative_log_probs_padding_ignored(layer):
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(4, 6, HIDDEN)).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=(4, 6)).astype(np.int32)
    targets[0, :3] = [0, CUTOFFS[0], CUTOFFS[1]]  # the first word of each part
    targets[1, -2:] = PAD_TARGET
    reference = reference_log_probs(layer, hidden.reshape(-1, HIDDEN))
    flat = targets.reshape(-1)
    want = -sum(reference[i, t] for i, t in enumerate(flat) if t != PAD_TARGET)
    got = layer.nll_sum(tf.constant(hidden), tf.constant(targets)).numpy()
    assert got == pytest.approx(want, rel=1e-5)


def test_nll_gradients_equal_those_of_the_full_log_probs(layer):
    hidden = tf.constant(np.random.default_rng(4).normal(size=(9, HIDDEN)).astype(np.float32))
    targets = tf.constant([0, 5, 9, 10, 29, 30, 49, 12, PAD_TARGET], tf.int32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(hidden)
        fast = layer.nll_sum(hidden, targets)
        full = layer.log_probs(hidden)
        mask = targets != PAD_TARGET
        picked = tf.gather(full, tf.maximum(targets, 0)[:, None], batch_dims=1)[:, 0]
        slow = -tf.reduce_sum(tf.where(mask, picked, 0.0))
    for got, want in zip(tape.gradient(fast, [hidden, *layer.weights]),
                         tape.gradient(slow, [hidden, *layer.weights])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_a_tail_without_targets_gets_no_gradient(layer):
    hidden = tf.random.normal((5, HIDDEN), seed=5)
    targets = tf.constant([0, 3, 9, 12, 25], tf.int32)  # the head and tail 1 only
    with tf.GradientTape() as tape:
        loss = layer.nll_sum(hidden, targets)
    grads = dict(zip([w.name for w in layer.weights], tape.gradient(loss, layer.weights)))
    assert not np.any(tf.convert_to_tensor(grads["tail2_projection"]).numpy())
    assert not np.any(tf.convert_to_tensor(grads["tail2_output"]).numpy())
    assert np.any(tf.convert_to_tensor(grads["tail1_output"]).numpy())


def test_it_traces_once_for_any_batch_and_length(layer):
    @tf.function(input_signature=[tf.TensorSpec([None, None, HIDDEN]),
                                  tf.TensorSpec([None, None], tf.int32)])
    def loss(hidden, targets):
        return layer.nll_sum(hidden, targets)

    for shape in ((2, 3), (1, 7), (4, 1)):
        targets = tf.random.uniform(shape, 0, VOCAB, tf.int32, seed=6)
        assert np.isfinite(loss(tf.random.normal((*shape, HIDDEN), seed=7), targets).numpy())
    assert loss.experimental_get_tracing_count() == 1


def test_without_cutoffs_it_is_a_plain_softmax():
    plain = AdaptiveSoftmax(VOCAB, ())
    hidden = tf.random.normal((3, HIDDEN), seed=8)
    got = plain(hidden).numpy()
    np.testing.assert_allclose(got, tf.nn.log_softmax(hidden @ plain.head).numpy(), atol=1e-6)


def test_parameter_count_is_pytorchs():
    """nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs, div_value, head_bias=False): a head of
    H x (cutoffs[0] + clusters), and per tail i a H x (H // div**i) projection and a
    (H // div**i) x size_i output, none with a bias."""
    hidden, vocab, cutoffs, div = 200, 33_278, (2_000, 10_000), 4.0
    layer = AdaptiveSoftmax(vocab, cutoffs, div)
    layer.build((None, hidden))
    want = hidden * (2_000 + 2) + hidden * 50 + 50 * 8_000 + hidden * 12 + 12 * 23_278
    assert layer.count_params() == want == 1_092_136
    assert hidden * vocab == 6_655_600  # the full softmax's decoder, for scale


@pytest.mark.parametrize(("softmax", "tied", "count"), [
    ("full", True, 7_330_478), ("full", False, 13_986_078),
    ("adaptive", True, 7_355_680), ("adaptive", False, 9_062_616)])
def test_num_parameters_counts_the_keras_models_weights(softmax, tied, count):
    """What the training log and the model card report (LMConfig.num_parameters) is the built
    model's count_params, tied weights once: standard_lstm_lm_200 at WikiText-2's 33,278 words,
    the adaptive softmax at its default cutoffs (5,000 and 15,000; the README's figures)."""
    from keraslm.config import preset_config
    from keraslm.model import build_model

    output = ({"softmax": "adaptive", "cutoffs": default_cutoffs(33_278)}
              if softmax == "adaptive" else {})
    config = preset_config("standard_lstm_lm_200", 33_278, tied=tied, **output)
    assert config.num_parameters() == build_model(config).count_params() == count


@pytest.mark.parametrize("vocab, cutoffs", [
    (33_278, (5_000, 15_000)), (10_002, (5_000,)), (267_735, (5_000, 15_000, 50_000)),
    (500_000, (5_000, 15_000, 50_000, 250_000)), (30_000, (5_000, 15_000)),
    (29_999, (5_000,)), (10_000, (5_000,)), (9_999, (2_000,)), (4_000, (2_000,)), (3_999, ()),
    (500, ())])
def test_default_cutoffs(vocab, cutoffs):
    assert default_cutoffs(vocab) == cutoffs


@pytest.mark.parametrize("cutoffs, div, message", [
    ((10, 10), 2.0, "must increase"), ((30, 10), 2.0, "must increase"),
    ((0, 10), 2.0, "must increase"), ((10, VOCAB), 2.0, "must increase"),
    ((10, 20, 30, 40, 45), 2.0, "to none"), ((10,), 0.0, "div-value must be positive")])
def test_bad_cutoffs_are_refused(cutoffs, div, message):
    with pytest.raises(UserError, match=message):
        check_cutoffs(cutoffs, VOCAB, HIDDEN, div)


def test_tied_layer_reads_its_output_vectors_from_the_embedding():
    """Tied: the head's word columns are the embedding's first rows, and tail i's output matrix
    is its words' embedding rows through the tail's own projection Q_i."""
    embedding = keras.layers.Embedding(VOCAB, HIDDEN)
    embedding.build((None,))
    tied = AdaptiveSoftmax(VOCAB, CUTOFFS, DIV, embedding=embedding)
    tied.build((None, HIDDEN))
    rng = np.random.default_rng(9)
    for weight in [*tied.weights, embedding.embeddings]:
        weight.assign(rng.normal(0, 0.5, weight.shape).astype(np.float32))
    table = embedding.embeddings.numpy()
    head = np.concatenate([table[:CUTOFFS[0]].T, tied.clusters.numpy()], axis=1)
    hidden = rng.normal(size=(6, HIDDEN)).astype(np.float32)
    head_lp = log_softmax(hidden @ head)
    bounds = (0, *CUTOFFS, VOCAB)
    want = [head_lp[:, :CUTOFFS[0]]]
    for i in range(len(CUTOFFS)):
        output = (table[bounds[i + 1]:bounds[i + 2]] @ tied.outputs[i].numpy()).T
        tail = log_softmax(hidden @ tied.projections[i].numpy() @ output)
        want.append(head_lp[:, CUTOFFS[0] + i:CUTOFFS[0] + i + 1] + tail)
    got = tied.log_probs(tf.constant(hidden)).numpy()
    np.testing.assert_allclose(got, np.concatenate(want, axis=1), atol=1e-4)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)
    targets = tf.constant(rng.integers(0, VOCAB, 6), tf.int32)
    picked = np.take_along_axis(got, targets.numpy()[:, None], axis=1)[:, 0]
    assert tied.nll_sum(tf.constant(hidden), targets).numpy() == pytest.approx(-picked.sum(),
                                                                             rel=1e-5)
    assert embedding.embeddings.shape == (VOCAB, HIDDEN)  # no copy of the table in the layer
    assert {w.name for w in tied.weights} == {"embeddings", "clusters", "tail1_projection",
                                             "tail1_embedding_projection", "tail2_projection",
                                             "tail2_embedding_projection"}
