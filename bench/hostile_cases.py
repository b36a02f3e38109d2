"""Benchmark: every hostile case of issue 13, run against the real code, as one Markdown table.

    python bench/hostile_cases.py [--bundle DIR] [--work DIR] [--bound SECONDS] [--only TEXT ...]

Not part of the test suite (tests/ asserts these behaviours); this prints what a user would see.
It builds the tests' tiny bundle (tests/helpers_runs.py `make_bundle`: random weights,
WikiText-2 vocabulary of 200, exported by export.to_onnx) unless `--bundle` gives one, and a
raw-text copy of it (punkt sentences + Moses, keraslm.text.RAW). Then each case runs for real:
`serve/score.py --threads 1` as a child process (exit status, first line of its message, wall
seconds and the child's peak RSS, its VmHWM), and `python -m serve.server` on free loopback ports
(bench/bench_server.py `start_server`), spoken to over raw sockets (status, error code and
message; the server's peak RSS where the request is big). Nothing leaves 127.0.0.1.

Every case has a time bound (`--bound`, 60 s; a few heavy ones more): a case still running then
is reported as TIMEOUT, its child processes are killed, and the next case runs. The whole table
takes about 3-4 minutes on 2 busy cores, most of it the 1 MB raw-text case (NLTK punkt does a
few thousand short sentences a second), the two 10 MB cases and SIGTERM with the default
--timeout 30. `--only TEXT...` runs the cases whose title contains one of the texts.

Cases (issue 13): 1 overload (one row; bench/bench_flood.py covers floods), 2 bad requests,
3 1 MB of short sentences through punkt, 4 huge lines, /dev/zero, binary, 5 FIFO and standard
input, 6 hostile bundles, 7 slow senders, connection cap, SIGTERM, 8 --per-line through a
symbolic link. Issue 23 (against `--timeout 5 --max-connections 8 --header-timeout 10`, the
issue's server; `--only 23` runs them alone): 23 its named clients (token-dense prompts, idle
uploads, bodies that never come on other paths, a 64 MB header), 23+ others of their kinds
(slow bodies and chunks on every path, deep JSON, pipelining); their RSS column is the server's
growth over the case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from bench.bench_server import peak_rss_mb, start_server

SCORE = [sys.executable, str(REPO / "serve" / "score.py")]
DATA_ROOT = Path(os.environ.get("KERASLM_DATA", "/work/shared/data"))
VALID = DATA_ROOT / "wikitext-2" / "wiki.valid.tokens"
MESSAGE_CHARS = 120
DEEP = 100_000  # nesting depth of the deep-JSON cases
HOST = "127.0.0.1"  # the Host header of raw requests (a loopback server allows only loopback)


# ---- the table ------------------------------------------------------------------------------------

@dataclass
class Row:
    happened: str
    message: str = ""
    seconds: float | None = None
    rss_mb: float | None = None
    case: str = ""  # the runner fills it in

    def markdown(self) -> str:
        seconds = "" if self.seconds is None else (
            f"{self.seconds:.2f}" if self.seconds < 1 else f"{self.seconds:.1f}")
        cells = [self.case, self.happened, _clip(self.message), seconds,
                 "" if self.rss_mb is None else f"{self.rss_mb:.0f} MB"]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


# ---- shared state: bundles, files, servers, child processes ---------------------------------------

SERVERS = {  # name: (over the raw-text bundle?, flags)
    "defaults": (True, []),  # raw text, so that a request goes through punkt + Moses
    "timeout-2": (False, ["--timeout", "2", "--header-timeout", "2"]),
    "connections-5": (False, ["--max-connections", "5"]),
    "issue-23": (False, ["--timeout", "5", "--max-connections", "8", "--header-timeout", "10"]),
    "issue-23-raw": (True, ["--timeout", "5", "--max-connections", "8", "--header-timeout",
                            "10"]),
}


@dataclass
class Context:
    work: Path
    bundle: Path  # as given or built (its own pipeline)
    raw_bundle: Path  # the same model reading raw text (punkt sentences + Moses)
    small: Path  # a few lines of WikiText-2
    servers: dict[str, tuple[subprocess.Popen, str]] = field(default_factory=dict)
    children: list[subprocess.Popen] = field(default_factory=list)  # of the running case

    def server(self, name: str) -> tuple[subprocess.Popen, int]:
        """The server `name` of SERVERS (started on first use or after it has exited, on a free
        loopback port, once ready; the runner starts it before the case, outside the case's time
        bound): process, port."""
        if name not in self.servers or self.servers[name][0].poll() is not None:
            raw, flags = SERVERS[name]
            self.servers[name] = start_server(self.raw_bundle if raw else self.bundle, flags,
                                              self.work / f"server-{name}.log")
        proc, url = self.servers[name]
        return proc, int(url.rsplit(":", 1)[1])

    def stop_servers(self) -> None:
        for proc, _ in self.servers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def kill_children(self) -> None:
        for proc in self.children:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---- running a CLI --------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int | None  # exit status (negative: killed by that signal); None: TIMEOUT
    stdout: str
    stderr: str
    seconds: float
    rss_mb: float | None


def run_cli(ctx: Context, args: list[str], *, stdin: bytes | None = None,
            bound: float = 60) -> Outcome:
    """Run `args` (its own process group), feeding `stdin` through a pipe if given. Killed after
    `bound` seconds (status None). Peak RSS: the child's VmHWM, polled every 20 ms (wait4's
    ru_maxrss would not do: Linux carries the parent's RSS at the fork into it)."""
    out, err = ctx.work / "child.out", ctx.work / "child.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(args, cwd=REPO, stdout=fo, stderr=fe, start_new_session=True,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    ctx.children.append(proc)
    started = time.monotonic()
    if stdin is not None:
        def feed() -> None:
            try:
                proc.stdin.write(stdin)
                proc.stdin.close()
            except OSError:  # the child stopped reading
                pass
        threading.Thread(target=feed, daemon=True).start()
    status, rss = None, None
    while True:
        rss = max(rss or 0.0, _vm_hwm_mb(proc.pid)) or None
        pid, raw = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(raw)
            break
        if time.monotonic() - started > bound:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = status if status is not None else -signal.SIGKILL
    seconds = time.monotonic() - started
    return Outcome(status, out.read_text(errors="replace"), err.read_text(errors="replace"),
                   seconds, rss)


