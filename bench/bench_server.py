"""Benchmark: the scoring service under load on loopback, against the scorer without HTTP.

    python bench/bench_server.py [--run RUN] [--concurrency 1 8 32] [--requests 400]
                                 [--seconds 20] [--texts-per-request 1] [--threads N]

Starts `python -m serve.server` on a free loopback port over standard_lstm_lm_200 (WikiText-2
vocabulary, 33,278 tokens; `--run`, else an untrained one: speed does not depend on the weights),
then, at each concurrency, keeps that many requests in flight (each the next non-empty lines of
WikiText-2 valid) until `--requests` are answered or `--seconds` pass, and prints texts/s,
tokens/s (and their fraction of the CLI's), p50/p99 latency, errors, the mean texts per
onnxruntime call from the server's /metrics, and the load generator's own CPU (in cores). The
same text through `serve/score.py` (Scorer.score_file: carried streams, no HTTP) runs before and
after the server, then `Scorer.score` (each line on its own, batched, no HTTP); and the server's
peak RSS. The load generator shares the machine with the server: on a small machine it takes a
real share (its CPU column says how much).
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
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from bench.bench_score import PRESET, pick_run, text_prefix, untrained_run


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, with the standard library only (no proxies: loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as err:  # a status, not a transport error
        return err.code, err.read().decode("utf-8", "replace")


def start_server(bundle: Path, flags: list[str], log: Path, *, pin: bool = False
                 ) -> tuple[subprocess.Popen, str]:
    """`python -m serve.server` over `bundle` with `flags`, on a free loopback port, once ready.
    `pin`: the server on this process's last CPU, and this process (the load generator) on the
    others from then on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = sorted(os.sched_getaffinity(0))
    if pin:
        os.sched_setaffinity(0, cpus[-1:])  # the server inherits this
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.server", "--model", str(bundle), "--port", str(port),
             "--log-level", "warning", *flags],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": str(REPO)})
    if pin:
        os.sched_setaffinity(0, cpus[:-1] or cpus)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()}")
        try:
            if http_get(url + "/readyz")[0] == 200:
                return proc, url
        except OSError:  # not listening yet (urllib's URLError is an OSError)
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server was not ready within 120 s")
        time.sleep(0.1)


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One POST on a kept-alive connection (`head` has a %d for the body's length): status,
    headers (lower-case names) and body of the answer."""
    writer.write(head % len(body) + body)
    status_line = await reader.readline()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    answer = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, answer


async def post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                    body: bytes) -> tuple[int, bytes]:
    """One POST on a kept-alive connection: (status, response body)."""
    status, _, answer = await post(reader, writer, head, body)
    return status, answer


async def load(url: str, requests: list[list[str]], concurrency: int, count: int,
               seconds: float) -> dict:
    """Keep `concurrency` requests in flight until `count` are answered or `seconds` pass.

    The clients are raw keep-alive HTTP/1.1 connections with their bodies encoded beforehand:
    the load generator shares the machine with the server, so it does as little as it can
    (an httpx client took about a fifth of a core at concurrency 32). Its CPU time is reported."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: %d\r\n\r\n").encode()
    bodies = [json.dumps({"texts": texts}).encode() for texts in requests]
    latencies: list[float] = []
    errors, texts, tokens, sent = 0, 0, 0, 0
    cpu_before = time.process_time()
    started = time.perf_counter()

    async def client() -> None:
        nonlocal errors, texts, tokens, sent
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while sent < count and time.perf_counter() - started < seconds:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    status, answer = await post_json(reader, writer, head, body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
                    continue
                results = json.loads(answer)["results"]
                texts += len(results)
                tokens += sum(r["num_tokens"] for r in results)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {"requests": len(latencies), "errors": errors, "texts_per_s": texts / wall,
            "tokens_per_s": tokens / wall, "p50_ms": 1000 * pct(0.50),
            "p99_ms": 1000 * pct(0.99), "seconds": wall,
            "client_cpu": (time.process_time() - cpu_before) / wall}


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's texts-per-batch histogram."""
    text = http_get(url + "/metrics")[1]
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

        def cli() -> dict:
            report = subprocess.run(
                [sys.executable, str(REPO / "serve" / "score.py"), str(text), "--model",
                 str(bundle), "--json", *threads], capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            return json.loads(report.stdout)

        streams = [cli()]  # before and after the server: the machine's noise, seen
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

        streams.append(cli())
        stream = streams[0]
        cli_tps = [s["tokens_per_second"] for s in streams]
        cli_mean = sum(cli_tps) / len(cli_tps)

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
          f"{'vs CLI':>8}{'p50 ms':>8}{'p99 ms':>8}{'texts/call':>11}{'client CPU':>11}")
    for concurrency, r in rows:
        print(f"{concurrency:>11}{r['requests']:>9}{r['errors']:>7}{r['texts_per_s']:>9.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['tokens_per_s'] / cli_mean:>8.0%}"
              f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['mean_batch']:>11.1f}"
              f"{r['client_cpu']:>10.2f}c")
    print(f"serve/score.py (Scorer.score_file, {stream['batch_size']} streams x bptt "
          f"{stream['bptt']}, no HTTP), before and after the server: "
          f"{' and '.join(f'{x:,.0f}' for x in cli_tps)} tokens/s (vs CLI: their mean)")
    print(f"Scorer.score (each line on its own, batches of {args.max_batch}, no HTTP): "
          f"{alone_tps:,.0f} tokens/s")
    print(f"server peak RSS {rss:.0f} MB; exit status after SIGTERM {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
