"""Profile: where the milliseconds of one training step go, Keras' LSTM against FusedLSTM.

    python bench/profile_step.py [--max-vocab N] [--repeats 20]

standard_lstm_lm_200 (batch 20, bptt 35, fp32, dropout on, one replica) on WikiText-2 ids. Each
part is its own `tf.function`, timed alone (best of three rounds of --repeats calls):

  features fwd          embedding, dropout and the two LSTMs, forward
  features fwd+bwd      the same with the gradient of every variable they use
  decoder+loss fwd+bwd  the fused decoder and cross-entropy on fixed features, with gradients
  forward+backward      the whole model's loss and gradients (what the trainer's tape does)
  train step            Trainer.train_step: the above plus the all-reduce, the clipping norm,
                        SGD, and the tf.distribute plumbing

"the rest" is the train step minus forward+backward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import wikitext_ids

BATCH, BPTT = 20, 35


def best_ms(fn, repeats: int) -> float:
    fn()  # trace and warm up
    rounds = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - started) / repeats * 1000)
    return min(rounds)


def profile(ids: np.ndarray, vocab_size: int, fused_lstm: bool, repeats: int) -> dict[str, float]:
    from keraslm.backend import tf
    from keraslm.batching import BPTTBatches
    from keraslm.losses import full_softmax_nll_sum
    from keraslm.model import full_decoder_weights
    from keraslm.model import build_model, preset_config
    from keraslm.training.devices import make_strategy
    from keraslm.training.step import Trainer, make_optimizer, noise_keys

    strategy = make_strategy()
    config = preset_config("standard_lstm_lm_200", vocab_size)
    with strategy.scope():
        model = build_model(config, seed=0, fused=fused_lstm)
        optimizer = make_optimizer("sgd", 1.0)
    trainer = Trainer(model, optimizer, strategy, clip=0.25, two_biases=config.two_biases)
    inputs, targets = BPTTBatches(ids, BATCH, BPTT, "discard")[0]
    keys = noise_keys(0, 0, 0, BATCH)
    zeros = [tf.zeros((BATCH, config.nhid)) for _ in config.state_names()]
    x = [tf.constant(inputs), tf.constant(keys), *zeros]
    kernel, bias, transposed = full_decoder_weights(trainer.decoder)
    feature_vars = [v for v in model.trainable_variables if v is not bias]
    hidden = tf.random.normal((BATCH, BPTT, config.emsize))
    upstream = tf.random.normal((BATCH, BPTT, config.emsize))
    t = tf.constant(targets)

    def features_fwd():
        return trainer.features(x, training=True)[0]

    def features_fwd_bwd():
        with tf.GradientTape() as tape:
            out = trainer.features(x, training=True)[0]
            loss = tf.reduce_sum(out * upstream)
        return tape.gradient(loss, feature_vars)

    def decoder_fwd_bwd():
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = full_softmax_nll_sum(hidden, kernel, bias, t, transposed_kernel=transposed)
        return tape.gradient(loss, [hidden, kernel, bias])

    def forward_backward():
        return trainer._forward_backward(x[0], t, x[1], tuple(zeros), count)

    def on_replica(fn):  # the model's variables are mirrored: use them in a replica context
        return tf.function(lambda: strategy.run(fn))

    count = tf.constant(float(np.count_nonzero(targets >= 0)))
    state = trainer.zero_state(BATCH)
    with strategy.scope():
        parts = {
            "features fwd": best_ms(on_replica(features_fwd), repeats),
            "features fwd+bwd": best_ms(on_replica(features_fwd_bwd), repeats),
            "decoder+loss fwd+bwd": best_ms(on_replica(decoder_fwd_bwd), repeats),
            "forward+backward": best_ms(on_replica(forward_backward), repeats),
            "train step": best_ms(lambda: trainer.train_step(inputs, targets, keys, state),
                                  repeats),
        }
    parts["the rest"] = parts["train step"] - parts["forward+backward"]
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-vocab", type=int, default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    ids, vocab_size = wikitext_ids(args.data_root, 2 * BATCH * BPTT + BATCH, args.max_vocab)
    columns = {"Keras LSTM": profile(ids, vocab_size, False, args.repeats),
               "FusedLSTM": profile(ids, vocab_size, True, args.repeats)}
    print(f"standard_lstm_lm_200, vocab {vocab_size:,}, batch {BATCH}, bptt {BPTT}, fp32; "
          f"ms per call, best of 3 x {args.repeats}")
    print(f"{'part':<24}" + "".join(f"{name:>14}" for name in columns))
    for part in next(iter(columns.values())):
        print(f"{part:<24}" + "".join(f"{c[part]:>14.1f}" for c in columns.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
