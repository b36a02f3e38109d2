"""Benchmark: normal clients beside hostile ones, for minutes, against one server (issue 23).

    python bench/bench_soak.py [--bundle DIR] [--seconds 180] [--unloaded-seconds 30]
                               [--timeout 5] [--max-connections 64] [--score-clients 4]
                               [--generate-clients 2] [--generate-tokens 20] [--threads N] [--pin]

Starts `python -m serve.server --timeout 5 --max-connections 64` on a free loopback port over
`--bundle` (else an untrained standard_lstm_lm_200 over the WikiText-2 vocabulary, exported as
bench/bench_flood.py does: speed does not depend on the weights), then runs three phases:

  unloaded  the normal clients alone for --unloaded-seconds: --score-clients kept-alive clients
            each scoring one WikiText-2 valid line after another, and --generate-clients asking
            /v1/generate for --generate-tokens tokens after a few words of a line (a 503 makes a
            client wait its Retry-After)
  loaded    the same normal clients for --seconds, with hostile clients looping beside them:
            token-dense prompts (400,000 line breaks and the like), an idle 1 MiB Content-Length,
            a slow sender, announced bodies that never come on other paths, a 64 MB header, a
            byte-a-time header (slowloris), big requests whose client leaves at once, malformed
            HTTP, and a connection flood up to --max-connections (hostile_clients below)
  unloaded again  the normal clients alone once more: the server recovered, and the machine's
            own drift (it is shared) is seen; the baseline is both unloaded phases together

and prints: the machine (CPU flags, measured fp32 matmul peak); the normal clients' requests/s,
tokens/s (and that as a fraction of the peak), p50/p99 latency (of every request, whatever its
answer), each phase side by side and the loaded one's ratio to the baseline; the server's RSS
(VmRSS, sampled every second: min/max and the max of every 10 s); every answer each kind of
client got ("503 overloaded", "closed", "timeout", "reset", ...) with counts; the goal of
issue 23, "normal clients keep >= 80 % of their unloaded throughput and p99 within --timeout",
as PASS or FAIL; and how the server exits on SIGTERM.

Every client call has its own time bound (--client-bound), the hostile clients are cancelled when
the loaded phase ends, and the server is killed if its RSS passes --rss-limit-mb, so the bench
always ends (about 2 x --unloaded-seconds + --seconds + a minute). Nothing leaves 127.0.0.1. The
load generator, one asyncio loop in this process, shares the machine with the server (its CPU
is printed; `--pin` gives the server the last CPU and the generator the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from bench.bench_flood import request_bodies
from bench.bench_score import PRESET, untrained_run
from bench.bench_server import peak_rss_mb, start_server
from bench.common import flops_per_token, matmul_peak
from bench.hostile_cases import HOST, head

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
GOAL_SHARE = 0.80  # of the unloaded throughput
FLAT_MB = 64  # RSS growth (loaded max over unloaded max) still called flat ...
FLAT_SHARE = 0.10  # ... or this share of the unloaded max, whichever is larger


# ---- one HTTP exchange over asyncio streams ------------------------------------------------------

class Closed(ConnectionError):
    """The server closed the connection before a whole answer."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def label(self) -> str:
        """The status and the JSON error code, if any: '200', '503 overloaded', '404'."""
        try:
            code = (json.loads(self.body).get("error") or {}).get("code", "")
        except (ValueError, AttributeError):
            code = ""
        return f"{self.status} {code}".strip()

    def json(self) -> dict:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 answer: status line, headers, and a Content-Length (or to-EOF) body."""
    status_line = await reader.readline()
    if not status_line:
        raise Closed("closed before an answer")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read(1 << 20)
    return Answer(int(status_line.split()[1]), headers, body)


def outcome(err: BaseException) -> str:
    """What a client saw when it got no answer: timeout (its own bound), refused, reset, closed."""
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(err, (Closed, asyncio.IncompleteReadError)):
        return "closed"
    return type(err).__name__


def post(path: str, body: bytes) -> bytes:
    """A whole POST of a JSON `body` (hostile_cases.head's request line and headers)."""
    return head(len(body), path=path) + body


def open_head(path: str = "/v1/score") -> bytes:
    """A POST's request line and headers without the blank line that ends them."""
    return head(None, path=path)[:-2]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, limit=1 << 20)


def close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()  # no lingering: the socket is gone at once


