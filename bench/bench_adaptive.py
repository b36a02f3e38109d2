"""Every adaptive-softmax figure in one command: training and scoring, beside the full softmax and
PyTorch's nn.AdaptiveLogSoftmaxWithLoss, and how far each stands from its goal.

    python bench/bench_adaptive.py [--quick] [--torch-python PY] [--synthetic DIR]
        [--variants fused,adaptive] [--json OUT.json] [--data-root DIR]

Run it from the repository root on an otherwise idle machine. Sections, in the order they run
(each prints its own table as bench/bench_train.py and bench/bench_adaptive_score.py print them):
  wikitext-2   training tokens/s on WikiText-2 (33,278 words): keraslm's full and adaptive
               softmax, PyTorch's full softmax and its adaptive softmax at the same cutoffs and
               div_value, each in its own process (bench/bench_train.py)
  max-vocab    the same with --max-vocab 10000 (10,000 words, the rest <unk>)
  wikitext-103 the same at WikiText-103's 267,735 words, on bench/synthetic_corpus.py's seeded
               stand-in (--cover: every word in the vocabulary), with peak RSS and the projected
               hours of one WikiText-103 epoch; the full-softmax rows time fewer batches
  scoring      serve/score.py at batch 20 on all of WikiText-2 valid with an untrained
               standard_lstm_lm_200 exported twice, full and adaptive (bench/bench_adaptive_score.py)
Then one summary: each goal's measured ratio beside its target.

`--synthetic DIR` keeps the synthetic corpus there (made once, ~10 s; reused while its
synthetic.json says 267,735 words with --cover); by default it is made in a temporary folder.
`--quick` is a smoke run (a few batches and tokens, ~6 minutes on 2 busy cores): its figures
are not measurements. Every figure also goes to `--json`.
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

from bench import bench_adaptive_score, bench_train
from bench.synthetic_corpus import WIKITEXT_103_VOCAB

FULL = {"batches": 50, "warmup": 3, "large_batches": 20, "large_full_batches": 5,
        "score_tokens": 0, "score_repeats": 3}
QUICK = {"batches": 3, "warmup": 2, "large_batches": 2, "large_full_batches": 1,
         "score_tokens": 5_000, "score_repeats": 1}
# keraslm's second training step still compiles: never fewer than two warm-up steps.
# (section, what is compared, goal): training rows are keraslm adaptive / PyTorch adaptive.
GOALS = (("wikitext-2", "training, keraslm adaptive / PyTorch adaptive", 1.2),
         ("scoring", "scoring at batch 20, adaptive bundle / full bundle", 2.5),
         ("max-vocab", "training, keraslm adaptive / PyTorch adaptive", 1.2),
         ("wikitext-103", "training, keraslm adaptive / PyTorch adaptive", 1.2))


def progress(message: str) -> None:
    print(f"[bench_adaptive {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synthetic_corpus(folder: Path, data_root: Path) -> Path:
    """`folder` holding the 267,735-word synthetic corpus (--cover), made unless already there."""
    from bench import synthetic_corpus as synthetic

    meta = folder / "synthetic.json"
    if meta.is_file():
        made = json.loads(meta.read_text(encoding="utf-8"))
        if made.get("vocab") == WIKITEXT_103_VOCAB and made.get("cover"):
            return folder
    progress(f"making the synthetic {WIKITEXT_103_VOCAB:,}-word corpus in {folder}")
    if synthetic.main(["--out", str(folder), "--cover", "--vocab", str(WIKITEXT_103_VOCAB),
                       "--data-root", str(data_root)]) != 0:
        raise SystemExit("bench/synthetic_corpus.py failed")
    return folder


def training(settings: dict, args: argparse.Namespace, extra: list[str],
             large: bool = False) -> dict:
    batches = settings["large_batches" if large else "batches"]
    argv = ["--batches", str(batches), "--warmup", str(settings["warmup"]),
            "--variants", args.variants, "--data-root", str(args.data_root),
            "--torch-python", args.torch_python, *extra]
    if large:
        argv += ["--full-batches", str(settings["large_full_batches"])]
    if args.no_torch:
        argv.append("--no-torch")
    return bench_train.run(bench_train.parse_args(argv))


def adaptive_ratio(results: dict) -> float | None:
    """keraslm's fp32 adaptive row over PyTorch's adaptive softmax, if both ran."""
    speed = {(r["kind"], r["softmax"], r["precision"]): r["tokens_per_s"]
             for r in results["rows"]}
    ours, theirs = speed.get(("keraslm", "adaptive", "fp32")), speed.get(
        ("torch", "adaptive", "fp32"))
    return ours / theirs if ours and theirs else None


def summary(results: dict) -> None:
    print("\ngoals (figures above; on a busy machine they are not measurements)")
    for section, what, goal in GOALS:
        if section not in results:
            continue
        ratio = (results[section]["ratio"] if section == "scoring"
                 else adaptive_ratio(results[section]))
        verdict = "-" if ratio is None else "met" if ratio >= goal else "NOT met"
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"  {section:<13}{what:<52}{shown:>8}  goal >= {goal:g}x  {verdict}")
    large = results.get("wikitext-103")
    if large:
        print(f"  {WIKITEXT_103_VOCAB:,} words, one WikiText-103 epoch "
              f"({bench_train.WIKITEXT_103_TRAIN_TOKENS:,} tokens) on this machine:")
        for row in large["rows"]:
            rss = f"{row['peak_rss_mb']:,.0f} MB" if row["peak_rss_mb"] else "-"
            print(f"    {row['implementation']:<40}{row['tokens_per_s']:>9,.0f} tokens/s "
                  f"{bench_train.WIKITEXT_103_TRAIN_TOKENS / row['tokens_per_s'] / 3600:>7.1f} h"
                  f"  peak {rss}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few batches and tokens")
    p.add_argument("--variants", default="fused,adaptive",
                   help="keraslm variants of every training section (bench/bench_train.py)")
    p.add_argument("--torch-python", default=sys.executable,
                   help="a Python with torch installed, for the baselines (default: this one)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--synthetic", type=Path, default=None, metavar="DIR",
                   help="where the synthetic 267,735-word corpus is (made if missing)")
    p.add_argument("--sections", default="wikitext-2,max-vocab,wikitext-103,scoring",
                   help="which sections to run, comma-separated")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    args = p.parse_args(argv)
    args.data_root = args.data_root.expanduser()
    settings = QUICK if args.quick else FULL
    sections = args.sections.split(",")
    started = time.perf_counter()
    results: dict = {"quick": args.quick, "settings": settings}

    def section(name: str, title: str, make) -> None:
        if name not in sections:
            return
        progress(title)
        print(f"\n== {title}", flush=True)
        results[name] = make()
        (bench_adaptive_score if name == "scoring" else bench_train).report(results[name])
        sys.stdout.flush()

    section("wikitext-2", "training, WikiText-2", lambda: training(settings, args, []))
    section("max-vocab", "training, WikiText-2 --max-vocab 10000",
            lambda: training(settings, args, ["--max-vocab", "10000"]))
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
        section("wikitext-103", f"training, {WIKITEXT_103_VOCAB:,} words (synthetic WikiText-103)",
                lambda: training(settings, args, ["--corpus", str(synthetic_corpus(
                    args.synthetic or Path(tmp) / "synthetic", args.data_root))], large=True))
    section("scoring", "scoring, serve/score.py batch 20, WikiText-2 valid",
            lambda: bench_adaptive_score.run(bench_adaptive_score.parse_args(
                ["--tokens", str(settings["score_tokens"]), "--repeats",
                 str(settings["score_repeats"]), "--data-root", str(args.data_root)])))
    summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    progress(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
