"""Benchmark: training tokens/s of standard_lstm_lm_200 (batch 20, bptt 35) vs the PyTorch example.

    python bench/bench_train.py [--batches 30] [--variants fused,keras-lstm,fused+jit,unfused]
        [--max-vocab N] [--corpus DIR] [--full-batches N] [--cutoffs auto|C1,C2,...]
        [--div-value 4] [--torch-softmaxes full,adaptive] [--no-torch] [--torch-python PY]
        [--json OUT.json]

Times the real `keraslm.training.step.Trainer` step (SGD, global-norm clipping, carried state,
dropout) on the first training batches of a WikiText-format corpus (WikiText-2 train, or
DIR/wiki.train.tokens with `--corpus DIR`, e.g. bench/synthetic_corpus.py's WikiText-103
stand-in), and the PyTorch `word_language_model` equivalent (bench/torch_word_lm.py) on the same
ids, with its full softmax and with PyTorch's `nn.AdaptiveLogSoftmaxWithLoss` at the same
`--cutoffs` and `--div-value` as keraslm's adaptive rows. Every implementation runs in a process
of its own, one after another, so each has the cores to itself and its peak RSS (ru_maxrss of
that child) is its own. `--torch-python` names a Python that has torch, if this one has not.

Prints per implementation: tokens/s; training FLOPs/token (3x the forward multiply-adds x 2 of
the LSTMs and the decoder: for an adaptive softmax the head for every token and each tail for the
share of the timed targets that fall in it; keraslm's tied tails also make their output matrices,
E[a:b] @ Q_i, once a step), the achieved GFLOP/s and that as a fraction of the
machine's measured fp32 matmul peak (measured before and after, the higher kept); the speed vs
PyTorch's full softmax, and for adaptive rows vs PyTorch's adaptive softmax; peak RSS; and the
hours one epoch of WikiText-103's training split (103,227,021 tokens) would take at that speed.
`--max-vocab 10000` keeps the 10,000 most frequent words (the rest <unk>). A full softmax over a
large vocabulary is slow: `--full-batches` times fewer batches for the full-softmax rows.

Variants:
  fused       the default: FusedLSTM (TensorFlow's BlockLSTM kernel) and the decoder fused with
              its cross-entropy (keraslm.losses), no whole-step XLA
  keras-lstm  the same with Keras' generic LSTM (the previous default)
  fused+jit   the whole per-replica step XLA-compiled (--jit; Keras' LSTM: XLA has no BlockLSTM)
  unfused     Keras' LSTM, Keras logits + tf.nn.sparse_softmax_cross_entropy_with_logits
  bf16        `--precision bf16` (mixed precision; Keras' LSTM: BlockLSTM has no bf16 kernel),
              its own row, never a headline; skipped with the reason on a machine without bf16
              hardware unless KERASLM_ALLOW_EMULATED_BF16=1
  adaptive    `fused` with `--softmax adaptive` at --cutoffs / --div-value
  adaptive+bf16  the same in bf16 (skipped as bf16 is)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (
    adaptive_flops_per_token,
    child_env,
    flops_per_token,
    matmul_peak,
    run_measured,
    tail_shares,
)
from keraslm.config import TIED_DIV_VALUE, default_cutoffs

VARIANTS = {"fused": {"jit_compile": False, "fused_decoder": True, "fused_lstm": True},
            "keras-lstm": {"jit_compile": False, "fused_decoder": True, "fused_lstm": False},
            "fused+jit": {"jit_compile": True, "fused_decoder": True, "fused_lstm": False},
            "unfused": {"jit_compile": False, "fused_decoder": False, "fused_lstm": False},
            "bf16": {"jit_compile": False, "fused_decoder": True, "fused_lstm": True,
                     "precision": "bf16"},
            "adaptive": {"jit_compile": False, "fused_decoder": True, "fused_lstm": True,
                         "softmax": "adaptive"},
            "adaptive+bf16": {"jit_compile": False, "fused_decoder": True, "fused_lstm": True,
                              "softmax": "adaptive", "precision": "bf16"}}
WIKITEXT_103_TRAIN_TOKENS = 103_227_021
BATCH, BPTT = 20, 35
CHILD_TIMEOUT = 3600


def wikitext_ids(data_root: str | None, tokens: int, max_vocab: int | None = None,
                 corpus: str | os.PathLike | None = None) -> tuple[np.ndarray, int]:
    """The first `tokens` ids of a WikiText-format training split under its vocabulary (at most
    `max_vocab` words): WikiText-2's, or `corpus`/wiki.train.tokens."""
    from keraslm.data import build_vocab, resolve_paths
    from keraslm.text import WIKITEXT

    path = (Path(corpus) / "wiki.train.tokens" if corpus is not None else
            resolve_paths("wikitext-2", {}, data_root, splits=("train",))["train"])
    vocab = build_vocab(path, WIKITEXT, max_size=max_vocab)
    stream = (t for _, t in zip(range(tokens), WIKITEXT.iter_tokens(path)))
    return vocab.encode(stream), len(vocab)


