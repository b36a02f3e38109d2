"""CLI: perplexity of a text under an exported bundle — `python serve/score.py corpus.txt`.

The corpus is scored as `--batch-size` parallel streams with carried state, exactly as
`keraslm.evaluate` scores it, in memory that grows neither with the file nor with its lines.
The summary reads like KenLM's `query` (one `Key:<TAB>value` per line); `--json` prints one JSON
object instead, and `--per-line out.jsonl` also scores every line (every sentence for raw text)
on its own. Input that is not text (a NUL byte) is refused in one line.
Log-likelihoods are natural logs. Runs on onnxruntime alone: never imports TensorFlow.

The continuous cache (serve/cache.py): `--cache-size N` mixes every target's probability with a
distribution over the words that followed the last N positions of its stream (`--cache-theta`,
`--cache-lambda`); `--tune-cache VALID` chooses θ and λ on VALID first, then scores the corpus
with them (or, without a corpus, prints them as flags). A corpus is never scored with settings
tuned on itself.
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

# The only BLAS work here is the continuous cache's similarity matmul, which runs between two
# onnxruntime calls: OpenBLAS's own threads then fight onnxruntime's (measured 2.5x slower at
# batch 20 on 2 cores), one thread does not. Set before numpy loads; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if not __package__:  # run as `python serve/score.py`: import `serve` from this checkout
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

from keraslm.errors import UserError
from keraslm.files import atomic_path, open_binary
from keraslm.scores import CorpusScore, finite_or_none
from keraslm.text import pipeline_for_format
from serve.bundle import DEFAULT_BUNDLES_ROOT, resolve_bundle
from serve.cache import CacheSettings, TuneResult
from serve.cache_flags import add_cache_flags, cache_settings
from serve.scorer import Scorer, TextBytes
from serve.session import DEVICES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python serve/score.py",
                                description=__doc__.splitlines()[0].split(" — ")[0])
    p.add_argument("corpus", nargs="?", default=None,
                   help="text file to score, or - for standard input (optional with "
                        "--tune-cache: then only the tuned settings are printed)")
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
    cache = add_cache_flags(p)
    cache.add_argument("--tune-cache", metavar="VALID_FILE", default=None,
                       help="choose THETA and LAMBDA for the window on this validation text "
                            "(same layout as the scoring; holds 4 bytes a token per unit of "
                            "the last LSTM layer in memory), then score the corpus with them")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.corpus is None and (args.tune_cache is None or args.per_line is not None):
        parser.error("the following arguments are required: corpus")
    tuning = result = None
    try:
        cache = cache_settings(args)
        if args.tune_cache is not None and args.corpus is not None:
            _check_not_same(args.tune_cache, args.corpus)
        scorer = Scorer(resolve_bundle(args.model), device=args.device, threads=args.threads,
                        batch_size=args.batch_size, bptt=args.bptt,
                        pipeline=pipeline_for_format(args.format) if args.format else None,
                        cache=cache)
        if args.tune_cache is not None:
            scorer.cache = None
            valid = _display_name(args.tune_cache)
            with _readable(args.tune_cache) as path:
                tuning = scorer.tune_cache(path, int(args.cache_size), errors=args.errors,
                                           name=valid)
            scorer.cache = tuning.settings
        if args.corpus is not None:
            name = _display_name(args.corpus)
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
    if args.json:
        report = {} if result is None else result.to_dict()
        if tuning is not None:
            report["cache_tuning"] = _json_safe(tuning.to_dict())
        print(json.dumps(report))
    else:
        print("\n".join(filter(None, [result and summary(result),
                                       tuning and tuning_summary(tuning)])))
    return 0


def _display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _check_not_same(valid: str, corpus: str) -> None:
    """Refuse to report a perplexity with settings tuned on the same text: the same name, or the
    same file by two names, standard input ("-") included."""
    valid_id = _regular_file_id(valid)
    if valid == corpus or (valid_id is not None and valid_id == _regular_file_id(corpus)):
        also = "" if valid == corpus else f" ({_display_name(corpus)})"
        raise UserError(f"--tune-cache {valid} is the corpus being scored{also}: tune on "
                        f"validation text and report on other text")


def _regular_file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the regular file `path` names, standard input's for "-"; None for
    anything else: a pipe or a device is read once, so it is never the same text as another."""
    try:
        st = os.fstat(0) if path == "-" else os.stat(path)
    except OSError:  # missing, or no standard input: the reader says so, if it is read
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def summary(r: CorpusScore) -> str:
    """The readable report: one `Key:<TAB>value` per line, numbers without separators."""
    rows = [
        ("Bundle", f"{r.model} [{r.runtime}]"),
        ("Text", f"{r.source} ({r.pipeline})"),
        ("Layout", f"{r.batch_size} streams x bptt {r.bptt}, state carried (as keraslm.evaluate)"),
        ("Tokens", f"{r.num_tokens} scored of {r.num_stream_tokens}"),
        ("OOVs", f"{r.num_oov} ({100 * r.oov_rate:.2f}% of the text, scored as <unk>)"),
        ("<unk> targets", f"{r.num_unk} (out-of-vocabulary or a literal <unk>)"),
        ("Average NLL", f"{r.avg_nll:.4f} nats per token"),
        ("Perplexity including <unk>", f"{r.perplexity:.2f}"),
        ("Perplexity excluding <unk>",
         f"{r.perplexity_excl_unk:.2f} (exp of the mean NLL over targets that are not <unk>)"),
        ("Cache", "off" if r.cache is None else
         f"{CacheSettings(r.cache['size'], r.cache['theta'], r.cache['lambda']).describe()} "
         f"(continuous cache, per stream, carried with the state)"),
        ("Speed", f"{r.tokens_per_second:.0f} tokens/s ({r.seconds:.2f} s)"),
    ]
    return "\n".join(f"{key}:\t{value}" for key, value in rows)


def tuning_summary(t: TuneResult) -> str:
    """The cache tuning's report, in the summary's `Key:<TAB>value` form."""
    tried = f"{t.num_tokens} targets; {len(t.grid)} theta values, lambda optimal for each"
    rows = [
        ("Cache tuned on", f"{t.source} ({tried})"),
        ("Cache best", t.settings.describe()),
        ("Cache tuning perplexity",
         f"{t.perplexity:.2f} with the cache, {t.perplexity_off:.2f} without (on {t.source})"),
        ("Cache flags", t.settings.flags()),
    ]
    return "\n".join(f"{key}:\t{value}" for key, value in rows)


def _json_safe(value):
    """JSON has no infinity or NaN: null instead."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_per_line(scorer: Scorer, path: Path, out: Path, errors: str = "strict",
                   name: str | None = None) -> None:
    """Score every sample of `path` on its own into `out` (JSON lines; written atomically).

    Each row says the continuous cache's settings ("cache": null when off); with the cache on,
    every sample starts with an empty cache."""
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            scores = scorer.score_samples(path, errors, name=name)
            cache = None if scorer.cache is None else scorer.cache.to_dict()
            f.writelines(json.dumps({"index": i, **score.to_dict(), "cache": cache}) + "\n"
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
        source = (sys.stdin.buffer if corpus == "-"
                  else stack.enter_context(open_binary(corpus, name)))
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
