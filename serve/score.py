"""CLI: perplexity of a text under an exported bundle — `python serve/score.py corpus.txt`.

The corpus is scored as `--batch-size` parallel streams with carried state, exactly as
`keraslm.evaluate` scores it, in memory that grows neither with the file nor with its lines.
The summary reads like KenLM's `query` (one `Key:<TAB>value` per line); `--json` prints one JSON
object instead, and `--per-line out.jsonl` also scores every line (every sentence for raw text)
on its own. Input that is not text (a NUL byte) is refused in one line.
Log-likelihoods are natural logs. Runs on onnxruntime alone: never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if not __package__:  # run as `python serve/score.py`: import `serve` from this checkout
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

from keraslm.errors import UserError
from keraslm.rundir import atomic_path
from keraslm.text import pipeline_for_format
from serve.bundle import DEFAULT_BUNDLES_ROOT, resolve_bundle
from serve.scorer import DEVICES, CorpusScore, Scorer, TextBytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python serve/score.py",
                                description=__doc__.splitlines()[0].split(" — ")[0])
    p.add_argument("corpus", help="text file to score, or - for standard input")
    p.add_argument("--model", default=None,
                   help=f"bundle folder or name under {DEFAULT_BUNDLES_ROOT}/ "
                        "(default: the newest bundle there)")
    p.add_argument("--format", choices=("tokens", "raw"), default=None,
                   help="read the text as WikiText-style tokens or raw text "
                        "(default: the bundle's own text pipeline)")
    p.add_argument("--batch-size", type=_positive, default=20,
                   help="parallel streams, as in training and evaluation (default 20)")
    p.add_argument("--bptt", type=_positive, default=35, help="time steps per chunk (default 35)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--per-line", metavar="OUT.jsonl", type=Path, default=None,
                   help="also score each line (each sentence for raw text) on its own, "
                        "one JSON object per line")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="onnxruntime device (auto: CUDA when installed and present)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="invalid UTF-8: stop with its position (strict) or replace it (replace)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input, 2 bad flags)."""
    args = build_parser().parse_args(argv)
    try:
        scorer = Scorer(resolve_bundle(args.model), device=args.device, threads=args.threads,
                        batch_size=args.batch_size, bptt=args.bptt,
                        pipeline=pipeline_for_format(args.format) if args.format else None)
        name = "<stdin>" if args.corpus == "-" else args.corpus
        with _readable(args.corpus) as path:
            result = scorer.score_file(path, errors=args.errors, name=name)
            if args.per_line is not None:
                write_per_line(scorer, path, args.per_line, args.errors, name)
    except UserError as err:
        # The library speaks of its keyword argument; here the user's knob is the flag.
        message = str(err).replace("decode with errors='replace'", "pass --errors replace")
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result.to_dict()) if args.json else summary(result))
    return 0


def summary(r: CorpusScore) -> str:
    """The readable report: one `Key:<TAB>value` per line, numbers without separators."""
    rows = [
        ("Bundle", f"{r.bundle} [{r.provider}]"),
        ("Text", f"{r.source} ({r.pipeline})"),
        ("Layout", f"{r.batch_size} streams x bptt {r.bptt}, state carried (as keraslm.evaluate)"),
        ("Tokens", f"{r.num_tokens} scored of {r.num_stream_tokens}"),
        ("OOVs", f"{r.num_oov} ({100 * r.oov_rate:.2f}% of the text, scored as <unk>)"),
        ("<unk> targets", f"{r.num_unk} (out-of-vocabulary or a literal <unk>)"),
        ("Average NLL", f"{r.avg_nll:.4f} nats per token"),
        ("Perplexity including <unk>", f"{r.perplexity:.2f}"),
        ("Perplexity excluding <unk>",
         f"{r.perplexity_excl_unk:.2f} (exp of the mean NLL over targets that are not <unk>)"),
        ("Speed", f"{r.tokens_per_second:.0f} tokens/s ({r.seconds:.2f} s)"),
    ]
    return "\n".join(f"{key}:\t{value}" for key, value in rows)


def write_per_line(scorer: Scorer, path: Path, out: Path, errors: str = "strict",
                   name: str | None = None) -> None:
    """Score every sample of `path` on its own into `out` (JSON lines; written atomically)."""
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            scores = scorer.score_samples(path, errors, name=name)
            f.writelines(json.dumps({"index": i, **score.to_dict()}) + "\n"
                         for i, score in enumerate(scores))
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None


COPY_CHUNK = 1 << 20


@contextmanager
def _readable(corpus: str) -> Iterator[Path]:
    """The corpus as a file the scorer can read more than once. Standard input, a FIFO or a
    device is read once, a chunk at a time, into a temporary file, through the scorer's reader:
    it stops at the first NUL byte (no text has one; /dev/zero would otherwise fill the disk)."""
    if corpus != "-":
        try:
            mode = os.stat(corpus).st_mode
            rereadable = stat.S_ISREG(mode) or stat.S_ISDIR(mode)
        except OSError:
            rereadable = True  # missing or unreadable: the scorer's reader says so in one line
        if rereadable:  # a folder too: the reader's "is a directory" is the clearer message
            yield Path(corpus)
            return
    name = "<stdin>" if corpus == "-" else corpus
    with contextlib.ExitStack() as stack:
        try:
            source = sys.stdin.buffer if corpus == "-" else stack.enter_context(open(corpus, "rb"))
        except OSError as err:
            raise UserError(f"cannot read {name}: {err.strerror or err}") from None
        reader = TextBytes(source, name)  # reading errors and NUL bytes: UserError
        try:
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(prefix="keraslm-input-",
                                                                  suffix=".txt"))
            while chunk := reader.read(COPY_CHUNK):
                tmp.write(chunk)
            tmp.flush()
        except OSError as err:
            raise UserError(f"cannot copy {name} to a temporary file: "
                            f"{err.strerror or err}") from None
        yield Path(tmp.name)


if __name__ == "__main__":
    sys.exit(main())