def bench_keraslm(ids: np.ndarray, vocab_size: int, batches: int, warmup: int,
                  fused_lstm: bool = True, precision: str = "fp32", softmax: str = "full",
                  cutoffs: tuple[int, ...] | None = None, div_value: float = TIED_DIV_VALUE,
                  **options) -> float:
    """Tokens/s of keraslm's training step, in this process (TensorFlow is imported here)."""
    from keraslm.batching import BPTTBatches
    from keraslm.model import build_model, preset_config
    from keraslm.training.devices import make_strategy
    from keraslm.training.step import Trainer, make_optimizer, noise_keys

    strategy = make_strategy()
    adaptive = {"softmax": softmax, "div_value": div_value,
                "cutoffs": default_cutoffs(vocab_size) if cutoffs is None else cutoffs
                } if softmax == "adaptive" else {}
    config = preset_config("standard_lstm_lm_200", vocab_size, **adaptive)
    with strategy.scope():
        model = build_model(config, seed=0, fused=fused_lstm, precision=precision)
        optimizer = make_optimizer("sgd", 20.0)
    trainer = Trainer(model, optimizer, strategy, clip=0.25, two_biases=config.two_biases,
                      **options)
    data = BPTTBatches(ids, BATCH, BPTT, "discard")
    state = trainer.zero_state(BATCH)
    for i in range(warmup):
        _, state = trainer.train_step(*data[i], noise_keys(0, 0, i, BATCH), state)
    started, tokens = time.perf_counter(), 0
    for i in range(warmup, warmup + batches):
        result, state = trainer.train_step(*data[i], noise_keys(0, 0, i, BATCH), state)
        tokens += result.num_targets
    return tokens / (time.perf_counter() - started)


def _child(args: argparse.Namespace) -> int:
    """One keraslm variant, in the process `run_keraslm` started: one JSON line."""
    from keraslm.errors import UserError
    from keraslm.precision import check_supported

    options = VARIANTS[args.child]
    try:
        check_supported(options.get("precision", "fp32"))
    except UserError as err:
        print(json.dumps({"skipped": str(err)}))
        return 0
    tps = bench_keraslm(np.load(args.ids), args.vocab_size, args.batches, args.warmup,
                        cutoffs=parse_cutoffs(args.cutoffs, args.vocab_size),
                        div_value=args.div_value, **options)
    print(json.dumps({"tokens_per_s": tps}))
    return 0


def run_keraslm(name: str, ids_path: Path, vocab_size: int, batches: int, warmup: int,
                cutoffs: tuple[int, ...], div_value: float) -> dict:
    """One keraslm variant in a process of its own: tokens_per_s and peak_rss_mb, or why not."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--ids",
               str(ids_path), "--vocab-size", str(vocab_size), "--batches", str(batches),
               "--warmup", str(warmup), "--cutoffs", ",".join(map(str, cutoffs)) or "none",
               "--div-value", str(div_value)]
    done, peak = run_measured(command, timeout=CHILD_TIMEOUT, env=child_env())
    if done.returncode != 0:
        return {"skipped": f"failed: {failure(done.stderr)}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "peak_rss_mb": peak}


def failure(stderr: str) -> str:
    """The line of a child's stderr that says why it failed: its last exception line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["no message"])[-1]


