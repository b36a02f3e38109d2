"""Benchmark: the scoring service under floods, beside its unloaded best, in one run.

    python bench/bench_flood.py [--run RUN] [--seconds 40] [--timeout 30] [--threads N]
                                [--max-texts 16] [--max-tokens-per-text 500]

Starts `python -m serve.server` with its default queue and body limits, `--timeout 30`, and
request limits sized for this class of machine (16 texts of 500 tokens: a maximum-size request
is 8,000 tokens, a few seconds of one core; the defaults, 64 x 2,000 tokens, take longer than
the timeout on 2 cores whatever the load), over standard_lstm_lm_200 (WikiText-2 vocabulary;
`--run`, else an untrained one: speed does not depend on the weights), then:

  unloaded   one client, one maximum-size request after another (the service's best)
  flood A    200 clients, each sending maximum-size requests (--max-texts texts of WikiText-2
             tokens, just under --max-tokens-per-text) for --seconds, waiting Retry-After
             after a 503
  flood B    1,000 clients sending small requests (one WikiText-2 line) the same way

and prints, for each: answered / 503 / 504 / other, p50 and p99 latency of the answered ones
(p99 must stay under --timeout), tokens/s answered and as a fraction of the machine's measured
matmul peak, and the server's peak RSS. The load generator shares the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from bench.bench_score import PRESET, pick_run, untrained_run
from bench.bench_server import peak_rss_mb, post, start_server
from bench.common import flops_per_token, matmul_peak


@dataclass
class Tally:
    """What one load phase got back."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of the answered (200) requests
    server: list[float] = field(default_factory=list)  # their time in the server (Server-Timing)
    tokens: int = 0
    seconds: float = 0.0

    def percentile(self, q: float, server: bool = False) -> float:
        xs = sorted(self.server if server else self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def load(url: str, bodies: list[bytes], clients: int, seconds: float,
               requests: int | None = None) -> Tally:
    """`clients` clients, each on a kept-alive raw HTTP/1.1 connection (reopened when the server
    closes it), send `bodies` in turn until `seconds` pass (or `requests` are sent); a 503 makes
    its client wait Retry-After before trying again."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: %d\r\n\r\n").encode()
    tally, sent = Tally(), 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def one_client() -> None:
        nonlocal sent
        connection = None
        while time.perf_counter() < stop_at and (requests is None or sent < requests):
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                if connection is None:
                    connection = await asyncio.open_connection(host, int(port))
                status, headers, answer = await asyncio.wait_for(
                    post(*connection, head, body), seconds + 60)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
                tally.statuses[type(err).__name__] += 1
                connection = _closed(connection)
                continue
            tally.statuses[status] += 1
            if status == 200:
                tally.latencies.append(time.perf_counter() - t0)
                timing = headers.get("server-timing", "dur=nan")
                tally.server.append(float(timing.rsplit("dur=", 1)[1]) / 1000)
                tally.tokens += sum(r["num_tokens"] for r in json.loads(answer)["results"])
            if headers.get("connection", "").lower() == "close":
                connection = _closed(connection)
            if status == 503:
                await asyncio.sleep(float(headers.get("retry-after", 1)))
        _closed(connection)

    await asyncio.gather(*(one_client() for _ in range(clients)))
    tally.seconds = time.perf_counter() - started
    return tally


def _closed(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    """Close a client's connection (if open); None, for the client's next one."""
    if connection is not None:
        connection[1].close()


def request_bodies(valid: Path, max_texts: int, max_tokens: int
                   ) -> tuple[list[bytes], list[bytes]]:
    """Maximum-size requests (`max_texts` texts just under the token limit) and one-line
    requests."""
    words = valid.read_text(encoding="utf-8").split()
    per_text = max(max_tokens - 10, 1)  # <eos> and room to spare
    texts = [" ".join(words[i:i + per_text]) for i in range(0, len(words) - per_text, per_text)]
    big = [json.dumps({"texts": [texts[(k + j) % len(texts)] for j in range(max_texts)]}).encode()
           for k in range(8)]
    lines = [line.strip() for line in valid.read_text(encoding="utf-8").splitlines()
             if len(line.split()) >= 5]
    small = [json.dumps({"texts": [line]}).encode() for line in lines[:2000]]
    return big, small


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help=f"run to export (default: an untrained {PRESET})")
    p.add_argument("--seconds", type=float, default=40, help="length of each flood")
    p.add_argument("--timeout", type=float, default=30, help="the server's --timeout")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (all cores)")
    p.add_argument("--max-texts", type=int, default=16, help="the server's --max-texts")
    p.add_argument("--max-tokens-per-text", type=int, default=500,
                   help="the server's --max-tokens-per-text")
    p.add_argument("--big-clients", type=int, default=200)
    p.add_argument("--small-clients", type=int, default=1000)
    p.add_argument("--pin", action="store_true",
                   help="server on the last CPU, this load generator on the others")
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    args = p.parse_args(argv)
    data_root = args.data_root.expanduser()

    from export.to_onnx import export_run

    peak, peak_how = matmul_peak()
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        work = Path(tmp)
        run, origin = (pick_run(args.run, work, data_root) if args.run else
                       (untrained_run(work / "run", data_root), "untrained"))
        bundle = export_run(run, work / "bundle")
        model = run.read_config()["model"]
        big, small = request_bodies(data_root / "wikitext-2" / "wiki.valid.tokens",
                                    args.max_texts, args.max_tokens_per_text)
        threads = ["--threads", str(args.threads)] if args.threads else []
        proc, url = start_server(bundle, [
            "--timeout", str(args.timeout), "--max-texts", str(args.max_texts),
            "--max-tokens-per-text", str(args.max_tokens_per_text), *threads],
                                 work / "server.log", pin=args.pin)
        try:
            asyncio.run(load(url, big[:1], 1, 60, requests=1))  # warm-up
            phases = [
                ("unloaded, 1 client, max-size", asyncio.run(load(url, big, 1, args.seconds / 2))),
                (f"flood A, {args.big_clients} clients, max-size",
                 asyncio.run(load(url, big, args.big_clients, args.seconds))),
                ("unloaded, 1 client, small", asyncio.run(load(url, small, 1, args.seconds / 4))),
                (f"flood B, {args.small_clients} clients, small",
                 asyncio.run(load(url, small, args.small_clients, args.seconds))),
            ]
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=args.timeout + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()

    flops = flops_per_token(model)
    print(f"{PRESET} ({origin}: {model['nlayers']}x{model['nhid']} LSTM, vocab "
          f"{model['vocab_size']:,}), --timeout {args.timeout:g}, max-size = {args.max_texts} x "
          f"{args.max_tokens_per_text} tokens, threads "
          f"{args.threads or 'all'}, {os.cpu_count()} CPUs; matmul peak {peak:.1f} GFLOP/s "
          f"({peak_how})")
    print("latency of the answered requests, seen by the client and (server) from arrival to "
          "answer")
    print(f"{'phase':<34}{'200':>6}{'503':>7}{'504':>6}{'other':>6}{'p50 s':>8}{'p99 s':>8}"
          f"{'(server)':>18}{'tokens/s':>10}{'of peak':>9}")
    for name, t in phases:
        others = {k: n for k, n in t.statuses.items() if k not in (200, 503, 504)}
        other = sum(others.values())
        tps = t.tokens / t.seconds
        print(f"{name:<34}{t.statuses[200]:>6}{t.statuses[503]:>7}{t.statuses[504]:>6}"
              f"{other:>6}{t.percentile(.5):>8.2f}{t.percentile(.99):>8.2f}"
              f"{t.percentile(.5, True):>9.2f}{t.percentile(.99, True):>9.2f}{tps:>10,.0f}"
              f"{tps * flops / 1e9 / peak:>9.2%}")
        if others:
            print(f"    other answers: {others}")
    print(f"server peak RSS {rss:.0f} MB; exit status after SIGTERM {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
