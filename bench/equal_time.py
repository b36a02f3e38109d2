"""Training runs compared at equal wall time: per-epoch validation perplexity against the hours
each run had spent by then, training tokens/s and their share of the matmul peak, and the best
validation perplexity every run had reached when the shortest one stopped.

    python bench/equal_time.py runs/awd600 runs/std650 [--peak GFLOPS]

An epoch's wall time is its training `seconds` plus its `eval_seconds` (validation, test and
saving, from metrics.jsonl). Runs recorded before `eval_seconds` existed take their epochs' ends
from the TensorBoard event files in `logs/` instead (their wall-clock stamps, counted from the
first event), which needs TensorFlow and a run that was never resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.common import flops_per_token
from bench.seed_table import read_metrics


def epoch_hours(run: Path, records: dict[int, dict]) -> dict[int, float]:
    """Epoch -> wall-clock hours from the start of training to that epoch's end."""
    if all("eval_seconds" in r for r in records.values()):
        total, hours = 0.0, {}
        for epoch in sorted(records):
            total += records[epoch]["seconds"] + records[epoch]["eval_seconds"]
            hours[epoch] = total / 3600
        return hours
    return _hours_from_events(run / "logs")


def _hours_from_events(logs: Path) -> dict[int, float]:
    from keraslm.backend import tf

    (events,) = sorted(logs.glob("events.out.tfevents.*"))  # one: never resumed
    start, ends = None, {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        start = event.wall_time if start is None else start
        if any(v.tag == "val_ppl" for v in event.summary.value):
            ends[int(event.step)] = (event.wall_time - start) / 3600
    return ends


def training_flops(run: Path) -> float:
    """FLOPs a training token costs: forward and backward (3x the forward's multiply-adds x 2)."""
    model = json.loads((run / "config.json").read_text())["model"]
    return 3 * flops_per_token(model)


def best_by(hours: dict[int, float], records: dict[int, dict], limit: float
            ) -> tuple[float, int] | None:
    """The best validation perplexity among the epochs that ended within `limit` hours."""
    done = [(records[e]["val_ppl"], e) for e in records if hours[e] <= limit + 1e-9]
    return min(done) if done else None


def table(runs: list[Path], peak: float | None) -> str:
    """The comparison as Markdown."""
    lines = []
    summaries = {}
    for run in runs:
        records = read_metrics(run)
        hours = epoch_hours(run, records)
        flops = training_flops(run)
        lines += [f"**{run.name}** ({flops / 1e6:.1f} MFLOP a training token)", "",
                  "| epoch | hours | val ppl | test ppl | tokens/s | % of peak |",
                  "|---|---|---|---|---|---|"]
        for epoch in sorted(records):
            r = records[epoch]
            share = f"{100 * r['tokens_per_s'] * flops / (peak * 1e9):.0f} %" if peak else "-"
            test = f"{r['test_ppl']:.2f}" if "test_ppl" in r else "-"
            averaged = " (averaged)" if r.get("averaged") else ""
            lines.append(f"| {epoch} | {hours[epoch]:.2f} | {r['val_ppl']:.2f}{averaged} | {test} "
                         f"| {r['tokens_per_s']:,.0f} | {share} |")
        lines.append("")
        summaries[run.name] = (hours, records)
    limit = min(max(hours.values()) for hours, _ in summaries.values())
    lines.append(f"At equal wall time ({limit:.2f} h, where the shortest run's last epoch ended):")
    lines.append("")
    for name, (hours, records) in summaries.items():
        best = best_by(hours, records, limit)
        lines.append(f"- {name}: " + (f"best validation perplexity {best[0]:.2f} (epoch {best[1]})"
                                      if best else "no epoch finished"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--peak", type=float, help="the matmul peak (GFLOP/s) the runs had: "
                        "adds each epoch's tokens/s as a share of it")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            parser.error(f"{run}: no metrics.jsonl (not a run folder, or no epoch finished)")
    print(table(args.runs, args.peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