def bench_torch(ids: np.ndarray, vocab_size: int, batches: int, warmup: int, *,
                python: str = sys.executable, cutoffs: tuple[int, ...] = (),
                div_value: float = TIED_DIV_VALUE) -> dict | None:
    """The PyTorch recipe's tokens/s and peak RSS (bench/torch_word_lm.py under `python`, in a
    process of its own), with PyTorch's adaptive softmax at `cutoffs` when given; None (and why,
    printed) if it could not run."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "ids.npy", ids)
        command = [python, str(ROOT / "bench" / "torch_word_lm.py"), "--ids",
                   str(Path(tmp) / "ids.npy"), "--vocab", str(vocab_size),
                   "--batches", str(batches), "--warmup", str(warmup)]
        if cutoffs:
            command += ["--adaptive-cutoffs", ",".join(map(str, cutoffs)),
                        "--div-value", str(div_value)]
        done, peak = run_measured(command, timeout=CHILD_TIMEOUT)
    if done.returncode != 0:
        print(f"PyTorch baseline did not run: {failure(done.stderr)}")
        return None
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "peak_rss_mb": peak}


def parse_cutoffs(text: str, vocab_size: int) -> tuple[int, ...]:
    """'auto' -> keraslm's default cutoffs for the vocabulary; 'none' -> (); '2000,10000' -> ..."""
    if text == "auto":
        return default_cutoffs(vocab_size)
    return () if text == "none" else tuple(int(c) for c in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=30, help="timed batches per implementation")
    p.add_argument("--full-batches", type=int, default=None,
                   help="timed batches of the full-softmax rows (default: --batches)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="fused,keras-lstm,fused+jit,unfused",
                   help=f"keraslm variants, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="keep only the N most frequent words (e.g. 10000)")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="a WikiText-format folder: DIR/wiki.train.tokens (default: WikiText-2)")
    p.add_argument("--cutoffs", default="auto", metavar="auto|C1,C2,...",
                   help="adaptive softmax cutoffs, keraslm's and PyTorch's alike (auto: "
                        "keraslm's default for the vocabulary)")
    p.add_argument("--div-value", type=float, default=TIED_DIV_VALUE,
                   help="adaptive softmax tail divisor, keraslm's and PyTorch's alike (default 1, "
                        "keraslm's for its tied models)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--torch-softmaxes", default="full,adaptive",
                   help="which PyTorch baselines to time: full, adaptive or both")
    p.add_argument("--torch-python", default=sys.executable,
                   help="a Python with torch installed, for the baselines (default: this one)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Time every implementation; the figures as one dict (what `report` prints)."""
    full_batches = args.batches if args.full_batches is None else args.full_batches
    ids, vocab_size = wikitext_ids(args.data_root,
                                   (max(args.batches, full_batches) + args.warmup + 1)
                                   * BATCH * BPTT + BATCH, args.max_vocab, args.corpus)
    cutoffs = parse_cutoffs(args.cutoffs, vocab_size)
    model = {"nhid": 200, "emsize": 200, "nlayers": 2, "vocab_size": vocab_size}
    columns = len(ids) // BATCH
    timed = ids[: columns * BATCH].reshape(BATCH, columns)[
        :, 1 + args.warmup * BPTT: 1 + (args.warmup + args.batches) * BPTT]
    shares = tail_shares(timed, cutoffs)
    flops = {"full": 3 * flops_per_token(model),  # tied or not: the same matmul
             "adaptive": 3 * adaptive_flops_per_token(model, cutoffs, args.div_value, shares),
             "adaptive tied": 3 * adaptive_flops_per_token(model, cutoffs, args.div_value,
                                                           shares, BATCH * BPTT)}
    corpus = (f"{args.corpus}/wiki.train.tokens" if args.corpus else "WikiText-2 train")
    results = {"corpus": corpus, "vocab_size": vocab_size, "max_vocab": args.max_vocab,
               "cutoffs": list(cutoffs), "div_value": args.div_value, "tail_shares": shares,
               "batches": args.batches, "full_batches": full_batches, "warmup": args.warmup,
               "train_flops_per_token": flops, "load_average": os.getloadavg()[0], "rows": [],
               "skipped": []}
    peak = matmul_peak()

    def add(implementation: str, kind: str, softmax: str, precision: str, outcome: dict | None,
            batches: int, cost: str) -> None:
        if outcome is None or "skipped" in outcome:
            reason = "did not run" if outcome is None else outcome["skipped"]
            results["skipped"].append(f"{implementation}: {reason}")
            return
        results["rows"].append({"implementation": implementation, "kind": kind,
                                "softmax": softmax, "precision": precision,
                                "tokens_per_s": outcome["tokens_per_s"],
                                "peak_rss_mb": outcome.get("peak_rss_mb"), "batches": batches,
                                "flops": cost, "train_flops_per_token": flops[cost]})

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ids_path = Path(tmp) / "ids.npy"
        np.save(ids_path, ids)
        wanted = set(args.torch_softmaxes.split(","))
        if not args.no_torch and "full" in wanted:
            out = bench_torch(ids, vocab_size, full_batches, args.warmup,
                              python=args.torch_python)
            add(f"PyTorch {out['torch'] if out else ''} full softmax", "torch", "full", "fp32",
                out, full_batches, "full")
        if not args.no_torch and "adaptive" in wanted and cutoffs:
            out = bench_torch(ids, vocab_size, args.batches, args.warmup,
                              python=args.torch_python, cutoffs=cutoffs,
                              div_value=args.div_value)
            add(f"PyTorch {out['torch'] if out else ''} adaptive softmax", "torch", "adaptive",
                "fp32", out, args.batches, "adaptive")
        for name in args.variants.split(","):
            softmax = VARIANTS[name].get("softmax", "full")
            batches = full_batches if softmax == "full" else args.batches
            out = run_keraslm(name, ids_path, vocab_size, batches, args.warmup, cutoffs,
                              args.div_value)
            add(f"keraslm {name}", "keraslm", softmax,
                VARIANTS[name].get("precision", "fp32"), out, batches,
                "full" if softmax == "full" else "adaptive tied")
    results["peak_gflops"], results["peak_source"] = max(peak, matmul_peak())
    return results


def ratios(results: dict) -> dict[str, dict[str, float]]:
    """Per implementation: its speed over PyTorch's full softmax ("full") and, for adaptive
    rows, over PyTorch's adaptive softmax ("adaptive")."""
    base = {r["softmax"]: r["tokens_per_s"] for r in results["rows"] if r["kind"] == "torch"}
    out = {}
    for row in results["rows"]:
        out[row["implementation"]] = {
            softmax: row["tokens_per_s"] / base[softmax] for softmax in ("full", "adaptive")
            if softmax in base and (softmax == "full" or row["softmax"] == "adaptive")}
    return out


def report(results: dict) -> None:
    """The table: one row per implementation, side by side."""
    peak = results["peak_gflops"]
    cutoffs = ",".join(map(str, results["cutoffs"])) or "none"
    shares = " / ".join(f"{100 * s:.1f}" for s in results["tail_shares"])
    print(f"standard_lstm_lm_200, {results['corpus']}, vocab {results['vocab_size']:,}"
          f"{' (--max-vocab)' if results['max_vocab'] else ''}, batch {BATCH}, bptt {BPTT}; "
          f"{results['batches']} timed batches ({results['full_batches']} for full-softmax "
          f"rows) after {results['warmup']} warm-up; load average {results['load_average']:.1f} "
          f"before starting")
    print(f"adaptive softmax: cutoffs {cutoffs}, div_value {results['div_value']:g} (keraslm and "
          f"PyTorch alike); tail shares of the timed targets {shares or '-'} %")
    flops = results["train_flops_per_token"]
    print(f"training FLOPs/token (3x forward): full softmax {flops['full'] / 1e6:.1f} M; adaptive "
          f"{flops['adaptive'] / 1e6:.1f} M untied (PyTorch's), {flops['adaptive tied'] / 1e6:.1f}"
          f" M tied (keraslm's: + E[a:b] @ Q_i once a step); fp32 matmul peak {peak:.1f} GFLOP/s "
          f"({results['peak_source']})")
    print(f"{'implementation':<34}{'softmax':>9}{'tokens/s':>10}{'MFLOP/tok':>10}{'GFLOP/s':>8}"
          f"{'of peak':>8}{'vs PT full':>11}{'vs PT adapt':>12}{'peak MB':>8}{'h/WT103':>8}")
    speedups = ratios(results)
    for row in results["rows"]:
        tps, per_token = row["tokens_per_s"], row["train_flops_per_token"]
        gflops = tps * per_token / 1e9
        vs = {k: f"{v:.2f}x" for k, v in speedups[row["implementation"]].items()}
        rss = f"{row['peak_rss_mb']:,.0f}" if row["peak_rss_mb"] else "-"
        label = row["softmax"] + ("" if row["precision"] == "fp32" else f" {row['precision']}")
        print(f"{row['implementation']:<34}{label:>9}{tps:>10,.0f}{per_token / 1e6:>10.1f}"
              f"{gflops:>8.1f}{gflops / peak:>8.1%}{vs.get('full', '-'):>11}"
              f"{vs.get('adaptive', '-'):>12}{rss:>8}"
              f"{WIKITEXT_103_TRAIN_TOKENS / tps / 3600:>8.1f}")
    for cost in sorted({row["flops"] for row in results["rows"]}):
        ceiling = peak * 1e9 / flops[cost]  # every training FLOP at the matmul peak
        label = cost.replace("adaptive tied", "ad. tied")
        print(f"{'ceiling: all FLOPs at the matmul peak':<34}{label:>9}{ceiling:>10,.0f}"
              f"{flops[cost] / 1e6:>10.1f}{peak:>8.1f}{1:>8.1%}")
    for line in results["skipped"]:
        print(f"not run: {line}")
    print(f"h/WT103: hours of one epoch of WikiText-103 train "
          f"({WIKITEXT_103_TRAIN_TOKENS:,} tokens) at that speed on this machine")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child(args)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(VARIANTS)}")
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
