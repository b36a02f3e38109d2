"""Benchmark: scoring a dataset document by document, every way keraslm can, side by side.

    python bench/bench_dataset.py [--bundle B | --run RUN] [--documents 4000] [--shards 4]

The same WikiText-2 documents (the first non-empty lines of the train split, one document each)
are scored, in this one run, by:
- `Scorer.score_samples` over a text file of them, one process with every core: what
  `serve/score.py --per-line` does per document, timed alone;
- `serve/score.py FILE --per-line OUT` itself, as a command (its wall time also covers start-up
  and the corpus perplexity it reports first);
- `python -m serve.dataset`'s local engine with 1 and 2 worker processes, and its Ray engine
  with 1 and 2 actors on a local Ray cluster started once (its start-up timed on its own), over
  the same documents as `--shards` JSON Lines files.
It prints tokens/s, each engine's scaling from 1 to 2 workers, the engines as a share of the
per-line scoring (issue 25's goal for the local engine: at least 90 %), each engine's fixed cost
(the same run over a single document: workers or actors started, the bundle loaded) and the
tokens/s without it, the local Ray cluster's start and stop, the CPU's flags and the measured
fp32 matmul peak (bench/common.py), and checks that every engine wrote the same rows. The model is `--bundle`, else one exported from `--run`, else an untrained
standard_lstm_lm_200 over the WikiText-2 vocabulary (speed does not depend on the weights),
exported in a child process so that this one never loads TensorFlow.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from bench.bench_soak import cpu_flags
from bench.common import child_env, matmul_peak

_EXPORT = """
import sys
from pathlib import Path
from bench.bench_score import pick_run
from export.to_onnx import export_run
work, data_root, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] or None
run, origin = pick_run(spec, work, data_root)
print(export_run(run, work / "bundle"), origin, sep="\\n")
"""


def bundle_for(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The bundle to score with and where it came from (see the module docstring)."""
    if args.bundle is not None:
        return args.bundle, "given bundle"
    done = subprocess.run([sys.executable, "-c", _EXPORT, str(work), str(args.data_root),
                           args.run or ""], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), check=False)
    if done.returncode != 0:
        raise SystemExit(f"exporting the bundle failed:\n{done.stderr[-3000:]}")
    bundle, origin = done.stdout.strip().splitlines()[-2:]
    return Path(bundle), f"{origin} standard_lstm_lm_200, exported"


