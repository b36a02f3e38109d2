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
rows whose target falls in it. As PyTorch's by default, no layer has a bias unless `use_bias`
(what keraslm's models use, as their full softmax has one): one per head logit and tail word.

Tying: given the model's embedding E, the head's word rows *are* the embedding's rows of the
head words, and tail i's output matrix is its words' embedding rows projected to the tail's
width, (E[start:end] @ Q_i)^T with Q_i [H, width] learned (with `div_value` 1, a tail as wide
as the hidden state, E[start:end]^T itself): every word's output vector comes from its input
embedding, as with a tied full softmax, at the tail's rank. Only the cluster
logits and the projections are weights of their own. Untied, the head and tails own all their
weights, as PyTorch's layer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from keraslm.backend import keras, tf
from keraslm.batching import PAD_TARGET
from keraslm.config import check_cutoffs, default_cutoffs, tail_widths

__all__ = ["AdaptiveSoftmax", "check_cutoffs", "default_cutoffs"]


@tf.function(jit_compile=True)
def _masked_cross_entropy_sum(logits: tf.Tensor, labels: tf.Tensor,
                              weights: tf.Tensor) -> tf.Tensor:
    """sum(weights * -log softmax(logits)[labels]), with its gradient, compiled by XLA into a
    pass or two over the logits (TensorFlow's own sparse cross-entropy kernel is slower on CPU
    than the head's matmul). The head's shape is fixed by the batch; the tails', which vary with
    the targets, are not compiled."""
    lse = tf.reduce_logsumexp(logits, axis=1)
    picked = tf.gather(logits, labels[:, None], batch_dims=1)[:, 0]
    return tf.reduce_sum(weights * (lse - picked))


@keras.saving.register_keras_serializable("keraslm")
class AdaptiveSoftmax(keras.layers.Layer):
    """The head and tail weights over a vocabulary of `vocab_size` words (see the module doc).

    `call(hidden)` is `log_probs(hidden)`: [..., H] -> [..., vocab_size], float32 whatever the
    compute dtype. With `embedding` (a Keras Embedding of width H) the head's word rows are tied
    to its first `cutoffs[0]` rows."""

    def __init__(self, vocab_size: int, cutoffs: Sequence[int], div_value: float = 4.0,
                 embedding: keras.layers.Embedding | None = None, seed: int | None = None,
                 use_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.div_value = int(vocab_size), float(div_value)
        self.cutoffs = tuple(int(c) for c in cutoffs)
        self.embedding = embedding
        self.seed = seed
        self.use_bias = bool(use_bias)

    def _glorot(self, offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(None if self.seed is None else self.seed + offset)

    def build(self, input_shape):
        hidden = int(input_shape[-1])
        self.cutoffs = check_cutoffs(self.cutoffs, self.vocab_size, hidden, self.div_value)
        bounds = (*self.cutoffs, self.vocab_size)
        clusters = len(self.cutoffs)
        if self.embedding is None:
            self.head = self.add_weight(name="head", shape=(hidden, bounds[0] + clusters),
                                        initializer=self._glorot(0))
        elif clusters:
            self.clusters = self.add_weight(name="clusters", shape=(hidden, clusters),
                                            initializer=self._glorot(0))
        self.projections, self.outputs = [], []
        widths = tail_widths(hidden, self.cutoffs, self.div_value)
        for i, ((start, end), width) in enumerate(zip(pairwise(bounds), widths), 1):
            self.projections.append(self.add_weight(
                name=f"tail{i}_projection", shape=(hidden, width), initializer=self._glorot(2 * i - 1)))
            if self.embedding is None:
                self.outputs.append(self.add_weight(name=f"tail{i}_output",
                                                    shape=(width, end - start),
                                                    initializer=self._glorot(2 * i)))
            elif width == hidden:  # the tail's words' embedding rows themselves
                self.outputs.append(None)
            else:  # the tail's words' embedding rows, projected to the tail's width
                self.outputs.append(self.add_weight(name=f"tail{i}_embedding_projection",
                                                    shape=(hidden, width),
                                                    initializer=self._glorot(2 * i)))
        # one bias per logit, as the full softmax's decoder has (never autocast: float32)
        sizes = [bounds[0] + clusters] + [end - start for start, end in pairwise(bounds)]
        self.biases = [self.add_weight(name="head_bias" if i == 0 else f"tail{i}_bias",
                                       shape=(size,), initializer="zeros", autocast=False)
                       for i, size in enumerate(sizes)] if self.use_bias else []

    @property
    def shortlist(self) -> int:
        """Words the head scores itself (the rest of its logits are the clusters')."""
        return self.cutoffs[0] if self.cutoffs else self.vocab_size

    def output_weights(self) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """The head's [H, shortlist + clusters] matrix and each tail's [width, size] output
        (tied: the head's embedding rows transposed beside the cluster columns, tail i
        (E[a:b] @ Q_i)^T)."""
        head, tails, word_major = self._rows_first_weights()
        if not word_major:
            return head, tails
        return tf.transpose(head), [tf.transpose(t) for t in tails]

    def _rows_first_weights(self) -> tuple[tf.Tensor, list[tf.Tensor], bool]:
        """The output weights as the training step reads them: tied, word-major (the head
        [shortlist + clusters, H], tail i [size, width]) from one split of the embedding, read
        by the matmuls with `transpose_b`, so neither the embedding's rows nor their gradient
        are copied transposed, and the gradient is one concatenation. The last item says
        whether they are word-major."""
        if self.embedding is None:
            return self.head, list(self.outputs), False
        bounds = (0, *self.cutoffs, self.vocab_size)
        rows = tf.split(self.embedding.embeddings, [b - a for a, b in pairwise(bounds)])
        head = rows[0]
        if self.cutoffs:
            head = tf.concat([head, tf.transpose(self.clusters)], axis=0)
        tails = [r if q is None else tf.matmul(r, q) for r, q in zip(rows[1:], self.outputs)]
        return head, tails, True

    def _head_logits(self, flat: tf.Tensor, head: tf.Tensor, word_major: bool = False
                     ) -> tf.Tensor:
        logits = tf.matmul(flat, tf.cast(head, flat.dtype), transpose_b=word_major)
        logits = tf.cast(logits, "float32")
        return logits + self.biases[0] if self.use_bias else logits

    def _tail_logits(self, i: int, flat: tf.Tensor, output: tf.Tensor,
                     word_major: bool = False) -> tf.Tensor:
        projected = tf.matmul(flat, tf.cast(self.projections[i], flat.dtype))
        logits = tf.matmul(projected, tf.cast(output, flat.dtype), transpose_b=word_major)
        logits = tf.cast(logits, "float32")
        return logits + self.biases[i + 1] if self.use_bias else logits

    def _clusters_of(self, targets: tf.Tensor) -> tf.Tensor:
        """0 for a head word, i for a word of tail i (a sum of comparisons, not searchsorted,
        which ONNX has no op for)."""
        cluster = tf.zeros_like(targets)
        for cutoff in self.cutoffs:
            cluster += tf.cast(targets >= cutoff, targets.dtype)
        return cluster

    def log_probs(self, hidden: tf.Tensor) -> tf.Tensor:
        """The full log-distribution over the vocabulary, [..., H] -> [..., vocab_size]."""
        flat = tf.reshape(hidden, [-1, hidden.shape[-1]])
        head_weight, tails = self.output_weights()
        head = tf.nn.log_softmax(self._head_logits(flat, head_weight))
        parts = [head[:, :self.shortlist]]
        for i, output in enumerate(tails):
            cluster = head[:, self.shortlist + i:self.shortlist + i + 1]
            parts.append(cluster + tf.nn.log_softmax(self._tail_logits(i, flat, output)))
        out = tf.concat(parts, axis=1)
        return tf.reshape(out, tf.concat([tf.shape(hidden)[:-1], [self.vocab_size]], axis=0))

    def call(self, hidden):
        return self.log_probs(hidden)

    def target_log_probs(self, hidden: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """log p(target) of each row, [N, H] and [N] (every target a word) -> [N]: the head's
        log-softmax on every row, each tail's only on the rows whose target is in it.

        Indices are (row, word) pairs, never a flat row * width + word, so no int32 product can
        wrap however many rows one call holds."""
        targets = tf.cast(targets, tf.int32)
        head_weight, tails = self.output_weights()
        head = tf.nn.log_softmax(self._head_logits(hidden, head_weight))
        cluster = self._clusters_of(targets)
        column = tf.where(cluster == 0, targets, self.shortlist + cluster - 1)
        rows = tf.range(tf.shape(targets)[0])
        picked = tf.gather_nd(head, tf.stack([rows, column], axis=1))
        bounds = (*self.cutoffs, self.vocab_size)
        for i, start in enumerate(bounds[:-1]):
            inside = tf.cast(tf.where(cluster == i + 1)[:, 0], tf.int32)
            tail = tf.nn.log_softmax(self._tail_logits(i, tf.gather(hidden, inside), tails[i]))
            words = tf.gather(targets, inside) - start
            within = tf.gather_nd(tail, tf.stack([tf.range(tf.shape(inside)[0]), words], axis=1))
            picked = tf.tensor_scatter_nd_add(picked, inside[:, None], within)
        return picked

    def nll_sum(self, hidden: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """Sum over the non-padding targets of -log p(target): the head on every row, each tail
        only on the rows whose target falls in it. `hidden` [..., H], `targets` [...]."""
        flat = tf.reshape(hidden, [-1, hidden.shape[-1]])
        targets = tf.reshape(targets, [-1])
        is_target = targets != PAD_TARGET
        targets = tf.where(is_target, targets, tf.zeros_like(targets))  # padding: a head word
        cluster = self._clusters_of(targets)
        # a head word is its own head column; a tail word is its cluster's column
        column = tf.where(cluster == 0, targets, self.shortlist + cluster - 1)
        head_weight, tails, word_major = self._rows_first_weights()
        nll = _masked_cross_entropy_sum(self._head_logits(flat, head_weight, word_major),
                                        column, tf.cast(is_target, tf.float32))
        bounds = (*self.cutoffs, self.vocab_size)
        for i, start in enumerate(bounds[:-1]):
            inside = tf.where(cluster == i + 1)[:, 0]
            nll += tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.gather(targets, inside) - start,
                logits=self._tail_logits(i, tf.gather(flat, inside), tails[i], word_major)))
        return nll

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "cutoffs": list(self.cutoffs), "div_value": self.div_value,
                "use_bias": self.use_bias}
