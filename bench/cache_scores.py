"""Benchmark: the continuous cache's test perplexity and speed for one bundle (issue 16).

    python bench/cache_scores.py --model BUNDLE --valid VALID --test TEST \\
        [--windows 100 500 2000] [--batch-size 1] [--bptt 35] [--speed-batch-sizes 1 20] \\
        [--json OUT.json]

1. Runs the network once over VALID and once over TEST (serve.scorer.Scorer.record_file, in
   score.py's layout at --batch-size) and keeps what the cache needs.
2. For each window: tunes θ and λ on VALID (serve.cache.tune), then scores TEST with them (the
   recording replayed through the same cache code the scorer runs). Never tuned on TEST.
3. Scores TEST with `Scorer.score_file` without the cache and with the largest window's tuned
   cache, side by side at each --speed-batch-sizes (off, on, off, on, ...: the best and the
   median of each), timing the cache's own code inside the cached runs (its share does not
   depend on how busy the machine's other cores are as much as tokens/s do); the cached
   perplexity is checked against the replayed one.

Prints a Markdown table; --json writes every figure. As in score.py, OpenBLAS is held to one
thread (its threads fight onnxruntime's; see serve/score.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from serve import cache as cache_module
from serve.cache import CacheSettings, Recording, tune
from serve.scorer import Scorer


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if nll / count < 700 else math.inf


def record(scorer: Scorer, path: Path, batch_size: int) -> tuple[Recording, float]:
    started = time.perf_counter()
    recording = scorer.record_file(path, batch_size=batch_size)
    return recording, time.perf_counter() - started


class CacheClock:
    """Seconds spent inside the cache's own code (ContinuousCache.__call__) while it is on."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = cache_module.ContinuousCache.__call__

        def timed(cache, *args):
            started = time.perf_counter()
            try:
                return original(cache, *args)
            finally:
                self.seconds += time.perf_counter() - started

        cache_module.ContinuousCache.__call__ = timed


