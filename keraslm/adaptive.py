"""The adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs"), with the
semantics of PyTorch's `nn.AdaptiveLogSoftmaxWithLoss`: exact, normalised log-probabilities at a
fraction of a full softmax's cost for a large vocabulary.

The vocabulary, in frequency order (keraslm's `Vocab` keeps its words so after the specials), is
cut at `cutoffs` into a head, the `cutoffs[0]` most frequent words, and tail clusters
`[cutoffs[i-1], cutoffs[i])`, the last ending at the vocabulary's size. The head scores its words
plus one logit per tail cluster; tail cluster i (from 1) first projects the hidden state to
`hidden_size // div_value**i` units, then scores its words. So

    log p(w) = log softmax(head)[w]                                   for a head word
    log p(w) = log softmax(head)[cluster(w)] + log softmax(tail)[w]   for a tail word

and every row of `log_probs` sums to 1. `nll_sum`, the training loss, runs each tail only on the
rows whose target falls in it. As PyTorch's by default, no layer here has a bias.

This module is the building block of issue 24's `--softmax adaptive`; the model, training, export
and scoring do not use it yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from keraslm.backend import keras, tf
from keraslm.batching import PAD_TARGET

FIRST_CUTOFFS = (2_000, 10_000, 50_000, 250_000)  # candidates for default_cutoffs


def default_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """The cutoffs used when none are given: those of FIRST_CUTOFFS up to half the vocabulary,
    so the words past the last cutoff are at least as many (33,278 words: 2,000 and 10,000, the
    PyTorch baseline's; 10,002: 2,000, as that baseline's too; 267,735: 2,000, 10,000 and
    50,000; under 4,000: none, a plain softmax). Provisional: issue 24 asks for the defaults
    that keep the 3-epoch perplexity within 5 % of the full softmax's."""
    return tuple(c for c in FIRST_CUTOFFS if 2 * c <= vocab_size)


def check_cutoffs(cutoffs: Sequence[int], vocab_size: int, hidden_size: int,
                  div_value: float) -> tuple[int, ...]:
    """`cutoffs` as a tuple, or ValueError: increasing, each in [1, vocab_size), and every tail
    projection at least one unit wide."""
    cutoffs = tuple(int(c) for c in cutoffs)
    if any(b <= a for a, b in pairwise(cutoffs)) or (
            cutoffs and not 0 < cutoffs[0] <= cutoffs[-1] < vocab_size):
        raise ValueError(f"cutoffs must increase within (0, {vocab_size}), got {list(cutoffs)}")
    if div_value <= 0:
        raise ValueError(f"div_value must be positive, got {div_value}")
    if cutoffs and hidden_size // div_value ** len(cutoffs) < 1:
        raise ValueError(f"the last tail of {len(cutoffs)} would project {hidden_size} units to "
                         f"none (div_value {div_value:g}); use fewer cutoffs or a smaller "
                         f"div_value")
    return cutoffs


@keras.saving.register_keras_serializable("keraslm")
class AdaptiveSoftmax(keras.layers.Layer):
    """The head and tail weights over a vocabulary of `vocab_size` words (see the module doc).

    `call(hidden)` is `log_probs(hidden)`: [..., H] -> [..., vocab_size]."""

    def __init__(self, vocab_size: int, cutoffs: Sequence[int], div_value: float = 4.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.div_value = int(vocab_size), float(div_value)
        self.cutoffs = tuple(int(c) for c in cutoffs)

    def build(self, input_shape):
        hidden = int(input_shape[-1])
        self.cutoffs = check_cutoffs(self.cutoffs, self.vocab_size, hidden, self.div_value)
        bounds = (*self.cutoffs, self.vocab_size)
        self.head = self.add_weight(name="head", shape=(hidden, bounds[0] + len(self.cutoffs)),
                                    initializer="glorot_uniform")
        self.projections, self.outputs = [], []
        for i, (start, end) in enumerate(pairwise(bounds), 1):
            width = int(hidden // self.div_value ** i)
            self.projections.append(self.add_weight(
                name=f"tail{i}_projection", shape=(hidden, width), initializer="glorot_uniform"))
            self.outputs.append(self.add_weight(
                name=f"tail{i}_output", shape=(width, end - start), initializer="glorot_uniform"))

    @property
    def shortlist(self) -> int:
        """Words the head scores itself (the rest of its logits are the clusters')."""
        return self.cutoffs[0] if self.cutoffs else self.vocab_size

    def _tail_log_probs(self, i: int, hidden: tf.Tensor) -> tf.Tensor:
        projected = tf.matmul(hidden, self.projections[i])
        return tf.nn.log_softmax(tf.matmul(projected, self.outputs[i]))

    def log_probs(self, hidden: tf.Tensor) -> tf.Tensor:
        """The full log-distribution over the vocabulary, [..., H] -> [..., vocab_size]."""
        flat = tf.reshape(hidden, [-1, hidden.shape[-1]])
        head = tf.nn.log_softmax(tf.matmul(flat, self.head))
        parts = [head[:, :self.shortlist]]
        for i in range(len(self.cutoffs)):
            cluster = head[:, self.shortlist + i:self.shortlist + i + 1]
            parts.append(cluster + self._tail_log_probs(i, flat))
        out = tf.concat(parts, axis=1)
        return tf.reshape(out, tf.concat([tf.shape(hidden)[:-1], [self.vocab_size]], axis=0))

    def call(self, hidden):
        return self.log_probs(hidden)

    def nll_sum(self, hidden: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """Sum over the non-padding targets of -log p(target): the head on every row, each tail
        only on the rows whose target falls in it. `hidden` [..., H], `targets` [...]."""
        flat = tf.reshape(hidden, [-1, hidden.shape[-1]])
        targets = tf.reshape(targets, [-1])
        rows = tf.where(targets != PAD_TARGET)[:, 0]
        flat, targets = tf.gather(flat, rows), tf.gather(targets, rows)
        head = tf.nn.log_softmax(tf.matmul(flat, self.head))
        # a head word is its own head column; a tail word reads its cluster's column
        bounds = (*self.cutoffs, self.vocab_size)
        cluster = tf.searchsorted(tf.constant(self.cutoffs or (self.vocab_size,), targets.dtype),
                                  targets, side="right")  # 0: the head, i: tail i
        column = tf.where(cluster == 0, targets, self.shortlist + cluster - 1)
        nll = -tf.reduce_sum(tf.gather(head, column[:, None], batch_dims=1))
        for i, start in enumerate(bounds[:-1]):
            inside = tf.where(cluster == i + 1)[:, 0]
            words = tf.gather(targets, inside) - start
            tail = self._tail_log_probs(i, tf.gather(flat, inside))
            nll -= tf.reduce_sum(tf.gather(tail, words[:, None], batch_dims=1))
        return nll

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "cutoffs": list(self.cutoffs), "div_value": self.div_value}
