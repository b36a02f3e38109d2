"""Profile: where the milliseconds of one training step go, side by side across LSTM
implementations and compute precisions.

    python bench/profile_step.py [--max-vocab N] [--softmax full|adaptive]
                                 [--columns fused/fp32,fused/bf16] [--repeats 5] [--rounds 5]

standard_lstm_lm_200 (batch 20, bptt 35, dropout on, one replica) on WikiText-2 ids. A column is
`LSTM/precision`: LSTM `keras` (Keras' generic LSTM) or `fused` (FusedLSTM), precision `fp32` or
`bf16`. Each part is its own `tf.function`, timed alone:

  features fwd          embedding, dropout and the two LSTMs, forward
  features fwd+bwd      the same with the gradient of every variable they use
  decoder matmuls       (full softmax) the decoder's three matmuls alone, [N, H] x [H, V] and its
                        two gradient products, in the decoder's compute dtype
  decoder+loss fwd+bwd  the decoder and its cross-entropy on fixed features, with gradients
  forward+backward      the whole model's loss and gradients (what the trainer's tape does)
  train step            Trainer.train_step: the above plus the all-reduce, the clipping norm,
                        SGD, and the tf.distribute plumbing

"the rest" is the train step minus forward+backward. The machine may be shared, so the columns
are timed in turn, part by part, for --rounds rounds of --repeats calls each, and the best round
is kept: a noisy neighbour slows every column alike rather than whichever ran last. Two clocks:
wall time, and this process's CPU time (all threads; less moved by a neighbour taking a core,
but it counts the thread pools' spinning).
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
from bench.common import matmul_peak

BATCH, BPTT = 20, 35
LSTMS = {"keras": False, "fused": True}


def cpu_flags() -> str:
    """The CPU's model name and its AVX-512 / AMX / bf16 flags, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo")
    text = info.read_text(errors="replace") if info.is_file() else ""
    name = next((line.partition(":")[2].strip() for line in text.splitlines()
                 if line.startswith("model name")), "?")
    flags = next((line.partition(":")[2].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx")) or "bf16" in f)
    return f"{name}; {os.cpu_count()} cores; {' '.join(wanted) or 'no AVX-512'}"


def timed_ms(fn, repeats: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per call of `fn`."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return ((time.perf_counter() - started) / repeats * 1000,
            (time.process_time() - cpu) / repeats * 1000)


def parts(ids: np.ndarray, vocab_size: int, fused_lstm: bool, precision: str,
          softmax: str, div_value: float | None = None) -> dict:
    """The parts of one configuration's training step, each a callable to time."""
    from keraslm.backend import tf
    from keraslm.batching import BPTTBatches
    from keraslm.config import default_cutoffs, default_div_value
    from keraslm.losses import decoder_nll_sum
    from keraslm.model import build_model, full_decoder_weights, preset_config
    from keraslm.training.devices import make_strategy
    from keraslm.training.step import Trainer, make_optimizer, noise_keys

    strategy = make_strategy()
    adaptive = ({"softmax": "adaptive", "cutoffs": default_cutoffs(vocab_size),
                 "div_value": default_div_value(True) if div_value is None else div_value}
                if softmax == "adaptive" else {})
    config = preset_config("standard_lstm_lm_200", vocab_size, **adaptive)
    with strategy.scope():
        model = build_model(config, seed=0, fused=fused_lstm, precision=precision)
        optimizer = make_optimizer("sgd", 1.0)
    trainer = Trainer(model, optimizer, strategy, clip=0.25, two_biases=config.two_biases)
    inputs, targets = BPTTBatches(ids, BATCH, BPTT, "discard")[0]
    keys = noise_keys(0, 0, 0, BATCH)
    zeros = [tf.zeros((BATCH, size)) for size in config.state_sizes()]
    x = [tf.constant(inputs), tf.constant(keys), *zeros]
    decoder_vars = {id(v) for v in trainer.decoder.trainable_variables}
    feature_vars = [v for v in model.trainable_variables if id(v) not in decoder_vars]
    hidden_dtype = trainer.features.outputs[0].dtype  # what the decoder is handed in training
    hidden = tf.cast(tf.random.normal((BATCH, BPTT, config.emsize)), hidden_dtype)
    upstream = tf.cast(tf.random.normal((BATCH, BPTT, config.emsize)), hidden_dtype)
    t = tf.constant(targets)
    count = tf.constant(float(np.count_nonzero(targets >= 0)))

    def features_fwd():
        return trainer.features(x, training=True)[0]

    def features_fwd_bwd():
        with tf.GradientTape() as tape:
            out = trainer.features(x, training=True)[0]
            loss = tf.reduce_sum(tf.cast(out * upstream, tf.float32))
        return tape.gradient(loss, feature_vars)

    def decoder_fwd_bwd():
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = decoder_nll_sum(trainer.decoder, hidden, t)
        return tape.gradient(loss, [hidden, *trainer.decoder.trainable_variables])

    def forward_backward():
        return trainer._forward_backward(x[0], t, x[1], tuple(zeros), count)

    def on_replica(fn):  # the model's variables are mirrored: use them in a replica context
        return tf.function(lambda: strategy.run(fn))

    state = trainer.zero_state(BATCH)
    found = {"features fwd": on_replica(features_fwd),
             "features fwd+bwd": on_replica(features_fwd_bwd)}
    if softmax == "full":
        kernel, _, transposed = full_decoder_weights(trainer.decoder)
        dtype = trainer.decoder.compute_dtype
        flat = tf.cast(tf.reshape(hidden, (-1, config.emsize)), dtype)
        grad = tf.cast(tf.random.normal((BATCH * BPTT, vocab_size)), dtype)

        def decoder_matmuls():
            weight = tf.cast(kernel, dtype)
            return (tf.matmul(flat, weight, transpose_b=transposed),
                    tf.matmul(grad, weight, transpose_b=not transposed),
                    tf.matmul(grad, flat, transpose_a=True) if transposed
                    else tf.matmul(flat, grad, transpose_a=True))

        found["decoder matmuls"] = on_replica(decoder_matmuls)
    found["decoder+loss fwd+bwd"] = on_replica(decoder_fwd_bwd)
    found["forward+backward"] = on_replica(forward_backward)
    found["train step"] = lambda: trainer.train_step(inputs, targets, keys, state)
    with strategy.scope():
        for fn in found.values():
            fn()  # trace and warm up
            fn()
    return {"strategy": strategy, "parts": found}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-vocab", type=int, default=None)
    p.add_argument("--softmax", choices=("full", "adaptive"), default="full")
    p.add_argument("--div-value", type=float, default=None,
                   help="the adaptive softmax's (default: keraslm's for a tied model, 1)")
    p.add_argument("--columns", default="fused/fp32,fused/bf16",
                   help="LSTM/precision pairs, comma-separated: keras or fused, fp32 or bf16")
    p.add_argument("--repeats", type=int, default=3, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=10, help="rounds; the best is kept")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    ids, vocab_size = wikitext_ids(args.data_root, 2 * BATCH * BPTT + BATCH, args.max_vocab)
    load = os.getloadavg()[0]
    peak, peak_source = matmul_peak()
    columns = {}
    for name in args.columns.split(","):
        lstm, precision = name.split("/")
        columns[name] = parts(ids, vocab_size, LSTMS[lstm], precision, args.softmax,
                              args.div_value)
    wall, cpu = ({name: {} for name in columns} for _ in range(2))
    for _ in range(args.rounds):
        for part in next(iter(columns.values()))["parts"]:
            for name, column in columns.items():
                if part in column["parts"]:
                    with column["strategy"].scope():
                        ms = timed_ms(column["parts"][part], args.repeats)
                    for best, value in zip((wall, cpu), ms):
                        best[name][part] = min(best[name].get(part, value), value)
    peak, peak_source = max((peak, peak_source), matmul_peak())
    for times in (*wall.values(), *cpu.values()):
        times["the rest"] = times["train step"] - times["forward+backward"]
    print(f"CPU: {cpu_flags()}")
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s ({peak_source}); load average {load:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after")
    softmax = (f"adaptive softmax (default cutoffs, div_value "
               f"{1.0 if args.div_value is None else args.div_value:g})"
               if args.softmax == "adaptive" else "full softmax")
    print(f"standard_lstm_lm_200, vocab {vocab_size:,}, {softmax}, batch {BATCH}, "
          f"bptt {BPTT}; ms per call, best of {args.rounds} rounds x {args.repeats}, columns "
          f"interleaved")
    for clock, best in (("wall ms", wall), ("CPU ms", cpu)):
        print(f"{clock:<24}" + "".join(f"{name:>14}" for name in columns))
        for part in best[next(iter(best))]:
            print(f"{part:<24}" + "".join(f"{t[part]:>14.1f}" if part in t else f"{'-':>14}"
                                          for t in best.values()))
    print(f"{'tokens/s (wall)':<24}" + "".join(
        f"{BATCH * BPTT / t['train step'] * 1000:>14,.0f}" for t in wall.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
