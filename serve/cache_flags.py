"""The continuous cache's command-line flags, shared by the scoring CLIs (serve/score.py and
python -m serve.dataset): `--cache-size N` turns the cache on, `--cache-theta` and
`--cache-lambda` set it, and a bad value is one line of UserError naming its flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from keraslm.errors import UserError
from serve.cache import CacheSettings

# GluonNLP's tuned values for standard_lstm_lm_200 on WikiText-2 (cache_language_model.py);
# tune your own with `serve/score.py --tune-cache`.
DEFAULT_THETA, DEFAULT_LAMBDA = 0.662, 0.1279


def add_cache_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the cache's group of flags to `parser`; the group is returned for more flags."""
    cache = parser.add_argument_group(
        "continuous cache", "mix each target's probability with the words that followed the "
        "last N positions of its stream, weighted by hidden-state similarity (Grave et al. 2017)")
    cache.add_argument("--cache-size", metavar="N", default=None,
                       help="turn the cache on with a window of N positions")
    cache.add_argument("--cache-theta", metavar="THETA", default=None,
                       help=f"similarity scale, >= 0 (default {DEFAULT_THETA})")
    cache.add_argument("--cache-lambda", metavar="LAMBDA", default=None,
                       help=f"the cache's weight, in [0, 1] (default {DEFAULT_LAMBDA})")
    return cache


def cache_settings(args: argparse.Namespace) -> CacheSettings | None:
    """The cache settings the flags ask for (None: off); one-line UserError for bad values.

    `args.tune_cache`, where the parser has that flag, chooses theta and lambda itself."""
    tune_cache = getattr(args, "tune_cache", None)
    given = [flag for flag, value in (("--cache-theta", args.cache_theta),
                                      ("--cache-lambda", args.cache_lambda),
                                      ("--tune-cache", tune_cache)) if value is not None]
    if args.cache_size is None:
        if given:
            raise UserError(f"{given[0]} needs --cache-size N (the cache's window)")
        return None
    if tune_cache is not None and len(given) > 1:
        raise UserError("--tune-cache chooses theta and lambda: drop --cache-theta and "
                        "--cache-lambda")
    size = _parse("--cache-size", args.cache_size, int, "an integer >= 1", lambda v: v >= 1)
    theta = _parse("--cache-theta", args.cache_theta, float, "a number >= 0",
                   lambda v: math.isfinite(v) and v >= 0, DEFAULT_THETA)
    lam = _parse("--cache-lambda", args.cache_lambda, float, "a number in [0, 1]",
                 lambda v: 0 <= v <= 1, DEFAULT_LAMBDA)
    return CacheSettings(size, theta, lam)


def _parse(flag: str, text: str | None, kind: type, expected: str, ok: Callable,
           default=None):
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise UserError(f"{flag}: expected {expected}, got {text!r}")
    return value