async def trickle(port: int, start: bytes, pieces, interval: float, bound: float) -> str:
    """Send `start`, then each of `pieces` `interval` seconds apart, while reading: the answer
    (or the close) as soon as it comes, else after the last piece; 'timeout' after `bound`."""
    writer = answer = None
    try:
        reader, writer = await connect(port)
        answer = asyncio.ensure_future(read_answer(reader))
        deadline = time.monotonic() + bound
        try:
            writer.write(start)
            await asyncio.wait_for(writer.drain(), bound)
            for piece in pieces:
                if answer.done() or time.monotonic() > deadline:
                    break
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
                if interval:
                    await asyncio.sleep(interval)
        except OSError:  # TimeoutError included: the server stopped reading, or closed
            pass  # its answer, if any, says why
        left = max(0.5, deadline - time.monotonic())
        return (await asyncio.wait_for(answer, left)).label()
    except (OSError, asyncio.IncompleteReadError) as err:
        return outcome(err)
    finally:
        close(writer)
        if answer is not None and not answer.done():
            answer.cancel()


async def exchange(port: int, data: bytes, bound: float) -> str:
    """Send `data` on a new connection and label the answer (or what happened instead)."""
    return await trickle(port, data, [], 0, bound)


# ---- the normal clients --------------------------------------------------------------------------

@dataclass
class Normal:
    """What one kind of normal client did in one phase."""

    kind: str  # "score" or "generate"
    clients: int
    seen: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of every request, whatever its answer
    ok: int = 0
    tokens: int = 0  # scored (score) or generated (generate), of the 200 answers
    seconds: float = 0.0
    waited: float = 0.0  # client-seconds spent waiting Retry-After

    @classmethod
    def combined(cls, tallies: list[Normal]) -> Normal:
        """Several phases' tallies of one kind as if they were one phase."""
        both = cls(tallies[0].kind, tallies[0].clients)
        for t in tallies:
            both.seen.update(t.seen)
            both.latencies += t.latencies
            both.ok += t.ok
            both.tokens += t.tokens
            both.seconds += t.seconds
            both.waited += t.waited
        return both

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def answered_tokens(kind: str, answer: Answer) -> int:
    """Tokens a 200 answer carries: scored tokens (<eos> included) or generated tokens."""
    data = answer.json()
    if kind == "score":
        return sum(r["num_tokens"] for r in data["results"])
    return len(data["tokens"])


async def normal_client(port: int, path: str, bodies: list[bytes], first: int, stop_at: float,
                        tally: Normal, bound: float) -> None:
    """Send `bodies` (from `first` on) one after another on a kept-alive connection until
    `stop_at`; each request is bounded by `bound` seconds. A 503 waits its Retry-After; a
    connection the server closed is opened again (and a request it dropped before answering on
    a reused connection is sent once more, as HTTP clients do)."""
    reader = writer = None
    i = first
    while time.monotonic() < stop_at:
        data = post(path, bodies[i % len(bodies)])
        i += 1
        started = time.monotonic()
        try:
            answer = None
            for attempt in range(2):
                reused = writer is not None
                if writer is None:
                    reader, writer = await asyncio.wait_for(connect(port), bound)
                writer.write(data)
                try:
                    left = max(0.01, bound - (time.monotonic() - started))
                    answer = await asyncio.wait_for(read_answer(reader), left)
                    break
                except (Closed, ConnectionResetError):
                    close(writer)
                    reader = writer = None
                    if not reused or attempt:
                        raise
        except (OSError, asyncio.IncompleteReadError) as err:
            close(writer)
            reader = writer = None
            tally.seen[outcome(err)] += 1
            tally.latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)  # a dead or refusing server is not hammered
            continue
        tally.latencies.append(time.monotonic() - started)
        tally.seen[answer.label()] += 1
        if answer.status == 200:
            try:
                tally.tokens += answered_tokens(tally.kind, answer)
                tally.ok += 1
            except (ValueError, KeyError, TypeError):
                tally.seen["200 unreadable"] += 1
        if answer.headers.get("connection", "").lower() == "close":
            close(writer)
            reader = writer = None
        if answer.status == 503:
            wait = max(0.0, min(float(answer.headers.get("retry-after") or 1),
                                stop_at - time.monotonic()))
            tally.waited += wait
            await asyncio.sleep(wait)
    close(writer)


