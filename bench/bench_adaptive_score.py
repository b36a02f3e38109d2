"""Benchmark: scoring speed of an adaptive-softmax bundle vs a full-softmax one, serve/score.py.

    python bench/bench_adaptive_score.py [--tokens 0] [--batch-size 20] [--bptt 35]
        [--cutoffs auto|C1,C2,...] [--div-value 4] [--run-full RUN] [--run-adaptive RUN]
        [--repeats 3] [--json OUT.json] [--data-root DIR]

Exports standard_lstm_lm_200 over WikiText-2's vocabulary twice, with the full softmax (the
tutorial's, tied) and with the adaptive softmax at `--cutoffs` / `--div-value`, and scores
WikiText-2 valid (all of it; its first whole lines holding `--tokens` tokens if given) with each
bundle through `serve/score.py --json` at `--batch-size`, each in a process of its own (no
TensorFlow there, as a serving host runs it), the two alternating `--repeats` times. Prints per
bundle the best tokens/s the scorer reports (its `score_file` time: reading, tokenizing and the
onnxruntime session; not the session's creation), the adaptive / full ratio, both perplexities,
the model file's size and the scorer process's peak RSS (the highest of the repeats).

The models are untrained (seed 0) unless `--run-full` / `--run-adaptive` name trained runs:
speed does not depend on the weights, but an untrained model's perplexity (about the vocabulary's
size for the full softmax, not so for the adaptive one, whose untrained head and tails are not
uniform) means nothing; it is printed so a wrong graph would show.
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

from bench.bench_score import text_prefix, untrained_run
from bench.common import child_env, run_measured
from keraslm.config import TIED_DIV_VALUE, default_cutoffs


def progress(message: str) -> None:
    print(f"[bench_adaptive_score {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def score_process(bundle: Path, text: Path, batch_size: int, bptt: int) -> dict:
    """`serve/score.py TEXT --json` in a process of its own: its report and its peak RSS (MB)."""
    done, peak = run_measured([sys.executable, str(ROOT / "serve" / "score.py"), str(text),
                               "--model", str(bundle), "--batch-size", str(batch_size),
                               "--bptt", str(bptt), "--json"], cwd=ROOT, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"serve/score.py failed on {bundle}: {done.stderr.strip()}")
    return {**json.loads(done.stdout), "peak_rss_mb": peak}


def make_bundles(args: argparse.Namespace, data_root: Path, work: Path) -> dict[str, dict]:
    """Per softmax: the run used, whether it is trained, its bundle and its model config."""
    from export.to_onnx import export_run
    from keraslm.data import build_vocab
    from keraslm.rundir import resolve_run
    from keraslm.text import WIKITEXT

    vocab_size = len(build_vocab(data_root / "wikitext-2" / "wiki.train.tokens", WIKITEXT))
    cutoffs = (default_cutoffs(vocab_size) if args.cutoffs == "auto"
               else tuple(int(c) for c in args.cutoffs.split(",")))
    options = {"full": {}, "adaptive": {"softmax": "adaptive", "cutoffs": cutoffs,
                                        "div_value": args.div_value}}
    given = {"full": args.run_full, "adaptive": args.run_adaptive}
    out = {}
    for softmax in ("full", "adaptive"):
        if given[softmax]:
            run, origin = resolve_run(given[softmax]), "trained"
        else:
            progress(f"building an untrained {softmax}-softmax run")
            run, origin = untrained_run(work / f"run-{softmax}", data_root,
                                        **options[softmax]), "untrained"
        progress(f"exporting the {softmax}-softmax run ({origin})")
        bundle = export_run(run, work / f"bundle-{softmax}")
        model = run.read_config()["model"]
        if model.get("softmax", "full") != softmax:
            raise SystemExit(f"{run.path} has a {model.get('softmax', 'full')} softmax, "
                             f"not {softmax}")
        out[softmax] = {"run": str(run.path), "origin": origin, "bundle": bundle,
                        "model": model,
                        "model_mb": sum(f.stat().st_size for f in bundle.glob("model.onnx*"))
                        / 1e6}
    return out


def run(args: argparse.Namespace) -> dict:
    """Export both bundles, score with each; the figures as one dict (what `report` prints)."""
    data_root = args.data_root.expanduser()
    results = {"batch_size": args.batch_size, "bptt": args.bptt,
               "load_average": os.getloadavg()[0], "repeats": args.repeats, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-score-") as tmp:
        work = Path(tmp)
        bundles = make_bundles(args, data_root, work)
        source = data_root / "wikitext-2" / "wiki.valid.tokens"
        text = source if args.tokens == 0 else text_prefix(source, args.tokens,
                                                           work / "valid.tokens")
        results["text"] = ("all of WikiText-2 valid" if args.tokens == 0 else
                           f"WikiText-2 valid, first {args.tokens:,}+ tokens")
        for repeat in range(args.repeats):
            for softmax in ("full", "adaptive") if repeat % 2 == 0 else ("adaptive", "full"):
                progress(f"scoring with the {softmax}-softmax bundle ({repeat + 1}/"
                         f"{args.repeats})")
                report = score_process(bundles[softmax]["bundle"], text, args.batch_size,
                                       args.bptt)
                row = results["rows"].setdefault(softmax, {
                    **{k: v for k, v in bundles[softmax].items() if k != "bundle"},
                    "tokens_per_s": 0.0, "peak_rss_mb": 0.0, "runs": []})
                row["runs"].append(report["tokens_per_second"])
                row["tokens_per_s"] = max(row["tokens_per_s"], report["tokens_per_second"])
                row["peak_rss_mb"] = max(row["peak_rss_mb"], report["peak_rss_mb"] or 0.0)
                row["perplexity"], row["tokens"] = report["perplexity"], report["num_tokens"]
    results["ratio"] = (results["rows"]["adaptive"]["tokens_per_s"]
                        / results["rows"]["full"]["tokens_per_s"])
    return results


def report(results: dict) -> None:
    rows = results["rows"]
    tokens = rows["full"]["tokens"]
    print(f"scoring: serve/score.py, standard_lstm_lm_200 over WikiText-2's vocabulary "
          f"({rows['full']['model']['vocab_size']:,} words), {results['text']} ({tokens:,} "
          f"tokens), batch {results['batch_size']}, bptt {results['bptt']}; best of "
          f"{results['repeats']}, each in its own process; load average "
          f"{results['load_average']:.1f} before starting")
    print(f"{'softmax':<34}{'model':>10}{'model MB':>9}{'tokens/s':>10}{'vs full':>8}"
          f"{'perplexity':>12}{'peak MB':>8}")
    for softmax, row in rows.items():
        model = row["model"]
        label = softmax if softmax == "full" else (
            f"adaptive {','.join(map(str, model['cutoffs']))} div {model['div_value']:g}")
        print(f"{label:<34}{row['origin']:>10}{row['model_mb']:>9.1f}{row['tokens_per_s']:>10,.0f}"
              f"{row['tokens_per_s'] / rows['full']['tokens_per_s']:>7.2f}x"
              f"{row['perplexity']:>12.2f}{row['peak_rss_mb']:>8,.0f}")
    if any(row["origin"] == "untrained" for row in rows.values()):
        print("note: untrained perplexities mean nothing (speed does not depend on the weights)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=0,
                   help="score the first whole lines of WikiText-2 valid holding this many "
                        "tokens (default 0: all of it)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--cutoffs", default="auto", metavar="auto|C1,C2,...",
                   help="the adaptive softmax's cutoffs (auto: keraslm's default)")
    p.add_argument("--div-value", type=float, default=TIED_DIV_VALUE)
    p.add_argument("--run-full", default=None, help="a trained full-softmax run to export")
    p.add_argument("--run-adaptive", default=None, help="a trained adaptive-softmax run")
    p.add_argument("--repeats", type=int, default=3, help="score each bundle this many times")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
