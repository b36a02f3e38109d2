"""`python -m serve.server`: the command line of the scoring service (uvicorn over the app)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import socket
import sys
from dataclasses import fields
from pathlib import Path

import uvicorn

from keraslm.errors import UserError
from serve.argtypes import float_at_least, int_at_least
from serve.bundle import DEFAULT_BUNDLES_ROOT, resolve_bundle
from serve.session import DEVICES
from serve.web.app import create_app
from serve.web.protocol import HTTP_IMPLEMENTATIONS, guarded_protocol
from serve.web.settings import Settings

log = logging.getLogger("uvicorn.error")

DESCRIPTION = "HTTP scoring service (FastAPI + uvicorn): POST /v1/score, /healthz, /readyz, /metrics"


def build_parser() -> argparse.ArgumentParser:
    s = Settings(Path())
    p = argparse.ArgumentParser(prog="python -m serve.server", description=DESCRIPTION)
    p.add_argument("--model", default=None,
                   help=f"bundle folder or name under {DEFAULT_BUNDLES_ROOT}/ "
                        "(default: the newest bundle there)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(0), default=8080, help="TCP port (default 8080; 0: any)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="onnxruntime device (auto: CUDA when installed and present)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--max-batch", type=int_at_least(1), default=s.max_batch,
                   help=f"texts sharing an onnxruntime call (default {s.max_batch})")
    p.add_argument("--max-wait-ms", type=float_at_least(0), default=s.max_wait_ms,
                   help="how long the first call after idle may wait for requests already "
                        f"arriving (default {s.max_wait_ms:g})")
    p.add_argument("--queue-size", type=int_at_least(1), default=s.queue_size,
                   help=f"requests admitted and waiting for the model (being read, tokenized or "
                        f"queued); more get 503 at once (default {s.queue_size})")
    p.add_argument("--max-texts", type=int_at_least(1), default=s.max_texts,
                   help=f"texts per request (default {s.max_texts})")
    p.add_argument("--max-tokens-per-text", type=int_at_least(1), default=s.max_tokens_per_text,
                   help=f"tokens per text, <eos> included (default {s.max_tokens_per_text})")
    p.add_argument("--max-body-bytes", type=int_at_least(1), default=s.max_body_bytes,
                   help=f"request body size (default {s.max_body_bytes})")
    p.add_argument("--timeout", type=float_at_least(1e-3), default=s.timeout,
                   help=f"seconds from a request's arrival to its answer (reading, tokenizing, "
                        f"waiting, scoring): 408 for a body still arriving, 504 after; work "
                        f"expected to take longer is refused with 503 (default {s.timeout:g})")
    p.add_argument("--max-connections", type=int_at_least(1), default=s.max_connections,
                   help=f"open connections; more are answered 503 and closed "
                        f"(default {s.max_connections})")
    p.add_argument("--header-timeout", type=float_at_least(1e-3), default=s.header_timeout,
                   help=f"seconds for a connection to send a request's headers "
                        f"(default {s.header_timeout:g})")
    p.add_argument("--max-header-bytes", type=int_at_least(256), default=s.max_header_bytes,
                   help=f"bytes of a request's line and headers; more are answered 431 and the "
                        f"connection closed (default {s.max_header_bytes})")
    p.add_argument("--http", choices=HTTP_IMPLEMENTATIONS, default=s.http,
                   help="HTTP/1.1 parser: httptools (C, uvicorn's fast one) or h11 (pure Python); "
                        "auto: httptools when installed (default auto)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 stopped cleanly, 1 bad bundle or address,
    2 bad flags)."""
    args = build_parser().parse_args(argv)
    try:
        bundle = resolve_bundle(args.model)
        sock = _listen(args.host, args.port)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    settings = Settings(bundle=bundle, **{f.name: getattr(args, f.name) for f in fields(Settings)
                                          if f.name != "bundle"})
    server: uvicorn.Server | None = None

    def fatal() -> None:
        server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    service = app.state.service
    config = uvicorn.Config(
        app, log_level=args.log_level, access_log=args.access_log,
        http=guarded_protocol(settings.max_connections, settings.header_timeout,
                              on_refused=service.metrics.connections_refused.inc,
                              on_shutdown=service.stopping.set, http=settings.http,
                              max_header_bytes=settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes + 1,  # ours answers first
        timeout_graceful_shutdown=math.ceil(settings.timeout) + 5)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    log.info("keraslm: listening on http://%s:%d, loading %s", _url_host(host), port, bundle)
    with sock, _signals_stop_only():
        server.run(sockets=[sock])
    error = service.load_error
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port or a bad address is a one-line error before startup."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        reason = (err.strerror if isinstance(err, socket.gaierror) or not err.errno
                  else os.strerror(err.errno)) or str(err)
        raise UserError(f"cannot listen on {host}:{port} ({reason})") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def _signals_stop_only():
    """uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the previous handler; a
    drained server has stopped as asked, so that handler does nothing and main returns 0."""
    stop = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stop}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
