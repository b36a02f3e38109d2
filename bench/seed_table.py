"""Per-epoch validation and test perplexity of several runs (seeds) side by side, with the spread.

    python bench/seed_table.py runs/seed1-wikitext2 runs/seed2-wikitext2 [--reference NAME=PATH]

Prints a Markdown table: one column pair per run, then the mean and the spread (max - min) over
the runs that reached that epoch. `--reference NAME=metrics.jsonl` adds another run's figures
(for instance the previous model's) as columns for comparison; GluonNLP's published log is built
in. Reads only `metrics.jsonl`: no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# GluonNLP's published log of standard_lstm_lm_200 on WikiText-2 (the tutorial's 3 epochs):
# validation and test perplexity by epoch.
GLUONNLP = {1: (228.54, 209.29), 2: (173.08, 159.40), 3: (160.67, 148.33)}


def read_metrics(path: Path) -> dict[int, dict]:
    """Epoch number -> that epoch's record, from a run folder or a metrics.jsonl file."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["epoch"]: r for r in records}


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _mean_and_spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 run)"
    return f"{sum(values) / len(values):.2f} ({max(values) - min(values):.2f})"


def table(runs: dict[str, dict[int, dict]], references: dict[str, dict[int, dict]]) -> str:
    epochs = sorted({e for metrics in runs.values() for e in metrics})
    head = ["epoch"]
    for name in runs:
        head += [f"valid {name}", f"test {name}"]
    head += ["valid mean (spread)", "test mean (spread)"]
    for name in references:
        head += [f"valid {name}", f"test {name}"]
    head += ["valid GluonNLP", "test GluonNLP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for epoch in epochs:
        row = [str(epoch)]
        vals, tests = [], []
        for metrics in runs.values():
            record = metrics.get(epoch, {})
            row += [fmt(record.get("val_ppl")), fmt(record.get("test_ppl"))]
            if "val_ppl" in record:
                vals.append(record["val_ppl"])
            if "test_ppl" in record:
                tests.append(record["test_ppl"])
        for values in (vals, tests):
            row.append(_mean_and_spread(values))
        for metrics in references.values():
            record = metrics.get(epoch, {})
            row += [fmt(record.get("val_ppl")), fmt(record.get("test_ppl"))]
        row += [fmt(v) for v in GLUONNLP.get(epoch, (None, None))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or metrics.jsonl files")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=PATH",
                        help="another run's metrics to show beside them")
    args = parser.parse_args(argv)
    try:
        runs = {path.name if path.is_dir() else path.stem: read_metrics(path) for path in args.runs}
        references = {}
        for spec in args.reference:
            name, _, path = spec.partition("=")
            references[name] = read_metrics(Path(path))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(runs, references))
    return 0


if __name__ == "__main__":
    sys.exit(main())
