"""The scoring service in a subprocess, for the tests that talk to it over real HTTP.

`start_server` runs `python -m serve.server` on a free loopback port. Overload, timeouts,
readiness and draining need a model that is slow on demand: `LAUNCHER` starts the same server
with `Scorer.__init__` and `Scorer.step` waiting while a gate file exists, so a test holds a batch
as long as it needs to (the `gated` fixture of conftest.py, a `Gated`), and every generation step
taking `TEST_GENERATE_DELAY` seconds when that is set. Plain helpers; the fixtures built on them
are in conftest.py and the test modules.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
WAIT = 60  # seconds: the bound on every wait for the server

LAUNCHER = textwrap.dedent("""
    import os, sys, time
    from serve import scorer, session

    def gated(fn, variable):
        gate = os.environ.get(variable)
        def wait_then(*args, **kwargs):
            deadline = time.monotonic() + 60
            while gate and os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
            return fn(*args, **kwargs)
        return wait_then

    scorer.Scorer.__init__ = gated(scorer.Scorer.__init__, "TEST_LOAD_GATE")
    scorer.Scorer.step = gated(scorer.Scorer.step, "TEST_STEP_GATE")

    def slowed(fn, seconds):
        def sleep_then(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return sleep_then

    if os.environ.get("TEST_GENERATE_DELAY"):  # seconds per generation step
        session.ModelSession.next_logprobs = slowed(session.ModelSession.next_logprobs,
                                                   float(os.environ["TEST_GENERATE_DELAY"]))
    from serve.server import main
    sys.exit(main(sys.argv[1:]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=WAIT, trust_env=False, **kwargs)

    def post(self, path: str = "/v1/score", **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=WAIT, trust_env=False, **kwargs)

    def score(self, texts: list[str], **fields) -> list[dict]:
        response = self.post(json={"texts": texts, **fields})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    def metrics(self) -> dict[str, float]:
        text = self.get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_for(self, what: Callable[[], bool], message: str) -> None:
        deadline = time.monotonic() + WAIT
        while not what():
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {message}"
            time.sleep(0.02)

    def wait_metric(self, name: str, value: float) -> None:
        self.wait_for(lambda: self.metrics().get(name) == value, f"{name} == {value}")

    def wait_ready(self) -> None:
        self.wait_for(lambda: self._status("/readyz") == 200, "/readyz")

    def _status(self, path: str) -> int | None:
        try:
            return self.get(path).status_code
        except httpx.TransportError:
            return None


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None, gated: bool = False,
                 cwd: Path = REPO) -> Server:
    """The server on a free loopback port, in its own session; `gated`: through LAUNCHER."""
    port = free_port()
    command = ([sys.executable, "-c", LAUNCHER] if gated else
               [sys.executable, "-m", "serve.server"])
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--threads", "1", "--log-level", "warning", *args],
            cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                 "PYTHONPATH": str(REPO), **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    server.wait_for(lambda: server._status("/healthz") == 200, "/healthz")
    return server


@contextlib.contextmanager
def serving(tmp: Path, bundle: Path, *args: str, **options) -> Iterator[Server]:
    """`start_server` over `bundle` with `args` (and start_server's `options`), once ready;
    stopped on leaving."""
    s = start_server(tmp, "--model", str(bundle), *args, **options)
    try:
        s.wait_ready()
        yield s
    finally:
        stop(s)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=WAIT)


@dataclass
class Gated:
    """A server whose model loads (`load`) and steps (`step`) only while the gate file is gone."""

    server: Server
    load: Path
    step: Path


def ready(g: Gated) -> Server:
    g.load.unlink()
    g.server.wait_ready()
    return g.server


def in_thread(pool: concurrent.futures.Executor, server: Server, texts: list[str]):
    return pool.submit(server.post, json={"texts": texts})


# ---- raw HTTP/1.1 over a socket, for what httpx will not send ----------------------------------

def raw_connection(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    return sock


def request_head(length: int, path: str = "/v1/score") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one answer on `sock` (read until the server closes it or the
    body is complete)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
