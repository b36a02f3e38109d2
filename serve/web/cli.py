"""`python -m serve.server`: the command line of the scoring service (uvicorn over the app)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import uvicorn

from keraslm.errors import UserError
from keraslm.files import read_bounded
from serve.argtypes import float_at_least, int_at_least
from serve.bundle import DEFAULT_BUNDLES_ROOT, resolve_bundle
from serve.session import DEVICES
from serve.web.access import (
    ANY_HOST,
    API_KEY_FILE_VARIABLE,
    LOOPBACK_HOSTS,
    api_key_file,
    is_loopback,
    parse_allowed_hosts,
    read_api_keys,
)
from serve.web.app import create_app
from serve.web.protocol import HTTP_IMPLEMENTATIONS, guarded_protocol
from serve.web.settings import Settings

log = logging.getLogger("uvicorn.error")

DESCRIPTION = ("HTTP (or HTTPS) scoring service (FastAPI + uvicorn): POST /v1/score, "
               "/v1/generate, GET /, /healthz, /readyz, /metrics")
MAX_PEM_BYTES = 1 << 20


@dataclass(frozen=True)
class TLS:
    """The certificate and key files (PEM) handed to uvicorn, checked first."""

    certfile: str
    keyfile: str
    password: str | None = None


def build_parser() -> argparse.ArgumentParser:
    s = Settings(Path())
    p = argparse.ArgumentParser(prog="python -m serve.server", description=DESCRIPTION)
    p.add_argument("--model", default=None,
                   help=f"bundle folder or name under {DEFAULT_BUNDLES_ROOT}/ "
                        "(default: the newest bundle there)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other "
                        "needs --api-key-file or --allow-unauthenticated)")
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
    _add_access_flags(p.add_argument_group(
        "who may use it", "API keys and allowed hosts (README: Deploying)"))
    _add_tls_flags(p.add_argument_group(
        "HTTPS", "serve https:// with a PEM certificate and its private key (both flags)"))
    return p


def _add_access_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--api-key-file", metavar="FILE", default=None,
                   help=f"require Authorization: Bearer KEY on /v1/* and every path but /, "
                        f"/healthz and /readyz (401 otherwise); FILE has one key a line, blank "
                        f"lines and # comments ignored (default: the file ${API_KEY_FILE_VARIABLE} "
                        f"names, else no keys)")
    g.add_argument("--open-metrics", action="store_true",
                   help="with keys: serve /metrics without one (for a scraper on a private "
                        "network)")
    g.add_argument("--open-docs", action="store_true",
                   help="with keys: serve /docs, /redoc and /openapi.json without one")
    g.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen on a non-loopback --host without API keys (refused otherwise: "
                        "anyone who can connect could use the model)")
    g.add_argument("--allowed-hosts", metavar="LIST", type=_allowed_hosts, default=None,
                   help="Host headers answered, comma-separated: names, addresses, networks "
                        "(10.0.0.0/8), .example.com (it and its subdomains) or * (any); others "
                        "get 421, a request without Host 400; /healthz and /readyz are exempt "
                        f"(default: {', '.join(LOOPBACK_HOSTS)} when --host is loopback, "
                        f"else *)")


def _add_tls_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--ssl-certfile", metavar="FILE", default=None,
                   help="the server's certificate (PEM; its chain may follow it)")
    g.add_argument("--ssl-keyfile", metavar="FILE", default=None,
                   help="the certificate's private key (PEM)")
    g.add_argument("--ssl-keyfile-password", metavar="PASSWORD", default=None,
                   help="the password of an encrypted --ssl-keyfile (other users of this "
                        "machine can read command lines: prefer a key file only the service "
                        "can read)")


def _allowed_hosts(text: str) -> tuple[str, ...]:
    try:
        return parse_allowed_hosts(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 stopped cleanly, 1 bad bundle, address, key file
    or certificate, 2 bad flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tls = _tls_flags(parser, args)
    try:
        context = None if tls is None else load_tls(tls)
        settings, sock = _prepare(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    bundle = settings.bundle
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
                              max_header_bytes=settings.max_header_bytes, tls=context),
        h11_max_incomplete_event_size=settings.max_header_bytes + 1,  # ours answers first
        timeout_graceful_shutdown=math.ceil(settings.timeout) + 5,
        loop="auto" if context is None else "asyncio")  # uvloop's start_tls can lose data
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    log.info("keraslm: listening on %s://%s:%d; %s; loading %s", "http" if tls is None
             else "https", _url_host(host), port, service.access.describe(), bundle)
    with sock, _signals_stop_only():
        server.run(sockets=[sock])
    error = service.load_error
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _prepare(args: argparse.Namespace) -> tuple[Settings, socket.socket]:
    """The settings and the listening socket, once every file is read and checked; UserError
    for a bad key file, bundle or address, or a non-loopback address without keys."""
    found = api_key_file(args.api_key_file)
    api_keys = read_api_keys(*found) if found else ()
    family, address = _resolve(args.host, args.port)
    loopback = is_loopback(address[0])
    if not (api_keys or loopback or args.allow_unauthenticated):
        raise UserError(f"refusing to listen on {args.host} without API keys: anyone who can "
                        f"reach it could use the model; give --api-key-file FILE (or "
                        f"${API_KEY_FILE_VARIABLE}), or --allow-unauthenticated if something in "
                        f"front of it (a proxy, a firewall) decides who may connect")
    bundle = resolve_bundle(args.model)
    flags = {f.name: getattr(args, f.name) for f in fields(Settings) if f.name in vars(args)}
    settings = Settings(**{**flags, "bundle": bundle, "api_keys": api_keys, "allowed_hosts":
                           args.allowed_hosts or (LOOPBACK_HOSTS if loopback else ANY_HOST)})
    return settings, _listen(family, address, args.host, args.port)


def _tls_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TLS | None:
    """The TLS files given, or None; both or neither (a usage error, exit 2, otherwise)."""
    if args.ssl_certfile is None and args.ssl_keyfile is None:
        if args.ssl_keyfile_password is not None:
            parser.error("--ssl-keyfile-password needs --ssl-keyfile and --ssl-certfile")
        return None
    if args.ssl_certfile is None or args.ssl_keyfile is None:
        given, missing = (("--ssl-keyfile", "--ssl-certfile") if args.ssl_certfile is None
                          else ("--ssl-certfile", "--ssl-keyfile"))
        parser.error(f"{given} needs {missing} too")
    return TLS(args.ssl_certfile, args.ssl_keyfile, args.ssl_keyfile_password)


class _PasswordNeeded(Exception):
    pass


def load_tls(tls: TLS) -> ssl.SSLContext:
    """The server's TLS context with the certificate and key loaded; a missing, unreadable,
    malformed or mismatched file, or a key whose password is missing or wrong, is a one-line
    UserError before listening (and OpenSSL never prompts for a password)."""
    cert, key = f"--ssl-certfile {tls.certfile}", f"--ssl-keyfile {tls.keyfile}"
    read_bounded(tls.certfile, MAX_PEM_BYTES, cert)
    read_bounded(tls.keyfile, MAX_PEM_BYTES, key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.certfile)
    except ssl.SSLError:
        raise UserError(f"{cert}: no PEM certificate in it") from None

    def password() -> str:
        if tls.password is None:
            raise _PasswordNeeded
        return tls.password

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile, password)
    except _PasswordNeeded:
        raise UserError(f"{key}: the key is encrypted; give its password with "
                        f"--ssl-keyfile-password") from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise UserError(f"{key} is not the private key of the certificate in "
                            f"{tls.certfile}") from None
        if tls.password is not None:
            raise UserError(f"{key}: cannot decrypt it with --ssl-keyfile-password (wrong "
                            f"password?), or not a PEM private key") from None
        raise UserError(f"{key}: not a PEM private key") from None
    return context


def _resolve(host: str, port: int) -> tuple[int, tuple]:
    """The address family and socket address `host` names (its first)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as err:
        raise _listen_error(host, port, err) from None
    return family, address


def _listen(family: int, address: tuple, host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port or a bad address is a one-line error before startup."""
    try:
        return socket.create_server(address, family=family, backlog=2048)
    except OSError as err:
        raise _listen_error(host, port, err) from None


def _listen_error(host: str, port: int, err: OSError) -> UserError:
    reason = (err.strerror if isinstance(err, socket.gaierror) or not err.errno
              else os.strerror(err.errno)) or str(err)
    return UserError(f"cannot listen on {host}:{port} ({reason})")


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