def normal_bodies(valid: Path, generate_tokens: int) -> tuple[list[bytes], list[bytes]]:
    """One-line score requests (bench_flood's small ones) and generate requests continuing the
    first eight words of those lines."""
    _, score = request_bodies(valid, 1, 500)
    prompts = [" ".join(json.loads(b)["texts"][0].split()[:8]) for b in score[:500]]
    generate = [json.dumps({"prompt": p, "tokens": generate_tokens, "seed": k}).encode()
                for k, p in enumerate(prompts)]
    return score, generate


# ---- the hostile clients -------------------------------------------------------------------------

def token_dense_requests(max_body: int) -> list[tuple[str, bytes]]:
    """(label, request) of prompts and texts that are almost all line breaks: each break is one
    <eos> token, and no spaces for a word count to see. Each body fits in `max_body`."""
    def fit(char: str, count: int, raw: bool) -> str:
        per = len(json.dumps(char, ensure_ascii=False).encode()) - 2 if raw else 2
        return char * min(count, (max_body - 64) // per)

    cases = [("generate \\n", "/v1/generate", {"prompt": fit("\n", 400_000, False), "tokens": 20}),
             ("generate \\r", "/v1/generate", {"prompt": fit("\r", 400_000, False), "tokens": 20}),
             ("generate U+2028", "/v1/generate", {"prompt": fit("\u2028", 400_000, True),
                                                  "tokens": 20}),
             ("generate U+0085", "/v1/generate", {"prompt": fit("\x85", 400_000, True),
                                                  "tokens": 20}),
             ("score \\n", "/v1/score", {"texts": [fit("\n", 400_000, False)]})]
    return [(label, post(path, json.dumps(body, ensure_ascii=False).encode()))
            for label, path, body in cases]


def garbage_requests() -> list[tuple[str, bytes]]:
    """(label, bytes) of malformed HTTP, with a Host the server allows where there is one."""
    score, host = open_head(), f"Host: {HOST}\r\n\r\n".encode()
    return [
        ("random", bytes(random.Random(0).randrange(256) for _ in range(2048))),
        ("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 2),
        ("two lengths", score + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\nhello"),
        ("bad chunk", score + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
        ("length -1", score + b"Content-Length: -1\r\n\r\n"),
        ("1000 CRLFs", b"\r\n" * 1000),
        ("100 kB path", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host),
        ("HTTP/9.9", b"GET / HTTP/9.9\r\n" + host),
    ]


@dataclass
class Hostile:
    """One hostile client: `attempt(port, i, bound)` is one try, labelled; `pause` seconds
    between tries."""

    kind: str
    attempt: Callable[[int, int, float], Awaitable[str | Counter]]
    pause: float = 0.1
    seen: Counter = field(default_factory=Counter)
    slowest: float = 0.0  # seconds of the longest try


def hostile_clients(args: argparse.Namespace, big_score: list[bytes]) -> list[Hostile]:
    """The hostile clients of issue 23 (numbered as its list) and a few of the same kinds."""
    dense = token_dense_requests(args.max_body_bytes)
    garbage_data = garbage_requests()
    never = ["/x", "/v1/score/", "/", "/v1/generate"]
    mib = b"a" * (1 << 20)

    async def token_dense(port: int, i: int, bound: float) -> str:
        name, data = dense[i % len(dense)]
        return f"{name}: {await exchange(port, data, bound)}"

    async def idle_content_length(port: int, i: int, bound: float) -> str:
        return await trickle(port, head(1 << 20), [], 0, bound)

    async def slow_sender(port: int, i: int, bound: float) -> str:  # 1 MB at 40 kB/s
        chunks = [b'{"texts": ["' + b"x " * 1995 + b'"'] + [b"," + b" " * 3999] * 249
        start = head(sum(map(len, chunks)))
        return await trickle(port, start, chunks, 0.1, bound)

    async def never_sent(port: int, i: int, bound: float) -> str:
        path = never[i % len(never)]
        return f"{path}: {await trickle(port, head(50_000, path=path), [], 0, bound)}"

    async def huge_header(port: int, i: int, bound: float) -> str:
        return await trickle(port, open_head() + b"X-Big: ",
                             [mib] * 64 + [b"\r\n\r\n"], 0, bound)

    async def slowloris(port: int, i: int, bound: float) -> str:
        data = open_head() + b"X-Slow: " + b"a" * 100_000
        return await trickle(port, b"", (data[k:k + 1] for k in range(len(data))), 0.2, bound)

    async def leave_at_once(port: int, i: int, bound: float) -> str:
        name, data = ("score", post("/v1/score", big_score[i % len(big_score)])) \
            if i % 2 == 0 else ("generate", post("/v1/generate", json.dumps(
                {"prompt": "the", "tokens": args.leave_tokens, "seed": i}).encode()))
        writer = None
        try:
            _, writer = await connect(port)
            writer.write(data)
            await writer.drain()
            return f"{name}: sent, left"
        except OSError as err:
            return f"{name}: {outcome(err)}"
        finally:
            close(writer)

    async def garbage(port: int, i: int, bound: float) -> str:
        name, data = garbage_data[i % len(garbage_data)]
        return f"{name}: {await exchange(port, data, bound)}"

    async def flood(port: int, i: int, bound: float) -> Counter:
        """Open connections up to max-connections and then some, hold them, close them all."""
        seen: Counter = Counter()
        opened = []
        try:
            for _ in range(args.max_connections + 8):
                try:
                    opened.append(await asyncio.wait_for(connect(port), 5))
                except (OSError, TimeoutError) as err:
                    seen[outcome(err)] += 1
            await asyncio.sleep(0.5)
            for reader, _ in opened:  # refused ones were answered and closed at once
                try:
                    seen[(await asyncio.wait_for(read_answer(reader), 0.05)).label()] += 1
                except TimeoutError:
                    seen["held open"] += 1
                except (OSError, asyncio.IncompleteReadError) as err:
                    seen[outcome(err)] += 1
            await asyncio.sleep(args.flood_hold)
        finally:
            for _, writer in opened:
                close(writer)
        await asyncio.sleep(max(0.0, args.flood_every - args.flood_hold))
        return seen

    return [Hostile("1 token-dense generate/score (400,000 line breaks, ...)", token_dense),
            Hostile("2 idle: Content-Length 1 MiB, nothing sent", idle_content_length, pause=0),
            Hostile("2 slow sender: 1 MB body at 40 kB/s", slow_sender),
            Hostile("3 body never sent: POST /x, /v1/score/, /, /v1/generate", never_sent),
            Hostile("4 a 64 MB header, sent at once", huge_header),
            Hostile("4 slowloris: header at a byte / 0.2 s", slowloris),
            Hostile(f"5 big score / {args.leave_tokens}-token generate, client leaves",
                    leave_at_once, pause=args.leave_pause),
            Hostile("6 malformed HTTP (garbage, TLS hello, bad lengths, ...)", garbage),
            Hostile(f"6 connection flood to {args.max_connections} (held {args.flood_hold:g} s "
                    f"every {args.flood_every:g} s)", flood, pause=0)]


async def hostile_loop(client: Hostile, port: int, stop_at: float, bound: float) -> None:
    """Tries of `client` one after another until `stop_at`, each bounded by `bound` seconds."""
    i = 0
    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            got = await asyncio.wait_for(client.attempt(port, i, bound), bound + 5)
        except TimeoutError:
            got = "timeout"
        except asyncio.CancelledError:  # the phase is over
            client.seen["in flight at the end"] += 1
            client.slowest = max(client.slowest, time.monotonic() - started)
            raise
        client.slowest = max(client.slowest, time.monotonic() - started)
        client.seen.update(got if isinstance(got, Counter) else [got])
        i += 1
        await asyncio.sleep(client.pause)


# ---- the server's RSS ----------------------------------------------------------------------------

def rss_mb(pid: int) -> float | None:
    """The resident set of a running process in MB (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Watch:
    """The server's RSS every second, by phase; whether the bench had to kill it."""

    proc: subprocess.Popen
    limit_mb: float
    series: dict[str, list[float]] = field(default_factory=dict)
    killed: str = ""

    async def run(self, phase: str, stop_at: float) -> None:
        samples = self.series.setdefault(phase, [])
        while time.monotonic() < stop_at and not self.killed:
            mb = rss_mb(self.proc.pid)
            if mb is None or self.proc.poll() is not None:
                self.killed = f"the server exited ({self.proc.poll()}) during the {phase} phase"
                return
            samples.append(mb)
            if mb > self.limit_mb:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.killed = (f"the bench killed the server at {mb:,.0f} MB RSS "
                               f"(over --rss-limit-mb), {len(samples)} s into the {phase} phase")
                return
            await asyncio.sleep(1.0)


# ---- the phases ----------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    normal: list[Normal]  # score, generate
    cpu: float  # the load generator's CPU (cores) meanwhile


async def phase(name: str, seconds: float, port: int, args: argparse.Namespace,
                bodies: dict[str, list[bytes]], watch: Watch, hostile: list[Hostile]) -> Phase:
    """The normal clients for `seconds` (and `hostile` ones beside them)."""
    print(f"{name} phase, {seconds:g} s ...", file=sys.stderr, flush=True)
    cpu = time.process_time()
    started = time.monotonic()
    stop_at = started + seconds
    tallies = [Normal("score", args.score_clients), Normal("generate", args.generate_clients)]
    paths = {"score": "/v1/score", "generate": "/v1/generate"}
    normal = [normal_client(port, paths[t.kind], bodies[t.kind], k * 97, stop_at, t,
                            args.client_bound)
              for t in tallies for k in range(t.clients)]
    others = [asyncio.ensure_future(hostile_loop(h, port, stop_at, args.client_bound))
              for h in hostile]
    watcher = asyncio.ensure_future(watch.run(name, stop_at))
    try:
        await asyncio.gather(*normal)
    finally:
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    wall = time.monotonic() - started
    for t in tallies:
        t.seconds = wall
    return Phase(name, tallies, (time.process_time() - cpu) / wall)


def stop_server(proc: subprocess.Popen, bound: float = 60) -> str:
    """SIGTERM, then SIGKILL after `bound` seconds: how it exited and how long it took."""
    if proc.poll() is not None:
        return f"had already exited ({proc.returncode})"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return f"still running {bound:g} s after SIGTERM: killed ({proc.wait()})"
    return f"exit {code} {time.monotonic() - started:.1f} s after SIGTERM"


# ---- the report ----------------------------------------------------------------------------------

def cpu_flags() -> str:
    """Which of CPU_FLAGS /proc/cpuinfo lists, and the CPU's name."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown CPU"
    name, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags.update(value.split())
    have = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return f"{name}, {os.cpu_count()} CPUs, flags: {have}"


def seen_text(seen: Counter) -> str:
    """'label x count, ...' in the labels' order (so a variant's answers stand together)."""
    return ", ".join(f"{label} x {n:,}" for label, n in sorted(seen.items())) or "nothing"


def baselines(phases: list[Phase]) -> list[Normal]:
    """Each kind's unloaded phases together."""
    unloaded = [p for p in phases if p.name != "loaded"]
    kinds = range(len(unloaded[0].normal))
    return [Normal.combined([p.normal[k] for p in unloaded]) for k in kinds]


def print_throughput(phases: list[Phase], flops: float, peak: float) -> None:
    """Each kind of normal client in each phase, and the loaded phase over the baseline."""
    print(f"{'normal clients':<16}{'phase':<16}{'requests':>9}{'200':>7}{'req/s':>8}"
          f"{'tokens/s':>10}{'of peak':>9}{'p50 s':>8}{'p99 s':>8}")
    loaded = next(p for p in phases if p.name == "loaded")
    for k, base in enumerate(baselines(phases)):
        name = f"{base.kind} x {base.clients}"
        for p in phases:
            t = p.normal[k]
            print(f"{name:<16}{p.name:<16}{len(t.latencies):>9,}{t.ok:>7,}"
                  f"{t.requests_per_s:>8.1f}{t.tokens_per_s:>10,.0f}"
                  f"{t.tokens_per_s * flops / 1e9 / peak:>9.2%}{t.percentile(.5):>8.2f}"
                  f"{t.percentile(.99):>8.2f}")
            name = ""
        t = loaded.normal[k]
        print(f"{'':<16}{'loaded/unloaded':<16}{'':>9}{'':>7}"
              f"{ratio(t.requests_per_s, base.requests_per_s):>8}"
              f"{ratio(t.tokens_per_s, base.tokens_per_s):>10}{'':>9}"
              f"{ratio(t.percentile(.5), base.percentile(.5)):>8}"
              f"{ratio(t.percentile(.99), base.percentile(.99)):>8}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def rss_verdict(watch: Watch) -> tuple[bool, list[str]]:
    """Lines on the RSS series, and whether the loaded phase stayed flat."""
    lines = []
    for name, xs in watch.series.items():
        if not xs:
            continue
        tens = [max(xs[k:k + 10]) for k in range(0, len(xs), 10)]
        lines.append(f"  {name:<15} min {min(xs):,.0f} MB, max {max(xs):,.0f} MB; max of every "
                     f"10 s: {' '.join(f'{x:.0f}' for x in tens)}")
    base = max(watch.series.get("unloaded") or [float("nan")])
    top = max(watch.series.get("loaded") or [float("inf")])
    allowed = max(FLAT_MB, FLAT_SHARE * base)
    flat = top - base <= allowed and not watch.killed
    lines.append(f"  flat: {'yes' if flat else 'NO'} (loaded max {top - base:+,.0f} MB over the "
                 f"first unloaded phase's max; flat means at most +{allowed:,.0f} MB)")
    return flat, lines


def goal(unloaded: list[Normal], loaded: list[Normal], timeout: float) -> tuple[bool, list[str]]:
    """Issue 23's goal for each kind of normal client: >= 80 % of the unloaded tokens/s (both
    unloaded phases) and a loaded p99 within --timeout."""
    lines, passed = [], True
    for u, l in zip(unloaded, loaded):
        share = l.tokens_per_s / u.tokens_per_s if u.tokens_per_s else 0.0
        p99 = l.percentile(.99)
        ok_share, ok_p99 = share >= GOAL_SHARE, p99 <= timeout
        passed &= ok_share and ok_p99
        lines.append(f"  {l.kind:<9} throughput {share:6.1%} of the unloaded phases' "
                     f"{'PASS' if ok_share else 'FAIL'}; p99 {p99:.2f} s "
                     f"{'<=' if ok_p99 else '>'} {timeout:g} s {'PASS' if ok_p99 else 'FAIL'}")
    return passed, lines


# ---- main ----------------------------------------------------------------------------------------

def build_bundle(work: Path, data_root: Path) -> Path:
    """An untrained PRESET over the WikiText-2 vocabulary, exported (as bench_flood.py does)."""
    from export.to_onnx import export_run

    return export_run(untrained_run(work / "run", data_root), work / "bundle")


async def soak(port: int, args: argparse.Namespace, bodies: dict[str, list[bytes]],
               watch: Watch, hostile: list[Hostile]) -> list[Phase]:
    """A warm-up request of each kind, then the three phases."""
    for path, kind in (("/v1/score", "score"), ("/v1/generate", "generate")):
        await exchange(port, post(path, bodies[kind][0]), args.client_bound)
    return [await phase("unloaded", args.unloaded_seconds, port, args, bodies, watch, []),
            await phase("loaded", args.seconds, port, args, bodies, watch, hostile),
            await phase("unloaded again", args.unloaded_seconds, port, args, bodies, watch, [])]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None,
                   help=f"bundle to serve (default: an untrained {PRESET}, exported)")
    p.add_argument("--seconds", type=float, default=180, help="the loaded phase (default 180)")
    p.add_argument("--unloaded-seconds", type=float, default=30,
                   help="each of the two unloaded phases (default 30)")
    p.add_argument("--timeout", type=float, default=5, help="the server's --timeout (default 5)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="the server's --max-connections (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="the server's --max-body-bytes (its default, 1 MiB)")
    p.add_argument("--threads", type=int, default=None, help="the server's onnxruntime threads")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the server (repeat it)")
    p.add_argument("--score-clients", type=int, default=4)
    p.add_argument("--generate-clients", type=int, default=2)
    p.add_argument("--generate-tokens", type=int, default=20)
    p.add_argument("--leave-tokens", type=int, default=2000,
                   help="tokens asked for by the generate requests whose client leaves")
    p.add_argument("--leave-pause", type=float, default=0.5,
                   help="seconds between two requests whose client leaves (default 0.5)")
    p.add_argument("--flood-hold", type=float, default=5,
                   help="seconds the connection flood holds its connections (default 5) ...")
    p.add_argument("--flood-every", type=float, default=20,
                   help="... once every this many seconds (default 20)")
    p.add_argument("--hostile", nargs="+", default=None, metavar="TEXT",
                   help="run only the hostile clients whose name starts with one of these "
                        "(their numbers in issue 23, or more: '1' '2 idle' '6 conn'; default all)")
    p.add_argument("--client-bound", type=float, default=30,
                   help="seconds any one client call may take before it is counted 'timeout'")
    p.add_argument("--rss-limit-mb", type=float, default=12_000,
                   help="the bench kills the server past this RSS (the machine is shared)")
    p.add_argument("--pin", action="store_true",
                   help="server on the last CPU, this load generator on the others")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the bundle and server.log (default: a temporary one)")
    p.add_argument("--data-root", type=Path,
                   default=Path(os.environ.get("KERASLM_DATA", "~/.keraslm/datasets")))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_root = args.data_root.expanduser()
    valid = data_root / "wikitext-2" / "wiki.valid.tokens"
    peak, peak_how = matmul_peak()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle.resolve() if args.bundle else build_bundle(work, data_root)
        model = json.loads((bundle / "bundle.json").read_text())["model"]
        score, generate = normal_bodies(valid, args.generate_tokens)
        big, _ = request_bodies(valid, 16, 500)
        hostile = [h for h in hostile_clients(args, big)
                   if not args.hostile or any(h.kind.startswith(t) for t in args.hostile)]
        threads = ["--threads", str(args.threads)] if args.threads else []
        cpus = sorted(os.sched_getaffinity(0))
        proc, url = start_server(bundle, [
            "--timeout", str(args.timeout), "--max-connections", str(args.max_connections),
            "--max-body-bytes", str(args.max_body_bytes), *threads, *args.server_arg],
                                 work / "server.log", pin=args.pin)
        port = int(url.rsplit(":", 1)[1])
        watch = Watch(proc, args.rss_limit_mb)
        try:
            phases = asyncio.run(
                soak(port, args, {"score": score, "generate": generate}, watch, hostile))
            hwm = peak_rss_mb(proc.pid) if proc.poll() is None else float("nan")
        finally:
            stopped = stop_server(proc)
        log = (work / "server.log").read_text(errors="replace")

    flops = flops_per_token(model)
    print(f"bench_soak: {bundle.name} ({model['nlayers']}x{model['nhid']} LSTM, vocab "
          f"{model['vocab_size']:,}, {flops / 1e6:.1f} MFLOP/token); server --timeout "
          f"{args.timeout:g} --max-connections {args.max_connections} --max-body-bytes "
          f"{args.max_body_bytes} {' '.join([*threads, *args.server_arg])}".rstrip())
    print(f"machine: {cpu_flags()}; fp32 matmul peak {peak:.1f} GFLOP/s ({peak_how}); load "
          f"generator CPU {' / '.join(f'{p.cpu:.2f}' for p in phases)} cores (by phase)"
          f"{'; --pin: server on CPU ' + str(cpus[-1]) if args.pin else ''}")
    print(f"phases: unloaded {args.unloaded_seconds:g} s, loaded {args.seconds:g} s, unloaded "
          f"again {args.unloaded_seconds:g} s; tokens: scored (score) or generated (generate) in "
          f"200 answers; latency: every request, whatever its answer\n")
    print_throughput(phases, flops, peak)
    unloaded, loaded = baselines(phases), phases[1].normal
    flat, rss_lines = rss_verdict(watch)
    print(f"\nserver RSS (VmRSS, every second; peak VmHWM {hwm:,.0f} MB)")
    print("\n".join(rss_lines))
    if watch.killed:
        print(f"  {watch.killed}")
    print("\nwhat each client saw (loaded phase; the normal clients' unloaded phases in "
          "brackets)")
    for u, l in zip(unloaded, loaded):
        print(f"  normal {l.kind}: {seen_text(l.seen)}; waited Retry-After {l.waited:.0f} "
              f"client-s  [{seen_text(u.seen)}; waited {u.waited:.0f}]")
    for h in hostile:
        print(f"  {h.kind} (slowest {h.slowest:.1f} s)")
        print(textwrap.fill(seen_text(h.seen), 100, initial_indent=" " * 6,
                            subsequent_indent=" " * 6))
    passed, goal_lines = goal(unloaded, loaded, args.timeout)
    print(f"\ngoal: normal clients keep >= {GOAL_SHARE:.0%} of their unloaded throughput "
          f"(tokens/s) and p99 within --timeout {args.timeout:g} s")
    print("\n".join(goal_lines))
    print(f"  GOAL {'PASS' if passed else 'FAIL'}; RSS flat: {'yes' if flat else 'NO'}")
    tracebacks = log.count("Traceback")
    print(f"\nserver {stopped}; server log {len(log.splitlines())} lines, {tracebacks} "
          f"tracebacks")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