def write_documents(source: Path, count: int, shards: int, folder: Path) -> tuple[Path, Path]:
    """The first `count` non-empty lines of `source` as a text file (one document a line) and
    as `shards` JSON Lines files (`id`, `text`) in `folder`/jsonl; (text file, JSON folder)."""
    lines = []
    with source.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
                if len(lines) == count:
                    break
    text = folder / "documents.txt"
    text.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    jsonl = folder / "jsonl"
    jsonl.mkdir()
    per_shard = -(-len(lines) // shards)
    for k in range(shards):
        with (jsonl / f"part-{k:03d}.jsonl").open("w", encoding="utf-8") as f:
            for i in range(k * per_shard, min(len(lines), (k + 1) * per_shard)):
                f.write(json.dumps({"id": f"doc-{i}", "text": lines[i]}) + "\n")
    (folder / "one.jsonl").write_text(json.dumps({"id": "one", "text": lines[0]}) + "\n",
                                      encoding="utf-8")
    return text, jsonl


def bench_per_line(bundle: Path, text: Path) -> dict:
    """Scorer.score_samples over the text file with every core, after a short warm-up."""
    from serve.scorer import Scorer

    scorer = Scorer(bundle)
    warm = text.with_name("warm.txt")
    warm.write_text("".join(text.open(encoding="utf-8").readlines()[:40]), encoding="utf-8")
    list(scorer.score_samples(warm))
    started = time.perf_counter()
    tokens = sum(score.num_tokens for score in scorer.score_samples(text))
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def bench_score_cli(bundle: Path, text: Path, out: Path) -> dict:
    """`serve/score.py TEXT --per-line OUT` as a command: its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "serve" / "score.py"), str(text),
                           "--model", str(bundle), "--per-line", str(out), "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=child_env(), check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"serve/score.py failed: {done.stderr.strip()}")
    with out.open(encoding="utf-8") as f:
        tokens = sum(json.loads(line)["num_tokens"] for line in f)
    return {"tokens": tokens, "seconds": seconds}


def bench_engine(engine, jsonl: Path, one: Path, out: Path, bundle: Path, workers: int
                 ) -> dict:
    """A run of a dataset engine (serve.dataset.local or .ray_engine) over the JSON Lines, and
    its fixed cost: a run over the one-document shard `one` (workers or actors started, the
    bundle loaded, one tiny chunk scored and written)."""
    fixed = _engine_run(engine, one, out.with_name(out.name + "-one"), bundle, workers)
    summary = _engine_run(engine, jsonl, out, bundle, workers)
    return {"tokens": summary.tokens, "seconds": summary.seconds, "fixed": fixed.seconds,
            "threads": getattr(summary, "threads", None)}


def _engine_run(engine, inputs: Path, out: Path, bundle: Path, workers: int):
    from serve.dataset.plan import DatasetOptions, expand_inputs

    options = DatasetOptions()
    shards = expand_inputs([str(inputs)], str(out), options)
    summary = engine.run(shards, bundle, options, workers, stream=io.StringIO())
    if summary.failures or summary.written != len(shards):
        raise SystemExit(f"{engine.__name__} failed: {summary.failures}")
    return summary


def same_outputs(folders: list[Path]) -> bool:
    """Whether every folder holds the same files with the same rows."""
    import pyarrow.parquet as pq

    def tables(folder: Path) -> dict:
        return {p.name: pq.read_table(p) for p in sorted(folder.iterdir())}

    first = tables(folders[0])
    return all(tables(f).keys() == first.keys()
               and all(t.equals(first[n]) for n, t in tables(f).items()) for f in folders[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder to score with")
    p.add_argument("--run", default=None, help="run to export and score with (default: see "
                   "the module docstring)")
    p.add_argument("--documents", type=int, default=4000,
                   help="WikiText-2 train lines to score, one document each (default 4000)")
    p.add_argument("--shards", type=int, default=4, help="JSON Lines files they are cut into")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of every measurement, interleaved; the best of each is shown "
                        "(the machine may be shared)")
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    args = p.parse_args(argv)
    args.data_root = args.data_root.expanduser()

    load_before = os.getloadavg()
    peak = matmul_peak()
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        work = Path(tmp)
        bundle, origin = bundle_for(args, work)
        one = work / "one.jsonl"
        text, jsonl = write_documents(args.data_root / "wikitext-2" / "wiki.train.tokens",
                                      args.documents, args.shards, work)
        rounds = [one_round(k, work, bundle, text, jsonl, one) for k in range(args.repeats)]
        identical = same_outputs(sorted(p for p in work.glob("out-*")
                                        if not p.name.endswith("-one")))
    peak = max(peak, matmul_peak())
    load_after = os.getloadavg()

    rows = {key: min((r[key] for r in rounds), key=lambda row: row["seconds"])
            for key in rounds[0]}
    for key, row in rows.items():  # each fixed cost, the least seen too
        if "fixed" in row:
            row["fixed"] = min(r[key]["fixed"] for r in rounds)
    report(args, origin, rows, identical, peak, load_before, load_after)
    return 0 if identical else 1


def one_round(k: int, work: Path, bundle: Path, text: Path, jsonl: Path, one: Path) -> dict:
    """Every measurement once (see the module docstring): rows by key."""
    import ray

    from serve.dataset import local, ray_engine

    rows = {"per-line": bench_per_line(bundle, text),
            "score.py": bench_score_cli(bundle, text, work / f"per-line-{k}.jsonl")}
    for workers in (1, 2):
        rows[f"local {workers}"] = bench_engine(local, jsonl, one, work / f"out-{k}-local-"
                                                f"{workers}", bundle, workers)
    started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    rows["ray start"] = {"seconds": time.perf_counter() - started}
    try:
        for workers in (1, 2):
            rows[f"ray {workers}"] = bench_engine(ray_engine, jsonl, one, work / f"out-{k}-ray-"
                                                  f"{workers}", bundle, workers)
    finally:
        started = time.perf_counter()
        ray.shutdown()
        rows["ray stop"] = {"seconds": time.perf_counter() - started}
    return rows


def report(args, origin: str, rows: dict, identical: bool, peak: tuple[float, str],
           load_before, load_after) -> None:
    """Print the figures (see the module docstring)."""
    base = rows["per-line"]["tokens"] / rows["per-line"]["seconds"]
    print(f"best of {args.repeats} interleaved round(s); {args.documents:,} WikiText-2 train lines "
          f"as documents ({rows['per-line']['tokens']:,} tokens with <eos>), {args.shards} JSON "
          f"Lines shards; model: {origin}")
    print(f"machine: {cpu_flags()}; fp32 matmul peak {peak[0]:.1f} GFLOP/s ({peak[1]}); load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min)")
    print(f"{'scoring':<40}{'workers':>8}{'threads':>8}{'tokens/s':>10}{'seconds':>9}"
          f"{'vs per-line':>12}{'scaling':>9}")
    labels = {"per-line": ("Scorer.score_samples (--per-line)", "1", "all"),
              "score.py": ("serve/score.py --per-line (command)", "1", "all"),
              "local 1": ("serve.dataset --engine local", "1", None),
              "local 2": ("serve.dataset --engine local", "2", None),
              "ray 1": ("serve.dataset --engine ray", "1", None),
              "ray 2": ("serve.dataset --engine ray", "2", None)}
    for key, (label, workers, threads) in labels.items():
        row = rows[key]
        speed = row["tokens"] / row["seconds"]
        scaling = ""
        if key.endswith(" 2"):
            one = rows[key[:-1] + "1"]
            scaling = f"{speed / (one['tokens'] / one['seconds']):.2f}x"
        shown = threads or (str(row["threads"]) if row.get("threads") else
                            str(max(1, (os.cpu_count() or 1) // int(workers))))
        print(f"{label:<40}{workers:>8}{shown:>8}{speed:>10,.0f}{row['seconds']:>9.2f}"
              f"{100 * speed / base:>11.1f}%{scaling:>9}")
    print("(score.py's command time also covers its start-up and the corpus perplexity it "
          "computes first; an engine's time covers its whole run: planning, workers or actors "
          "started, the bundle loaded, outputs written)")
    print(f"{'fixed cost (a one-document run)':<40}{'workers':>8}{'seconds':>9}"
          f"{'tokens/s without it':>21}{'vs per-line':>12}")
    for key in ("local 1", "local 2", "ray 1", "ray 2"):
        row = rows[key]
        steady = row["tokens"] / max(1e-9, row["seconds"] - row["fixed"])
        print(f"{labels[key][0]:<40}{labels[key][1]:>8}{row['fixed']:>9.2f}{steady:>21,.0f}"
              f"{100 * steady / base:>11.1f}%")
    print(f"ray's cluster: {rows['ray start']['seconds']:.2f} s to start a local one, "
          f"{rows['ray stop']['seconds']:.2f} s to stop it "
          f"(on top of the fixed cost above, when a run starts its own)")
    print(f"every engine wrote the same rows: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