def _vm_hwm_mb(pid: int) -> float:
    """The peak RSS of a running process in MB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def score(ctx: Context, corpus: str, *extra: str, model: Path | None = None,
          stdin: bytes | None = None, bound: float = 60) -> Row:
    """`serve/score.py corpus --model M --threads 1 extra...` as a row."""
    o = run_cli(ctx, [*SCORE, corpus, "--model", str(model or ctx.bundle), "--threads", "1",
                      *extra], stdin=stdin, bound=bound)
    if o.status is None:
        return Row("TIMEOUT", f"killed after {bound:g} s", o.seconds, o.rss_mb)
    return Row(f"exit {o.status}", cli_message(o), o.seconds, o.rss_mb)


def cli_message(o: Outcome) -> str:
    """An `error:` line, else the last line of standard error (a traceback's exception), else the
    report's token count and perplexity."""
    errors = [line for line in o.stderr.splitlines() if line.strip()]
    for line in errors:
        if line.startswith("error:"):
            return line
    if o.status != 0 and errors:
        return errors[-1]
    report = dict(line.split(":", 1) for line in o.stdout.splitlines() if ":" in line)
    if "Tokens" in report:
        return (f"Tokens:{report['Tokens']}; perplexity "
                f"{report.get('Perplexity including <unk>', '?').strip()}")
    return errors[-1] if errors else o.stdout.strip().splitlines()[0] if o.stdout.strip() else ""


# ---- talking HTTP over a raw socket ---------------------------------------------------------------

def head(length: int | None, content_type: str | None = "application/json",
         path: str = "/v1/score") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(body: bytes, content_type: str | None = "application/json") -> bytes:
    return head(len(body), content_type) + body


def read_answer(sock: socket.socket, bound: float) -> tuple[int | None, dict | None]:
    """Status and JSON body of one answer (None, None if the server closed without one)."""
    data, deadline = b"", time.monotonic() + bound
    while True:
        top, sep, body = data.partition(b"\r\n\r\n")
        if sep and len(body) >= _content_length(top):
            break
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    top, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None, None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {"raw": body[:200].decode(errors="replace")}
    return int(top.split()[1]), parsed


def _content_length(top: bytes) -> int:
    for line in top.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def exchange(port: int, data: bytes, bound: float = 30) -> tuple[int | None, dict | None, float]:
    """Send `data` on a new connection; (status, body, seconds to the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=bound) as sock:
        started = time.monotonic()
        sock.sendall(data)
        status, body = read_answer(sock, bound)
        return status, body, time.monotonic() - started


def http_row(status: int | None, body: dict | None, seconds: float,
             rss_mb: float | None = None, note: str = "") -> Row:
    if status is None:
        return Row("closed, no answer", note, seconds, rss_mb)
    error = (body or {}).get("error") or {}
    happened = f"{status} {error.get('code', '')}".strip()
    message = error.get("message") or json.dumps(body)[:200]
    return Row(happened, f"{note}{message}", seconds, rss_mb)


# ---- defect 1: overload (one row; bench/bench_flood.py has the floods) -----------------------------

def body_never_sent(ctx: Context) -> Row:
    _, port = ctx.server("timeout-2")
    return http_row(*exchange(port, head(50_000)))


# ---- defect 2: bad requests ----------------------------------------------------------------------

def bad_request(data: bytes) -> Callable[[Context], Row]:
    def run(ctx: Context) -> Row:
        _, port = ctx.server("defaults")
        return http_row(*exchange(port, data))
    return run


# ---- defect 3: 1 MB of short sentences -----------------------------------------------------------

SHORT_SENTENCES = "A b. " * 200_000  # 1,000,000 bytes, 200,000 sentences


def short_sentences_cli(ctx: Context) -> Row:
    path = ctx.work / "short_sentences.txt"
    path.write_text(SHORT_SENTENCES, encoding="utf-8")
    return score(ctx, str(path), model=ctx.raw_bundle, bound=180)


def short_sentences_http(ctx: Context) -> Row:
    proc, port = ctx.server("defaults")
    body = json.dumps({"texts": [SHORT_SENTENCES]}).encode()
    status, answer, seconds = exchange(port, post(body), bound=60)
    return http_row(status, answer, seconds, peak_rss_mb(proc.pid),
                    note=f"({len(body):,}-byte body) ")


# ---- defect 4: huge lines, /dev/zero, binary -----------------------------------------------------

TEN_MB = 10_000_000


def _ten_mb_lines(ctx: Context) -> Path:
    """10,000,000 bytes of WikiText-2 valid, repeated, in its own lines."""
    path = ctx.work / "ten_mb_lines.txt"
    if not path.exists():
        text = VALID.read_bytes()
        data = text * (TEN_MB // len(text) + 1)
        data = data[: data.rindex(b"\n", 0, TEN_MB) + 1]
        path.write_bytes(data + b"x" * (TEN_MB - len(data) - 1) + b"\n")  # exactly 10 MB
    return path


def one_line_10mb(ctx: Context) -> Row:
    path = ctx.work / "ten_mb_one_line.txt"
    path.write_bytes(_ten_mb_lines(ctx).read_bytes()[:-1].replace(b"\n", b" ") + b"\n")
    return score(ctx, str(path), bound=120)


def many_lines_10mb(ctx: Context) -> Row:
    return score(ctx, str(_ten_mb_lines(ctx)), bound=120)


def binary_file(ctx: Context) -> Row:
    path = ctx.work / "image.png"
    rng = random.Random(0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"
                     + bytes(rng.randrange(256) for _ in range(65536)))
    return score(ctx, str(path))


# ---- defect 5: FIFO and standard input -----------------------------------------------------------

def _twenty_lines() -> bytes:
    return b"".join(VALID.read_bytes().splitlines(keepends=True)[:20])


def fifo(ctx: Context) -> Row:
    path = ctx.work / "fifo"
    if path.exists():
        path.unlink()
    os.mkfifo(path)

    def write() -> None:
        with path.open("wb") as f:  # blocks until score.py opens it
            for line in _twenty_lines().splitlines(keepends=True):
                f.write(line)
                f.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        return score(ctx, str(path))
    finally:
        if writer.is_alive():  # score.py never opened it (or stopped reading): let the writer go
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(5)
            os.close(fd)


def piped(corpus: str) -> Callable[[Context], Row]:
    return lambda ctx: score(ctx, corpus, stdin=_twenty_lines())


# ---- defect 6: hostile bundles -------------------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _edit_json(path: Path, edit: Callable[[dict], None], raw: dict[str, str] | None = None
               ) -> None:
    """Load, edit, dump; then put each `raw` text in place of its placeholder string."""
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    text = json.dumps(data, indent=1)
    for placeholder, replacement in (raw or {}).items():
        text = text.replace(json.dumps(placeholder), replacement)
    path.write_text(text, encoding="utf-8")


def _set(*keys: str, value: object) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value
    return edit


def _deep_bundle_json(b: Path) -> None:
    _edit_json(b / "bundle.json", _set("versions", value="@DEEP@"), {"@DEEP@": _nested(DEEP)})


def _huge_integer(b: Path) -> None:
    _edit_json(b / "bundle.json", _set("schema_version", value="@HUGE@"),
               {"@HUGE@": "1" + "0" * 5000})  # 10**5000


def _many_layers(b: Path) -> None:
    _edit_json(b / "bundle.json", _set("model", "nlayers", value=10**7))


def _huge_nhid(b: Path) -> None:
    _edit_json(b / "bundle.json", _set("model", "nhid", value=10**12))


def _no_eos(b: Path) -> None:
    def edit(v: dict) -> None:  # same size, <eos> renamed
        v["tokens"] = ["</s>" if t == "<eos>" else t for t in v["tokens"]]
        v["specials"] = ["</s>" if t == "<eos>" else t for t in v.get("specials", [])]
    _edit_json(b / "vocab.json", edit)


def _deep_vocab(b: Path) -> None:
    _edit_json(b / "vocab.json", _set("tokens", value="@DEEP@"), {"@DEEP@": _nested(DEEP)})


def _external_data_outside(b: Path) -> None:
    """model.onnx with its weights as external data at `../secret.bin`, beside the bundle."""
    import onnx

    model = onnx.load(b / "model.onnx")
    onnx.save_model(model, b / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    model = onnx.load(b / "model.onnx", load_external_data=False)
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    data = model.SerializeToString()  # onnx.save refuses '..' (as it should)
    assert b"model.onnx.data" not in data, "a tensor was left pointing at model.onnx.data"
    (b / "model.onnx").write_bytes(data)
    (b / "model.onnx.data").rename(b.parent / "secret.bin")


def bad_bundle(damage: Callable[[Path], None]) -> Callable[[Context], Row]:
    """score.py on a few lines with a copy of the bundle damaged by `damage`."""
    def run(ctx: Context) -> Row:
        folder = ctx.work / "bundles" / damage.__name__.strip("_")
        shutil.rmtree(folder, ignore_errors=True)
        copy = Path(shutil.copytree(ctx.bundle, folder / "bundle"))
        damage(copy)
        return score(ctx, str(ctx.small), model=copy)
    return run


# ---- defect 7: slow senders, connection cap, SIGTERM ---------------------------------------------

HEALTHZ = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def slow_headers(ctx: Context) -> Row:
    _, port = ctx.server("timeout-2")
    data = f"POST /v1/score HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode() + b"a" * 1000
    answer, closed = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        for byte in data:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.5)[0]:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                answer += chunk
                if not chunk:
                    closed = True
                    break
            if time.monotonic() - started > 30:
                break
        seconds = time.monotonic() - started
    if not closed:
        return Row("still open", "not closed by the server within 30 s", seconds)
    first = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return Row("closed by the server", f"answer before closing: {first or 'none'}", seconds)


def connection_cap(ctx: Context) -> Row:
    _, port = ctx.server("connections-5")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    try:
        started = time.monotonic()
        for _ in range(25):  # the server counts a connection once it has accepted it
            status, body, _ = exchange(port, HEALTHZ, 10)
            if status != 200:
                break
            time.sleep(0.2)
        seconds = time.monotonic() - started
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    after = exchange(port, HEALTHZ, 10)[0]
    return http_row(status, body, seconds, note=f"(then, the 5 closed: /healthz {after}) ")


def sigterm_slow_senders(server: str) -> Callable[[Context], Row]:
    """SIGTERM to the server `server` (its last case) with 20 slow senders open, half mid-headers
    and half mid-body, all trickling a byte every 0.5 s: exit status, seconds to exit, and what
    the senders got."""
    def run(ctx: Context) -> Row:
        proc, port = ctx.server(server)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for i, sock in enumerate(socks):
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nX-Slow: " if i % 2
                         else head(100_000) + b"{")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.5):
                for sock in socks:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            happened = f"exit {proc.wait(timeout=55)}"
        except subprocess.TimeoutExpired:
            happened = "still running 55 s after SIGTERM"
        seconds = time.monotonic() - started
        stop.set()
        trickler.join()
        got: dict[str, int] = {}
        for sock in socks:
            status, body = read_answer(sock, 0.5)
            code = ((body or {}).get("error") or {}).get("code", "")
            key = f"{status} {code}".strip() if status else "closed, no answer"
            got[key] = got.get(key, 0) + 1
            sock.close()
        log = (ctx.work / f"server-{server}.log").read_text(errors="replace").split("\n")
        log = [line for line in log if line.strip()]
        return Row(happened, "senders got: " + ", ".join(f"{n} x {k}" for k, n in got.items())
                   + (f"; last log line: {log[-1]}" if log else ""), seconds)
    return run


# ---- defect 8: --per-line through a symbolic link ------------------------------------------------

def per_line_symlink(ctx: Context) -> Row:
    folder = ctx.work / "symlink"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    target, link = folder / "target.jsonl", folder / "link.jsonl"
    target.write_text("old content\n")
    link.symlink_to(target.name)
    row = score(ctx, str(ctx.small), "--per-line", str(link))
    lines = target.read_text().splitlines()
    written = bool(lines) and all(line.startswith("{") for line in lines)
    row.happened += (f"; link {'still a link' if link.is_symlink() else 'REPLACED by a file'}, "
                     f"target {'has the output' if written else 'NOT written'} "
                     f"({len(lines)} lines)")
    return row


# ---- issue 23: hostile clients of the service, and others of their kinds --------------------------

def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _growth(server: str, run: Callable[[int], Row]) -> Callable[[Context], Row]:
    """`run(port)` against the server `server`, its row's RSS the server's growth (VmRSS)."""
    def case(ctx: Context) -> Row:
        proc, port = ctx.server(server)
        before = _rss_mb(proc.pid)
        row = run(port)
        row.rss_mb = _rss_mb(proc.pid) - before
        row.message += " (RSS: the server's growth)"
        return row
    return case


def generate_prompt(prompt: str) -> Callable[[int], Row]:
    def run(port: int) -> Row:
        body = json.dumps({"prompt": prompt, "tokens": 5}).encode()
        return http_row(*exchange(port, head(len(body), path="/v1/generate") + body))
    return run


def idle_uploads_then_small(port: int) -> Row:
    """Three connections announce 1 MiB on /v1/score and send nothing; then three one-line
    requests on fresh connections: what they get."""
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        for sock in idle:
            sock.sendall(head(1 << 20))
        time.sleep(0.3)
        got = [exchange(port, post(b'{"texts": ["the game began ."]}'), 10) for _ in range(3)]
    finally:
        for sock in idle:
            sock.close()
    statuses = ", ".join(str(status) for status, _, _ in got)
    return Row(f"one-line requests: {statuses}", "three idle 1 MiB uploads open beside them",
               sum(seconds for _, _, seconds in got))


def body_never_comes(path: str) -> Callable[[int], Row]:
    def run(port: int) -> Row:
        return http_row(*exchange(port, head(5000, path=path) + b"{", 30))
    return run


def big_head(size: int) -> Callable[[int], Row]:
    def run(port: int) -> Row:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            started = time.monotonic()
            try:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nX-Big: ".encode())
                for _ in range(size // 65536):
                    sock.sendall(b"a" * 65536)
            except OSError:
                pass  # closed on us
            status, body = read_answer(sock, 10)
            return http_row(status, body, time.monotonic() - started, note=f"({size:,} bytes) ")
    return run


def trickled_body(path: str, gap: float = 0.5) -> Callable[[int], Row]:
    """A 40-byte body on `path`, a byte every `gap` seconds (20 s in all)."""
    def run(port: int) -> Row:
        body = b'{"texts": ["the game began in 1998 ."]}'
        with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:
            started = time.monotonic()
            sock.sendall(head(len(body), path=path))
            for byte in body:
                if select.select([sock], [], [], gap)[0]:
                    break  # answered (and closed) already
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
            status, answer = read_answer(sock, 30)
            return http_row(status, answer, time.monotonic() - started)
    return run


def trickled_chunks(port: int) -> Row:
    """A chunked body on /v1/score, one byte a chunk every 0.1 s, for 20 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /v1/score HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: "
                     f"application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(200):
            if select.select([sock], [], [], 0.1)[0]:
                break
            try:
                sock.send(b"1\r\n \r\n")
            except OSError:
                break
        status, answer = read_answer(sock, 30)
        return http_row(status, answer, time.monotonic() - started)


def pipelined(count: int) -> Callable[[int], Row]:
    def run(port: int) -> Row:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            started = time.monotonic()
            answers = 0
            try:
                sock.sendall(HEALTHZ * count)
                while answers < count:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    answers += chunk.count(b"HTTP/1.1 200")
            except OSError:
                pass
            ending = "all answered" if answers == count else "then closed"
            return Row(f"{answers:,} answers, {ending}", f"{count:,} GET /healthz in one write",
                       time.monotonic() - started)
    return run


# ---- the runner -----------------------------------------------------------------------------------

@dataclass
class Case:
    title: str
    run: Callable[[Context], Row]
    bound: float | None = None  # seconds; None: --bound
    server: str | None = None  # the SERVERS entry it talks to


CASES = [
    Case("1 Content-Length 50,000, body never sent (--timeout 2)", body_never_sent,
         server="timeout-2"),
    Case('2 lone surrogate "\\ud800", per_token true', bad_request(post(
        b'{"texts": ["a \\ud800 b"], "per_token": true}')), server="defaults"),
    Case("2 body not UTF-8", bad_request(post(b'{"texts": ["caf\xe9 \xff\xfe"]}')),
         server="defaults"),
    Case("2 invalid JSON", bad_request(post(b'{"texts": ["a", ')), server="defaults"),
    Case("2 no Content-Type", bad_request(post(b'{"texts": ["a"]}', content_type=None)),
         server="defaults"),
    Case("2 Content-Type text/plain", bad_request(post(b'{"texts": ["a"]}', "text/plain")),
         server="defaults"),
    Case('3 score.py, 1 MB of "A b. " (raw-text bundle: punkt + Moses)', short_sentences_cli,
         bound=200),
    Case('3 server (defaults, raw-text bundle), 1 MB of "A b. " as one text',
         short_sentences_http, server="defaults"),
    Case("4 score.py, one 10 MB line", one_line_10mb, bound=140),
    Case("4 score.py, the same 10 MB in lines", many_lines_10mb, bound=140),
    Case("4 score.py /dev/zero", lambda ctx: score(ctx, "/dev/zero")),
    Case("4 score.py, a binary file (PNG header, NULs)", binary_file),
    Case("5 score.py FIFO (a writer thread, 20 lines)", fifo),
    Case("5 score.py /dev/stdin, 20 lines piped in", piped("/dev/stdin")),
    Case("5 score.py -, 20 lines piped in", piped("-")),
    Case(f"6 bundle.json nested {DEEP:,} deep", bad_bundle(_deep_bundle_json)),
    Case("6 bundle.json with a 5,001-digit integer (10**5000)", bad_bundle(_huge_integer)),
    Case("6 model.nlayers = 10**7", bad_bundle(_many_layers)),
    Case("6 model.nhid = 10**12", bad_bundle(_huge_nhid)),
    Case("6 vocab.json without the pipeline's <eos>", bad_bundle(_no_eos)),
    Case(f"6 vocab.json nested {DEEP:,} deep", bad_bundle(_deep_vocab)),
    Case("6 ONNX external data at ../secret.bin", bad_bundle(_external_data_outside)),
    Case("7 headers at 1 byte / 0.5 s (--header-timeout 2)", slow_headers, server="timeout-2"),
    Case("7 6th connection, 5 idle open (--max-connections 5)", connection_cap,
         server="connections-5"),
    Case("7 SIGTERM, 20 slow senders open (--timeout 2 --header-timeout 2)",
         sigterm_slow_senders("timeout-2"), server="timeout-2"),
    Case("7 SIGTERM, 20 slow senders open (server defaults: --timeout 30)",
         sigterm_slow_senders("defaults"), server="defaults"),
    Case("8 score.py --per-line LINK (symbolic link to a file)", per_line_symlink),
    Case("23 generate, a prompt of 400,000 line breaks",
         _growth("issue-23", generate_prompt("\n" * 400_000)), server="issue-23"),
    Case('23 generate, raw-text bundle, a prompt of 400,000 "!"',
         _growth("issue-23-raw", generate_prompt("!" * 400_000)), server="issue-23-raw"),
    Case('23 generate, raw-text bundle, a prompt "x,x,x..." of 400 KB',
         _growth("issue-23-raw", generate_prompt("x," * 200_000)), server="issue-23-raw"),
    Case("23 three idle 1 MiB uploads, then three one-line requests",
         _growth("issue-23", idle_uploads_then_small), server="issue-23"),
    *(Case(f"23 POST {path}, announced body never sent", _growth("issue-23", body_never_comes(
        path)), server="issue-23") for path in ("/x", "/v1/score/", "/")),
    Case("23 a 64 MB header sent fast", _growth("issue-23", big_head(64 << 20)),
         server="issue-23"),
    Case("23+ a body a byte per 0.5 s, /v1/score", _growth("issue-23", trickled_body(
        "/v1/score")), server="issue-23"),
    Case("23+ the same on /v1/generate", _growth("issue-23", trickled_body("/v1/generate")),
         server="issue-23"),
    Case("23+ the same on /nowhere", _growth("issue-23", trickled_body("/nowhere")),
         server="issue-23"),
    Case("23+ a chunked body, a byte a chunk every 0.1 s", _growth("issue-23", trickled_chunks),
         server="issue-23"),
    Case("23+ JSON nested 300,000 deep", _growth("issue-23", lambda port: http_row(*exchange(
        port, post(b'{"texts": ' + b"[" * 300_000 + b"]" * 300_000 + b"}")))),
         server="issue-23"),
    Case("23+ 10 pipelined requests", _growth("issue-23", pipelined(10)), server="issue-23"),
    Case("23+ 20,000 pipelined requests", _growth("issue-23", pipelined(20_000)),
         server="issue-23"),
]

def run_case(ctx: Context, case: Case, bound: float) -> Row:
    """`case` in a thread; TIMEOUT (and its children killed) if it runs past `bound` seconds."""
    result: list[Row] = []
    ctx.children = []

    def target() -> None:
        try:
            result.append(case.run(ctx))
        except BaseException as err:  # noqa: BLE001 - SystemExit from start_server included
            result.append(Row(f"bench error: {type(err).__name__}", str(err)))

    if case.server:
        try:
            ctx.server(case.server)
        except SystemExit as err:  # start_server's way of saying the server did not come up
            return Row("bench error: no server", str(err), case=case.title)
    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    if thread.is_alive():
        ctx.kill_children()
        row = Row("TIMEOUT", f"case still running after {bound:g} s",
                  time.monotonic() - started)
    else:
        row = result[0]
    row.case = case.title
    row.message = row.message.replace(str(ctx.work), "WORK")  # short enough to read
    return row


def build_bundles(work: Path, given: Path | None) -> tuple[Path, Path]:
    """The bundle (given, or the tests' tiny one built in a child process) and its raw-text copy."""
    if given is None:
        code = ("import sys; from pathlib import Path; sys.path[:0] = [sys.argv[1], sys.argv[1] + "
                "'/tests']; from helpers_runs import make_bundle; "
                "print(make_bundle(Path(sys.argv[2])).bundle)")
        done = subprocess.run([sys.executable, "-c", code, str(REPO), str(work)], cwd=REPO,
                              check=False, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"could not build the tiny bundle:\n{done.stderr[-2000:]}")
        given = Path(done.stdout.strip().splitlines()[-1])
    raw = work / "bundles" / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.copytree(given, raw)
    from keraslm.text import RAW

    _edit_json(raw / "bundle.json", _set("pipeline", value=RAW.to_dict()))
    return given.resolve(), raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle to use (default: build the tests' tiny one)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the files made (default: a temporary one, removed)")
    p.add_argument("--bound", type=float, default=60, help="seconds per case (default 60)")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="run only the cases whose title contains one of these")
    args = p.parse_args(argv)
    temporary = None
    if args.work is None:
        temporary = tempfile.TemporaryDirectory(prefix="hostile_cases_")
        args.work = Path(temporary.name)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"building the bundles in {work} ...", file=sys.stderr, flush=True)
    bundle, raw = build_bundles(work, args.bundle)
    small = work / "small.txt"
    small.write_bytes(b"".join(VALID.read_bytes().splitlines(keepends=True)[:20]))
    ctx = Context(work=work, bundle=bundle, raw_bundle=raw, small=small)
    rows = []
    try:
        for case in CASES:
            if args.only and not any(word in case.title for word in args.only):
                continue
            print(f"  {case.title} ...", file=sys.stderr, flush=True)
            rows.append(run_case(ctx, case, max(args.bound, case.bound or 0)))
    finally:
        ctx.stop_servers()
    print(f"\nBundle: {bundle} (pipeline as exported); raw-text copy: {raw.name} "
          f"(punkt sentences + Moses). score.py runs with --threads 1.\n")
    print("| case | what happened | message (first line) | seconds | peak RSS |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row.markdown())
    print(f"\n{len(rows)} cases in {time.monotonic() - started:.0f} s (bundle build included)")
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
