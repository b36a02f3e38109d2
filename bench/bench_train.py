"""Benchmark: training tokens/s of standard_lstm_lm_200 (batch 20, bptt 35) vs the PyTorch example.

    python bench/bench_train.py [--batches 30] [--variants fused,keras-lstm,fused+jit,unfused]
                                [--max-vocab N] [--no-torch]

Times the real `keraslm.training.step.Trainer` step (fp32, full softmax, SGD, global-norm clipping,
carried state, dropout) on the first WikiText-2 training batches, and the PyTorch
`word_language_model` equivalent (bench/torch_word_lm.py, in its own process) on the same ids,
in the same run, with its full softmax and with PyTorch's adaptive softmax (issue 24's baseline;
`--torch-python` names a Python that has torch, if this one has not). Prints tokens/s, achieved GFLOP/s (3x the forward FLOPs: forward + backward)
and that as a fraction of the machine's measured fp32 matmul peak (measured before and after,
the higher kept). `--max-vocab 10000` keeps the 10,000 most frequent words (the rest <unk>): the
regime where the LSTM recurrence, not the decoder, is most of the step. Variants:
  fused       the default: FusedLSTM (TensorFlow's BlockLSTM kernel) and the decoder fused with
              its cross-entropy (keraslm.losses), no whole-step XLA
  keras-lstm  the same with Keras' generic LSTM (the previous default)
  fused+jit   the whole per-replica step XLA-compiled (--jit; Keras' LSTM: XLA has no BlockLSTM)
  unfused     Keras' LSTM, Keras logits + tf.nn.sparse_softmax_cross_entropy_with_logits
  bf16        `--precision bf16` (mixed precision; Keras' LSTM: BlockLSTM has no bf16 kernel),
              its own row, never a headline; skipped with the reason on a machine without bf16
              hardware unless KERASLM_ALLOW_EMULATED_BF16=1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import flops_per_token, matmul_peak
from keraslm.adaptive import default_cutoffs
from keraslm.errors import UserError
from keraslm.precision import check_supported as check_precision

VARIANTS = {"fused": {"jit_compile": False, "fused_decoder": True, "fused_lstm": True},
            "keras-lstm": {"jit_compile": False, "fused_decoder": True, "fused_lstm": False},
            "fused+jit": {"jit_compile": True, "fused_decoder": True, "fused_lstm": False},
            "unfused": {"jit_compile": False, "fused_decoder": False, "fused_lstm": False},
            "bf16": {"jit_compile": False, "fused_decoder": True, "fused_lstm": True,
                     "precision": "bf16"}}


def wikitext_ids(data_root: str | None, tokens: int, max_vocab: int | None = None
                 ) -> tuple[np.ndarray, int]:
    """The first `tokens` ids of WikiText-2 train under its vocabulary (at most `max_vocab`)."""
    from keraslm.data import build_vocab, resolve_paths
    from keraslm.text import WIKITEXT

    path = resolve_paths("wikitext-2", {}, data_root, splits=("train",))["train"]
    vocab = build_vocab(path, WIKITEXT, max_size=max_vocab)
    stream = (t for _, t in zip(range(tokens), WIKITEXT.iter_tokens(path)))
    return vocab.encode(stream), len(vocab)


def bench_keraslm(ids: np.ndarray, vocab_size: int, batches: int, warmup: int,
                  fused_lstm: bool = True, precision: str = "fp32", **options) -> float:
    from keraslm.batching import BPTTBatches
    from keraslm.model import build_model, preset_config
    from keraslm.training.devices import make_strategy
    from keraslm.training.step import Trainer, make_optimizer, noise_keys

    strategy = make_strategy()
    config = preset_config("standard_lstm_lm_200", vocab_size)
    with strategy.scope():
        model = build_model(config, seed=0, fused=fused_lstm, precision=precision)
        optimizer = make_optimizer("sgd", 20.0)
    trainer = Trainer(model, optimizer, strategy, clip=0.25, two_biases=config.two_biases,
                      **options)
    data = BPTTBatches(ids, 20, 35, "discard")
    state = trainer.zero_state(20)
    for i in range(warmup):
        _, state = trainer.train_step(*data[i], noise_keys(0, 0, i, 20), state)
    started, tokens = time.perf_counter(), 0
    for i in range(warmup, warmup + batches):
        result, state = trainer.train_step(*data[i], noise_keys(0, 0, i, 20), state)
        tokens += result.num_targets
    return tokens / (time.perf_counter() - started)


def bench_torch(ids: np.ndarray, vocab_size: int, batches: int, warmup: int, *,
                python: str = sys.executable, cutoffs: tuple[int, ...] = ()) -> dict | None:
    """The PyTorch recipe's tokens/s (bench/torch_word_lm.py under `python`), with PyTorch's
    adaptive softmax at `cutoffs` when given; None (and why, printed) if it could not run."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "ids.npy", ids)
        command = [python, str(ROOT / "bench" / "torch_word_lm.py"), "--ids",
                   str(Path(tmp) / "ids.npy"), "--vocab", str(vocab_size),
                   "--batches", str(batches), "--warmup", str(warmup)]
        if cutoffs:
            command += ["--adaptive-cutoffs", ",".join(map(str, cutoffs)), "--div-value", "4"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        print(f"PyTorch baseline did not run: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=30, help="timed batches per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="fused,keras-lstm,fused+jit,unfused")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="keep only the N most frequent words (e.g. 10000)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--torch-python", default=sys.executable,
                   help="a Python with torch installed, for the baselines (default: this one)")
    p.add_argument("--torch-adaptive", default="auto", metavar="C1,C2,...|auto|off",
                   help="also time PyTorch with nn.AdaptiveLogSoftmaxWithLoss (div_value 4) at "
                        "these cutoffs (auto: keraslm.adaptive.default_cutoffs)")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)

    ids, vocab_size = wikitext_ids(args.data_root, (args.batches + args.warmup + 1) * 20 * 35 + 20,
                                   args.max_vocab)
    model = {"nhid": 200, "emsize": 200, "nlayers": 2, "vocab_size": vocab_size}
    train_flops = 3 * flops_per_token(model)
    peak, peak_source = matmul_peak()
    results = {}
    adaptive_rows = set()
    if not args.no_torch:
        baseline = bench_torch(ids, vocab_size, args.batches, args.warmup,
                               python=args.torch_python)
        if baseline:
            results[f"PyTorch {baseline['torch']} word_language_model"] = baseline["tokens_per_s"]
        cutoffs = (() if args.torch_adaptive == "off" else default_cutoffs(vocab_size)
                   if args.torch_adaptive == "auto"
                   else tuple(int(c) for c in args.torch_adaptive.split(",")))
        adaptive = cutoffs and bench_torch(ids, vocab_size, args.batches, args.warmup,
                                           python=args.torch_python, cutoffs=cutoffs)
        if adaptive:
            name = f"PyTorch adaptive softmax {','.join(map(str, cutoffs))}"
            results[name] = adaptive["tokens_per_s"]
            adaptive_rows.add(name)
    for name in args.variants.split(","):
        try:
            check_precision(VARIANTS[name].get("precision", "fp32"))
        except UserError as err:
            print(f"keraslm {name}: not run: {err}")
            continue
        results[f"keraslm {name}"] = bench_keraslm(ids, vocab_size, args.batches, args.warmup,
                                                   **VARIANTS[name])
    peak, peak_source = max((peak, peak_source), matmul_peak())

    print(f"standard_lstm_lm_200, vocab {vocab_size:,}, batch 20, bptt 35, fp32, full softmax; "
          f"{args.batches} timed batches after {args.warmup} warm-up")
    print(f"training FLOPs/token {train_flops / 1e6:.1f} M; matmul peak {peak:.1f} GFLOP/s "
          f"({peak_source})")
    base = next((v for k, v in results.items() if k.startswith("PyTorch")), None)
    print(f"{'implementation':<40} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8} {'vs PyTorch':>11}")
    for name, tps in results.items():
        ratio = f"{tps / base:.2f}x" if base else "-"
        if name in adaptive_rows:  # fewer FLOPs a token: the full softmax's count would lie
            print(f"{name:<40} {tps:>10,.0f} {'-':>9} {'-':>8} {ratio:>11}")
            continue
        gflops = tps * train_flops / 1e9
        print(f"{name:<40} {tps:>10,.0f} {gflops:>9.1f} {gflops / peak:>8.1%} {ratio:>11}")
    ceiling = peak * 1e9 / train_flops  # every training FLOP at the matmul peak, nothing else
    print(f"{'ceiling: all FLOPs at the matmul peak':<40} {ceiling:>10,.0f} {peak:>9.1f} "
          f"{1:>8.1%} {f'{ceiling / base:.2f}x' if base else '-':>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
