"""CLI: the training curve of a run — `python -m keraslm.plot [RUN] [--out curve.png]`.

Train, validation and (where measured) test perplexity per epoch, from the run's
`metrics.jsonl`, on a log scale; epochs where the learning rate decayed are marked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keraslm.errors import UserError
from keraslm.rundir import RunDir, atomic_path, resolve_run


def plot_run(run: RunDir, out: Path, title: str | None = None) -> Path:
    """Draw the run's perplexity curves into a small PNG at `out` (written atomically)."""
    records = run.read_metrics()
    if not records:
        raise UserError(f"{run.metrics_path}: no epochs recorded yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, [r["train_ppl"] for r in records], "o-", label="train")
    ax.plot(epochs, [r["val_ppl"] for r in records], "s-", label="validation")
    tested = [r for r in records if "test_ppl" in r]
    if tested:
        ax.plot([r["epoch"] for r in tested], [r["test_ppl"] for r in tested], "^--", label="test")
    for r in records:
        if not r.get("best", True):
            ax.axvline(r["epoch"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_xticks(epochs)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or run.name, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m keraslm.plot", description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default=None, help="run name or path (default: newest)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/curve.png)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        run = resolve_run(args.run, args.runs_dir)
        out = plot_run(run, Path(args.out) if args.out else run.path / "curve.png", args.title)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
