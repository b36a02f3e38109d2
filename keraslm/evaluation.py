"""Perplexity of a model over BPTT batches: the evaluator training and `keraslm.evaluate` share.

Every token is scored (BPTT columns with `last_batch='keep'` and masking); the LSTM state starts
at zero and is carried from batch to batch.
"""

from __future__ import annotations

import time

import numpy as np

from keraslm.backend import keras, tf
from keraslm.batching import PAD_TARGET, BPTTBatches
from keraslm.data import corpus_format, encode_file, resolve_paths
from keraslm.losses import decoder_nll_sum
from keraslm.model import split_decoder, state_sizes
from keraslm.rundir import RunDir, resolve_run
from keraslm.runs import load_run_model
from keraslm.scores import CorpusScore
from keraslm.text import TextPipeline, pipeline_for_format, use_data_root


class Evaluator:
    """Sum of NLL and number of targets over BPTT batches, state carried from a zero start.

    Runs on the default device outside `strategy.run`: evaluation needs no gradients, and this
    way any batch size works whatever the number of replicas.
    """

    def __init__(self, model: keras.Model, *, jit_compile: bool = False,
                 fused_decoder: bool = True):
        self.model = model
        self.fused_decoder = fused_decoder
        self.features, self.decoder = split_decoder(model)
        self.state_sizes = state_sizes(model)  # h and c of every layer, each its layer's width
        self._step = tf.function(self._step_impl, jit_compile=jit_compile)

    def _step_impl(self, inputs, targets, state):
        keys = tf.zeros(tf.shape(inputs)[:1], tf.int32)
        if not self.fused_decoder:
            logits, *new_state = self.model([inputs, keys, *state], training=False)
            return masked_nll_sum(logits, targets), tuple(new_state)
        hidden, *new_state = self.features([inputs, keys, *state], training=False)
        return decoder_nll_sum(self.decoder, hidden, targets), tuple(new_state)

    def __call__(self, batches) -> tuple[float, int]:
        """(sum of NLL, number of targets) over `batches`, an iterable of (inputs, targets)."""
        state = None
        nll_total, count = 0.0, 0
        for inputs, targets in batches:
            if state is None:
                state = tuple(tf.zeros((len(inputs), size)) for size in self.state_sizes)
            nll, state = self._step(tf.constant(inputs), tf.constant(targets), state)
            nll_total += float(nll)
            count += int(np.count_nonzero(targets != PAD_TARGET))
        return nll_total, count


def masked_nll_sum(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Sum of token NLL over non-padding targets (padding is masked before the loss op)."""
    mask = tf.not_equal(targets, PAD_TARGET)
    safe_targets = tf.where(mask, targets, tf.zeros_like(targets))
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_targets, logits=logits)
    return tf.reduce_sum(tf.where(mask, nll, tf.zeros_like(nll)))


def evaluate_run(run: RunDir | str | None, source: str, split: str = "valid", *,
                 batch_size: int = 10, bptt: int = 35, data_root: str | None = None,
                 fmt: str | None = None, moses_tutorial: bool = False, runs_root: str = "runs",
                 jit_compile: bool = False) -> CorpusScore:
    """Perplexity of `run`'s best weights on a corpus split or a file, with the run's vocab.

    A named corpus is read with its own text format; your own file is read as the run's corpus
    was, unless `fmt` or `moses_tutorial` say otherwise.
    """
    run = run if isinstance(run, RunDir) else resolve_run(run, runs_root)
    model, config = load_run_model(run)
    vocab = run.read_vocab(config.vocab_size)
    run_pipeline = TextPipeline.from_dict(run.read_config()["pipeline"])
    pipeline = pipeline_for_format(corpus_format(source, fmt), moses_tutorial,
                                   inherited=run_pipeline)
    path = resolve_paths(None, {split: source}, data_root, splits=(split,))[split]
    if data_root:
        use_data_root(data_root)
    encoded = encode_file(split, path, pipeline, vocab)
    batches = BPTTBatches(encoded.ids, batch_size, bptt, "keep")
    started = time.perf_counter()
    nll_sum, count = Evaluator(model, jit_compile=jit_compile)(batches)
    return CorpusScore(source=str(path), model=str(run.path), pipeline=pipeline.describe(),
                       runtime="tensorflow", batch_size=batch_size, bptt=bptt,
                       num_stream_tokens=encoded.num_tokens, num_tokens=count,
                       num_oov=encoded.num_oov, num_unk=None, nll_sum=nll_sum, nll_sum_unk=None,
                       seconds=time.perf_counter() - started)
