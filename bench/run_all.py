"""Every benchmark figure in one command, each against the machine's measured fp32 matmul peak.

    python bench/run_all.py [--quick] [--run RUN] [--server] [--torch-python PY] [--json OUT.json]

Run it from the repository root on an otherwise idle machine. Sections, in the order they run:
  scoring   tokens/s of the ONNX scorer (onnxruntime) vs keraslm's Evaluator (Keras/TensorFlow)
            at batch 1 and 20, bptt 35, on a WikiText-2 valid prefix (bench/bench_score.py)
  int8      the int8 bundle vs the fp32 bundle, Scorer.score_file at batch 20 on WikiText-2 valid
            (all of it; a prefix with --quick): tokens/s and perplexity
  memory    peak RSS of a `serve/score.py` process scoring that same file, fp32 and int8
  training  tokens/s of the keraslm trainer step vs the PyTorch word_language_model baseline,
            batch 20, bptt 35 (bench/bench_train.py; PyTorch in its own process)
  server    only with --server: bench/bench_server.py's load test, printed as it prints it
The adaptive softmax's figures (training beside PyTorch's, at three vocabulary sizes, and
scoring beside the full softmax) have their own command: bench/bench_adaptive.py.

The model is standard_lstm_lm_200 over the WikiText-2 vocabulary: `--run`, else the newest run
under runs/ if it is that model, else an untrained one (speed does not depend on the weights; its
perplexities are then those of an untrained model, which the report says). GFLOP/s count the
multiply-adds of the LSTMs and the decoder (bench/common.py; training: 3x the forward); int8 runs
the same operations, shown against the same fp32 peak. The peak is measured before and after,
the higher kept. The full run takes about 10 minutes on 2 cores; --quick about 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from bench import bench_score, bench_train
from bench.common import child_env, flops_per_token, matmul_peak, run_measured

FULL = {"peak_repeats": 10, "score_tokens": 20_000, "int8_tokens": 0, "train_batches": 50,
        "train_warmup": 3}
QUICK = {"peak_repeats": 3, "score_tokens": 2_000, "int8_tokens": 3_000, "train_batches": 5,
         "train_warmup": 2}
SERVER_QUICK = ["--concurrency", "1", "8", "--requests", "40", "--seconds", "5",
                "--tokens", "3000"]


def progress(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scorer_process(bundle: Path, text: Path) -> dict:
    """`serve/score.py TEXT --json` in a process of its own: its report and its peak RSS (MB)."""
    done, peak = run_measured([sys.executable, str(ROOT / "serve" / "score.py"), str(text),
                               "--model", str(bundle), "--json"], cwd=ROOT, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"serve/score.py failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    report["peak_rss_mb"] = peak
    return report


def valid_text(data_root: Path, tokens: int, work: Path) -> Path:
    """WikiText-2 valid: the whole file (tokens 0) or its first lines holding `tokens` tokens."""
    source = data_root / "wikitext-2" / "wiki.valid.tokens"
    return source if tokens == 0 else bench_score.text_prefix(source, tokens, work / "int8.tokens")


def run_scoring(run, bundle: Path, data_root: Path, settings: dict, work: Path) -> list[dict]:
    text = bench_score.text_prefix(data_root / "wikitext-2" / "wiki.valid.tokens",
                                   settings["score_tokens"], work / "valid.tokens")
    return bench_score.compare_engines(run, bundle, text, [1, 20], 35)


def run_int8(run, bundle: Path, data_root: Path, settings: dict, work: Path
             ) -> tuple[list[dict], list[dict]]:
    """(speed and perplexity rows, memory rows) for the fp32 and the int8 bundle."""
    from export.to_onnx import export_run

    progress("int8: exporting the quantized bundle")
    int8 = export_run(run, work / "bundle-int8", quantize="int8")
    text = valid_text(data_root, settings["int8_tokens"], work)
    speed, memory = [], []
    for label, path in (("fp32", bundle), ("int8", int8)):
        progress(f"int8: scoring {text.name} with the {label} bundle")
        tps, ppl = bench_score.bench_onnx(path, text, 20, 35)
        speed.append({"model": label, "tokens_per_s": tps, "perplexity": ppl})
        progress(f"memory: serve/score.py with the {label} bundle in a child process")
        report = scorer_process(path, text)
        memory.append({"model": label, "peak_rss_mb": report["peak_rss_mb"],
                       "tokens": report["num_tokens"],
                       "tokens_per_s": report["tokens_per_second"],
                       "model_mb": sum(f.stat().st_size for f in path.glob("model.onnx*")) / 1e6})
    return speed, memory


def run_training(data_root: Path, settings: dict, torch: bool,
                 torch_python: str = sys.executable) -> list[dict]:
    batches, warmup = settings["train_batches"], settings["train_warmup"]
    progress("training: reading WikiText-2 train")
    ids, vocab_size = bench_train.wikitext_ids(str(data_root), (batches + warmup + 1) * 20 * 35
                                               + 20)
    rows = []
    if torch:
        progress("training: PyTorch baseline (own process)")
        baseline = bench_train.bench_torch(ids, vocab_size, batches, warmup,
                                           python=torch_python)
        if baseline:
            rows.append({"implementation": f"PyTorch {baseline['torch']} word_language_model",
                         "tokens_per_s": baseline["tokens_per_s"]})
    progress("training: keraslm")
    tps = bench_train.bench_keraslm(ids, vocab_size, batches, warmup,
                                    **bench_train.VARIANTS["fused"])
    rows.append({"implementation": "keraslm (default: fused decoder)", "tokens_per_s": tps})
    return rows


def report(results: dict) -> None:
    peak = results["peak_gflops"]
    model = results["model"]
    per_token = flops_per_token(model)

    def of_peak(tps: float, factor: float = 1.0) -> str:
        gflops = tps * per_token * factor / 1e9
        return f"{gflops:>8.1f}{100 * gflops / peak:>8.1f}%"

    print(f"keraslm benchmarks: standard_lstm_lm_200 ({results['origin']}: {model['nlayers']}x"
          f"{model['nhid']} LSTM, vocab {model['vocab_size']:,}), {os.cpu_count()} CPUs, load "
          f"average {results['load_average']:.1f} before starting"
          f"{', --quick' if results['quick'] else ''}")
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s ({results['peak_source']}); "
          f"{per_token / 1e6:.2f} MFLOP/token forward")
    if results["origin"] == "untrained":
        print("note: no trained standard_lstm_lm_200 run found: perplexities are an untrained "
              "model's (speed does not depend on the weights)")

    print(f"\nscoring, bptt 35, {results['score_tokens']:,}+ WikiText-2 valid tokens")
    print(f"{'engine':<24}{'batch':>6}{'tokens/s':>11}{'GFLOP/s':>8}{'of peak':>9}"
          f"{'perplexity':>12}")
    for row in results["scoring"]:
        print(f"{row['engine']:<24}{row['batch']:>6}{row['tokens_per_s']:>11,.0f}"
              f"{of_peak(row['tokens_per_s'])}{row['perplexity']:>12.3f}")
    for batch in sorted({row["batch"] for row in results["scoring"]}):
        tps = {row["engine"]: row["tokens_per_s"] for row in results["scoring"]
               if row["batch"] == batch}
        ort = tps["onnxruntime (serve)"]
        print(f"  batch {batch}: onnxruntime / tensorflow keraslm = "
              f"{ort / tps['tensorflow keraslm']:.2f}x, onnxruntime / plain keras = "
              f"{ort / tps['tensorflow plain keras']:.2f}x")

    print(f"\nint8 vs fp32, Scorer.score_file batch 20, bptt 35, {results['int8_text']} "
          "(int8 GFLOP/s: the same operations, against the fp32 peak)")
    print(f"{'model':<24}{'tokens/s':>11}{'GFLOP/s':>8}{'of peak':>9}{'perplexity':>12}")
    for row in results["int8"]:
        print(f"{row['model']:<24}{row['tokens_per_s']:>11,.0f}{of_peak(row['tokens_per_s'])}"
              f"{row['perplexity']:>12.3f}")
    fp32, int8 = results["int8"]
    print(f"  int8: {int8['tokens_per_s'] / fp32['tokens_per_s']:.2f}x the speed, perplexity "
          f"{100 * (int8['perplexity'] / fp32['perplexity'] - 1):+.2f}%")

    print("\nmemory: serve/score.py scoring that file in its own process (no TensorFlow)")
    print(f"{'model':<24}{'peak RSS MB':>12}{'model MB':>10}{'tokens/s':>11}{'GFLOP/s':>8}"
          f"{'of peak':>9}")
    for row in results["memory"]:
        print(f"{row['model']:<24}{row['peak_rss_mb']:>12.0f}{row['model_mb']:>10.1f}"
              f"{row['tokens_per_s']:>11,.0f}{of_peak(row['tokens_per_s'])}")

    print(f"\ntraining, batch 20, bptt 35, fp32, full softmax, {results['train_batches']} timed "
          f"batches (FLOPs: 3x forward)")
    print(f"{'implementation':<40}{'tokens/s':>11}{'GFLOP/s':>8}{'of peak':>9}{'vs PyTorch':>12}")
    base = next((r["tokens_per_s"] for r in results["training"]
                 if r["implementation"].startswith("PyTorch")), None)
    for row in results["training"]:
        ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{row['implementation']:<40}{row['tokens_per_s']:>11,.0f}"
              f"{of_peak(row['tokens_per_s'], 3.0)}{ratio:>12}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (~2 min): few tokens and batches, a prefix of valid for int8")
    p.add_argument("--run", default=None, help="run to benchmark (default: see module doc)")
    p.add_argument("--server", action="store_true", help="also run bench/bench_server.py")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--torch-python", default=sys.executable,
                   help="a Python with torch installed, for the baseline (default: this one)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    args = p.parse_args(argv)
    data_root = args.data_root.expanduser()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()

    from export.to_onnx import export_run

    results: dict = {"quick": args.quick, "load_average": os.getloadavg()[0], **settings}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        work = Path(tmp)
        progress("matmul peak")
        peak = matmul_peak(repeats=settings["peak_repeats"])
        run, origin = bench_score.pick_run(args.run, work, data_root)
        results.update(origin=origin, run=str(run.path), model=run.read_config()["model"])
        progress(f"scoring: exporting {run.path} ({origin})")
        bundle = export_run(run, work / "bundle")
        progress("scoring: onnxruntime vs tensorflow at batch 1 and 20")
        results["scoring"] = run_scoring(run, bundle, data_root, settings, work)
        results["int8"], results["memory"] = run_int8(run, bundle, data_root, settings, work)
        tokens = settings["int8_tokens"]
        results["int8_text"] = (f"WikiText-2 valid, first {tokens:,}+ tokens" if tokens else
                                "all of WikiText-2 valid")
        results["training"] = run_training(data_root, settings, not args.no_torch,
                                           args.torch_python)
        progress("matmul peak again")
        peak = max(peak, matmul_peak(repeats=settings["peak_repeats"]))
    results["peak_gflops"], results["peak_source"] = peak
    report(results)
    if args.server:
        print("\nserver (bench/bench_server.py)", flush=True)
        bench_server_args = (SERVER_QUICK if args.quick else []) + (
            ["--run", args.run] if args.run else []) + ["--data-root", str(data_root)]
        from bench import bench_server

        bench_server.main(bench_server_args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    progress(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
