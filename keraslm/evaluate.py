"""CLI: perplexity of a trained run on any corpus — `python -m keraslm.evaluate RUN`.

Every token is scored (BPTT columns with `last_batch='keep'` and masking); tokens outside the
run's vocabulary become `<unk>` and are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from keraslm.errors import UserError
from keraslm.quiet import start_tensorflow


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m keraslm.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default=None, help="run name or path (default: newest)")
    p.add_argument("--corpus", default="wikitext-2", help="corpus name or a file path")
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    p.add_argument("--format", choices=("tokens", "raw"), default=None,
                   help="tokenize as this format instead of the run's own pipeline")
    p.add_argument("--moses-tutorial", action="store_true",
                   help="the tutorial's Moses settings (XML escaping on, <unk> not protected)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--data-root", default=None)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        start_tensorflow()
        from keraslm.evaluation import evaluate_run  # TensorFlow: only once the flags are good

        result = evaluate_run(args.run, args.corpus, args.split, batch_size=args.batch_size,
                              bptt=args.bptt, data_root=args.data_root, fmt=args.format,
                              moses_tutorial=args.moses_tutorial, runs_root=args.runs_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"run: {result.model}\ntext: {result.source} ({result.pipeline})\n"
              f"tokens scored: {result.num_tokens:,}\n"
              f"OOV: {result.num_oov:,} ({100 * result.oov_rate:.2f}%)\n"
              f"perplexity: {result.perplexity:.2f} (batch size {result.batch_size}, "
              f"bptt {result.bptt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