def speed(scorer: Scorer, path: Path, settings: CacheSettings, batch_size: int,
          repeats: int, clock: CacheClock) -> dict:
    """score_file off and on, alternating `repeats` times: tokens/s of each (best and median),
    and the share of the cached runs' time spent in the cache's own code. Each as
    `serve/score.py` runs it: `scorer` without the cache, and a scorer made with the cache and
    this batch size (which decides how onnxruntime's threads wait: see Scorer) with it."""
    cached = Scorer(scorer.bundle.path, batch_size=batch_size, bptt=scorer.bptt, cache=settings)
    runs: dict[str, list] = {"off": [], "on": []}
    cache_seconds = []
    for _ in range(repeats):
        for key, which in (("off", scorer), ("on", cached)):
            before = clock.seconds
            runs[key].append(which.score_file(path, batch_size=batch_size))
            if which is cached:
                cache_seconds.append(clock.seconds - before)
    best = {key: max(r.tokens_per_second for r in results) for key, results in runs.items()}
    median = {key: statistics.median(r.tokens_per_second for r in results)
              for key, results in runs.items()}
    # the cache's own time against the rest of the same runs (network, reading, bookkeeping)
    share = [c / (r.seconds - c) for c, r in zip(cache_seconds, runs["on"])]
    return {"batch_size": batch_size, "repeats": repeats,
            "tokens_per_s_off": best["off"], "tokens_per_s_on": best["on"],
            "slowdown": 1 - best["on"] / best["off"],
            "median_tokens_per_s_off": median["off"], "median_tokens_per_s_on": median["on"],
            "median_slowdown": 1 - median["on"] / median["off"],
            "cache_over_rest": statistics.median(share),
            "cache_us_per_token": 1e6 * statistics.median(
                c / r.num_tokens for c, r in zip(cache_seconds, runs["on"])),
            "all_tokens_per_s": {k: [r.tokens_per_second for r in v] for k, v in runs.items()},
            "perplexity_off": runs["off"][0].perplexity, "perplexity_on": runs["on"][0].perplexity,
            "nll_on": runs["on"][0].nll_sum}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundle folder (with the hidden output)")
    p.add_argument("--valid", type=Path, required=True, help="text to tune θ and λ on")
    p.add_argument("--test", type=Path, required=True, help="text to report on")
    p.add_argument("--windows", type=int, nargs="+", default=[100, 500, 2000])
    p.add_argument("--batch-size", type=int, default=1,
                   help="streams for the perplexities (1: each stream has the longest history)")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--speed-batch-sizes", type=int, nargs="*", default=[1, 20])
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    scorer = Scorer(args.model, batch_size=args.batch_size, bptt=args.bptt)
    report: dict = {"bundle": str(args.model), "valid": str(args.valid), "test": str(args.test),
                    "batch_size": args.batch_size, "bptt": args.bptt,
                    "pipeline": scorer.pipeline.describe(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    valid, valid_s = record(scorer, args.valid, args.batch_size)
    test, test_s = record(scorer, args.test, args.batch_size)
    off_nll = -float(test.model_logprobs().sum())
    off = perplexity(off_nll, test.num_tokens)
    report.update(valid_tokens=valid.num_tokens, test_tokens=test.num_tokens,
                  record_seconds={"valid": valid_s, "test": test_s}, test_perplexity_off=off)
    print(f"recorded {args.valid} ({valid.num_tokens} targets, {valid_s:.0f} s) and {args.test} "
          f"({test.num_tokens} targets, {test_s:.0f} s) at batch {args.batch_size}; "
          f"test perplexity without the cache {off:.2f}", flush=True)

    rows = []
    for window in args.windows:
        started = time.perf_counter()
        tuned = tune(valid, window)
        seconds = time.perf_counter() - started
        test_ppl = perplexity(test.nll(tuned.settings), test.num_tokens)
        rows.append({"window": window, "theta": tuned.settings.theta,
                     "lambda": tuned.settings.lam, "valid_perplexity_off": tuned.perplexity_off,
                     "valid_perplexity": tuned.perplexity, "test_perplexity": test_ppl,
                     "ratio": test_ppl / off, "tune_seconds": seconds, "grid": tuned.grid})
        print(f"window {window}: theta {tuned.settings.theta:g}, lambda {tuned.settings.lam:g} "
              f"(valid {tuned.perplexity_off:.2f} -> {tuned.perplexity:.2f}); test {off:.2f} -> "
              f"{test_ppl:.2f} ({test_ppl / off:.3f}x); tuned in {seconds:.0f} s", flush=True)
    report["windows"] = rows

    largest = rows[-1]
    settings = CacheSettings(largest["window"], largest["theta"], largest["lambda"])
    report["speed"] = []
    clock = CacheClock()
    for batch_size in args.speed_batch_sizes:
        s = speed(scorer, args.test, settings, batch_size, args.speed_repeats, clock)
        report["speed"].append(s)
        if batch_size == args.batch_size:  # the scorer itself agrees with the replay
            s["replay_relative_difference"] = abs(s["nll_on"] / test.nll(settings) - 1)
            s["perplexity_off_relative_difference"] = abs(s["perplexity_off"] / off - 1)
        print(f"speed at batch {batch_size}, window {settings.size}: "
              f"{s['tokens_per_s_off']:.0f} tokens/s off, {s['tokens_per_s_on']:.0f} on "
              f"({100 * s['slowdown']:.1f} % slower; best of {args.speed_repeats}; medians "
              f"{s['median_tokens_per_s_off']:.0f} / {s['median_tokens_per_s_on']:.0f}, "
              f"{100 * s['median_slowdown']:.1f} %); the cache's own code: "
              f"{s['cache_us_per_token']:.1f} us a token, {100 * s['cache_over_rest']:.1f} % of "
              f"the rest of the run; perplexity {s['perplexity_off']:.2f} -> "
              f"{s['perplexity_on']:.2f}", flush=True)

    print()
    print(f"| window | θ | λ | valid ppl (tuned on) | test ppl | × cache-less ({off:.2f}) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['window']} | {r['theta']:g} | {r['lambda']:g} | "
              f"{r['valid_perplexity_off']:.2f} → {r['valid_perplexity']:.2f} | "
              f"{r['test_perplexity']:.2f} | {r['ratio']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
