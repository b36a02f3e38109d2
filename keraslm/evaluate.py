"""CLI: perplexity of a trained run on any corpus — `python -m keraslm.evaluate RUN`.

Every token is scored (BPTT columns with `last_batch='keep'` and masking); tokens outside the
run's vocabulary become `<unk>` and are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

from keraslm.errors import UserError


@dataclass(frozen=True)
class EvalResult:
    """Perplexity of one run on one text, and exactly what was scored."""

    run: str
    source: str
    path: str
    num_tokens: int      # targets scored
    num_oov: int         # stream tokens not in the vocabulary (mapped to <unk>)
    nll_sum: float
    perplexity: float
    batch_size: int
    bptt: int
    pipeline: str

    @property
    def oov_rate(self) -> float:
        return self.num_oov / max(self.num_tokens, 1)


def evaluate_run(run, source: str, split: str = "valid", *, batch_size: int = 10, bptt: int = 35,
                 data_root: str | None = None, fmt: str | None = None,
                 moses_tutorial: bool = False, runs_root: str = "runs",
                 jit_compile: bool = False) -> EvalResult:
    """Perplexity of `run`'s best weights on a corpus split or a file, with the run's vocab."""
    from keraslm.batching import BPTTBatches
    from keraslm.corpora import CORPORA
    from keraslm.data import encode_file, make_pipeline, resolve_paths
    from keraslm.model import LMConfig, build_model
    from keraslm.rundir import RunDir, resolve_run
    from keraslm.text import TextPipeline
    from keraslm.trainer import Evaluator, perplexity
    from keraslm.vocab import Vocab

    run = run if isinstance(run, RunDir) else resolve_run(run, runs_root)
    config = run.read_config()
    vocab = Vocab.load(run.vocab_path)
    model_config = LMConfig.from_dict(config["model"])
    if model_config.vocab_size != len(vocab):
        raise UserError(f"{run.vocab_path}: {len(vocab)} tokens but the run's model has "
                        f"{model_config.vocab_size}: vocabulary and run do not match")
    if not run.best_weights_path.is_file():
        raise UserError(f"{run.path}: no best weights yet ({run.best_weights_path.name} missing)")
    # A named corpus brings its own text format; your own file is read like the run's corpus.
    if fmt or moses_tutorial or source in CORPORA:
        pipeline = make_pipeline(source, fmt, moses_tutorial)
    else:
        pipeline = TextPipeline.from_dict(config["pipeline"])
    path = resolve_paths(None, {split: source}, data_root, splits=(split,))[split]
    encoded = encode_file(split, path, pipeline, vocab)
    batches = BPTTBatches(encoded.ids, batch_size, bptt, "keep")
    model = build_model(model_config)
    try:
        model.load_weights(run.best_weights_path)
    except (ValueError, OSError) as err:
        raise UserError(f"{run.best_weights_path}: cannot load weights ({err})") from None
    nll_sum, count = Evaluator(model, jit_compile=jit_compile)(batches)
    return EvalResult(run=str(run.path), source=source, path=str(path), num_tokens=count,
                      num_oov=encoded.num_oov, nll_sum=nll_sum,
                      perplexity=perplexity(nll_sum, count), batch_size=batch_size, bptt=bptt,
                      pipeline=pipeline.describe())


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
        result = evaluate_run(args.run, args.corpus, args.split, batch_size=args.batch_size,
                              bptt=args.bptt, data_root=args.data_root, fmt=args.format,
                              moses_tutorial=args.moses_tutorial, runs_root=args.runs_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**asdict(result), "oov_rate": result.oov_rate}))
    else:
        print(f"run: {result.run}\ntext: {result.path} ({result.pipeline})\n"
              f"tokens scored: {result.num_tokens:,}\n"
              f"OOV: {result.num_oov:,} ({100 * result.oov_rate:.2f}%)\n"
              f"perplexity: {result.perplexity:.2f} (batch size {result.batch_size}, "
              f"bptt {result.bptt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
