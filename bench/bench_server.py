"""Benchmark: the scoring service under load on loopback, against the scorer without HTTP.

    python bench/bench_server.py [--run RUN] [--concurrency 1 8 32] [--requests 400]
                                 [--seconds 20] [--texts-per-request 1] [--threads N]

Starts `python -m serve.server` on a free loopback port over standard_lstm_lm_200 (WikiText-2
vocabulary, 33,278 tokens; `--run`, else an untrained one: speed does not depend on the weights),
then, at each concurrency, keeps that many requests in flight (each the next non-empty lines of
WikiText-2 valid) until `--requests` are answered or `--seconds` pass, and prints texts/s,
tokens/s, p50/p99 latency, errors, and the mean texts per onnxruntime batch from the server's
/metrics. Then the same text through `serve/score.py` (Scorer.score_file: carried streams, no
HTTP) and `Scorer.score` (each line on its own, batched, no HTTP), and the server's peak RSS.
The load generator shares the machine with the server: on a small machine it takes a real share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from bench.bench_score import PRESET, pick_run, text_prefix, untrained_run


def start_server(bundle: Path, flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m serve.server` over `bundle` with `flags`, on a free loopback port, once ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.server", "--model", str(bundle), "--port", str(port),
             "--log-level", "warning", *flags],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/readyz", trust_env=False).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server was not ready within 120 s")
        time.sleep(0.1)


async def load(url: str, requests: list[list[str]], concurrency: int, count: int,
               seconds: float) -> dict:
    """Keep `concurrency` requests in flight until `count` are answered or `seconds` pass."""
    import httpx

    latencies: list[float] = []
    errors, texts, tokens, sent = 0, 0, 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120,
                                 trust_env=False) as client:
        async def worker() -> None:
            nonlocal errors, texts, tokens, sent
            while sent < count and time.perf_counter() - started < seconds:
                body = {"texts": requests[sent % len(requests)]}
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/score", json=body)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    errors += 1
                    continue
                results = response.json()["results"]
                texts += len(results)
                tokens += sum(r["tokens"] for r in results)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {"requests": len(latencies), "errors": errors, "texts_per_s": texts / wall,
            "tokens_per_s": tokens / wall, "p50_ms": 1000 * pct(0.50),
            "p99_ms": 1000 * pct(0.99), "seconds": wall}


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's texts-per-batch histogram."""
    import httpx

    text = httpx.get(url + "/metrics", trust_env=False).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                  if line.startswith("keraslm_batch_size_texts_"))
    return float(values["keraslm_batch_size_texts_sum"]), float(
        values["keraslm_batch_size_texts_count"])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run to export (default: an untrained "
                                               f"{PRESET})")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--seconds", type=float, default=20, help="time cap per concurrency level")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--tokens", type=int, default=20_000,
                   help="WikiText-2 valid tokens the requests cycle through")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (all cores)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--queue-size", type=int, default=128)
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    args = p.parse_args(argv)
    data_root = args.data_root.expanduser()

    from export.to_onnx import export_run

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        work = Path(tmp)
        run, origin = (pick_run(args.run, work, data_root) if args.run else
                       (untrained_run(work / "run", data_root), "untrained"))
        bundle = export_run(run, work / "bundle")
        model = run.read_config()["model"]
        text = text_prefix(data_root / "wikitext-2" / "wiki.valid.tokens", args.tokens,
                           work / "valid.tokens")
        lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
        k = args.texts_per_request
        requests = [lines[i:i + k] for i in range(0, len(lines) - k + 1, k)]
        load_before = os.getloadavg()[0]

        threads = ["--threads", str(args.threads)] if args.threads else []
        proc, url = start_server(bundle, [
            "--max-batch", str(args.max_batch), "--queue-size", str(args.queue_size),
            "--max-tokens-per-text", "100000", "--max-body-bytes", str(16 << 20), *threads],
            work / "server.log")
        rows = []
        try:
            asyncio.run(load(url, requests[:4], 1, 8, 30))  # warm-up
            for concurrency in args.concurrency:
                before = batch_stats(url)
                row = asyncio.run(load(url, requests, concurrency, args.requests, args.seconds))
                after = batch_stats(url)
                row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rows.append((concurrency, row))
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()

        report = subprocess.run(
            [sys.executable, str(REPO / "serve" / "score.py"), str(text), "--model", str(bundle),
             "--json", *threads], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        stream = json.loads(report.stdout)

        from serve.scorer import Scorer

        scorer = Scorer(bundle, threads=args.threads, batch_size=args.max_batch)
        scorer.score(lines[:args.max_batch])  # warm-up
        started = time.perf_counter()
        scores = scorer.score(lines)
        alone_tps = sum(s.num_tokens for s in scores) / (time.perf_counter() - started)

    print(f"{PRESET} ({origin}: {model['nlayers']}x{model['nhid']} LSTM, vocab "
          f"{model['vocab_size']:,}), requests of {k} WikiText-2 valid line(s) "
          f"({len(lines):,} lines, {stream['num_stream_tokens']:,} tokens), "
          f"server --max-batch {args.max_batch} --threads {args.threads or 'all'}, "
          f"{os.cpu_count()} CPUs (load average {load_before:.1f} before starting)")
    print(f"{'concurrency':>11}{'requests':>9}{'errors':>7}{'texts/s':>9}{'tokens/s':>10}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'texts/batch':>12}")
    for concurrency, r in rows:
        print(f"{concurrency:>11}{r['requests']:>9}{r['errors']:>7}{r['texts_per_s']:>9.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
              f"{r['mean_batch']:>12.1f}")
    print(f"serve/score.py (Scorer.score_file, {stream['batch_size']} streams x bptt "
          f"{stream['bptt']}, no HTTP): {stream['tokens_per_second']:,.0f} tokens/s")
    print(f"Scorer.score (each line on its own, batches of {args.max_batch}, no HTTP): "
          f"{alone_tps:,.0f} tokens/s")
    print(f"server peak RSS {rss:.0f} MB; exit status after SIGTERM {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
