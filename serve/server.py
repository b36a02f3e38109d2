"""HTTP scoring service: `python -m serve.server [--model BUNDLE] [--port 8080]` (FastAPI + uvicorn).

    POST /v1/score   {"texts": [...], "per_token": false} -> each text scored on its own, exactly
                     as `Scorer.score` and `serve/score.py --per-line` score it
    GET  /healthz    the process is alive          GET /readyz   the model is loaded (503 before)
    GET  /metrics    Prometheus text format        GET /docs, /openapi.json   the API

The server listens (on loopback unless told otherwise) before the model is loaded, so probes get
an answer at once; the bundle loads on the model thread, which then runs every onnxruntime batch
(serve/batcher.py gathers the texts of concurrent requests into them) while the event loop keeps
accepting, parsing and answering. Every limit answers with a JSON error that names it: body size,
texts per request, tokens per text (413), a full queue (503 + Retry-After), the request timeout
(504). SIGTERM or Ctrl-C stops accepting connections, lets the requests in flight finish, and
exits 0. Needs the `[serve]` extra; never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from keraslm.errors import UserError
from serve.argtypes import float_at_least, int_at_least
from serve.batcher import Batcher, QueueFull, score_rows
from serve.bundle import DEFAULT_BUNDLES_ROOT, resolve_bundle
from serve.metrics import CONTENT_TYPE, Registry
from serve.scorer import DEVICES, Scorer, TextScore

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream for the server

SCORE_PATH = "/v1/score"
PATHS = (SCORE_PATH, "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc")
INLINE_CHARS = 4096  # requests up to this much text are tokenized on the event loop (cheaper)
RETRY_AFTER = 1      # seconds, when overloaded or loading
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Settings:
    """What the flags set; `create_app` takes one."""

    bundle: Path
    device: str = "auto"
    threads: int | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 128
    max_texts: int = 64
    max_tokens_per_text: int = 2000
    max_body_bytes: int = 1 << 20
    timeout: float = 30.0


# --- the API's shapes (FastAPI turns them into the OpenAPI schema) -------------------------------

class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="texts to score, each on its own, through the "
                                               "bundle's text pipeline")
    per_token: StrictBool = Field(False, description="also return every token's log-probability")


class TokenScore(BaseModel):
    token: str
    logprob: float | None = Field(description="natural log of the token's probability")
    oov: bool = Field(description="not in the vocabulary: scored as <unk>")


class TextResult(BaseModel):
    tokens: int = Field(description="tokens scored (the pipeline's <eos> included)")
    oov: int = Field(description="of those, out of the vocabulary")
    log_likelihood: float | None = Field(description="natural log, summed over the tokens")
    perplexity: float | None = Field(description="exp(-log_likelihood / tokens); null for none")
    per_token: list[TokenScore] | None = Field(None, description="only when per_token is true")


class ScoreResponse(BaseModel):
    bundle: str
    results: list[TextResult]


class ErrorDetail(BaseModel):
    code: str = Field(description="e.g. too_many_texts, overloaded, timeout, invalid_json")
    message: str
    limit: str | None = Field(None, description="the limit exceeded (its flag, with _ for -)")
    max: float | None = Field(None, description="that limit's value")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ServiceError(Exception):
    """An answer other than 200: status, code, one-line message, and the limit it concerns."""

    def __init__(self, status: int, code: str, message: str, *, limit: str | None = None,
                 max: float | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.max, self.retry_after = limit, max, retry_after

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            error.update(limit=self.limit, max=self.max)
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


# --- the service --------------------------------------------------------------------------------

@dataclass
class _Encoded:
    ids: np.ndarray
    oov: int
    tokens: list[str] | None  # kept only for per_token answers


class Service:
    """The model, its thread, the batcher and the metrics behind one app."""

    def __init__(self, settings: Settings, on_fatal: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.scorer: Scorer | None = None
        self.load_error: str | None = None
        self.in_progress = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.batcher = Batcher(self._run_batch, self.executor, max_batch=settings.max_batch,
                               max_wait=settings.max_wait_ms / 1000,
                               queue_size=settings.queue_size, on_batch=self._on_batch)
        self._load_task: asyncio.Task | None = None
        m = self.metrics = Registry()
        self.requests = m.counter("keraslm_requests", "HTTP requests answered, by path and status",
                                  ("path", "status"))
        self.errors = m.counter("keraslm_request_errors", "error answers, by error code",
                                ("code",))
        self.latency = m.histogram("keraslm_request_duration_seconds",
                                   "time from a request's arrival to its answer, by path",
                                   LATENCY_BUCKETS, ("path",))
        self.texts = m.counter("keraslm_texts_scored", "texts scored")
        self.tokens = m.counter("keraslm_tokens_scored", "tokens scored")
        self.batch_texts = m.histogram("keraslm_batch_size_texts",
                                       "texts per onnxruntime batch", BATCH_BUCKETS)
        self.batch_requests = m.histogram("keraslm_batch_size_requests",
                                          "requests gathered into one batch", BATCH_BUCKETS)
        self.batch_seconds = m.histogram("keraslm_batch_duration_seconds",
                                         "time to score one gathered batch", LATENCY_BUCKETS)
        m.gauge("keraslm_queue_depth", "requests waiting for a batch", lambda: self.batcher.depth)
        m.gauge("keraslm_batch_running_requests", "requests in the batch being scored",
                lambda: self.batcher.running)
        m.gauge("keraslm_requests_in_progress", "score requests being handled",
                lambda: self.in_progress)
        m.gauge("keraslm_ready", "1 once the model is loaded", lambda: self.scorer is not None)

    @property
    def bundle_name(self) -> str:
        return self.settings.bundle.name

    # --- life cycle ---

    async def start(self) -> None:
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="load")

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._load_task is not None:
            await asyncio.wait([self._load_task])
        self.executor.shutdown(wait=True)

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.scorer = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._open)
        except Exception as err:  # a bundle problem, or anything onnxruntime raises
            self.load_error = str(err) if isinstance(err, UserError) else (
                f"cannot load {self.settings.bundle}: {type(err).__name__}: {err}")
            log.debug("loading failed", exc_info=True)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        log.info("keraslm: bundle %s ready on %s in %.1f s", self.settings.bundle,
                 self.scorer.provider, time.perf_counter() - started)

    def _open(self) -> Scorer:
        """Open the bundle on the model thread and run one batch (onnxruntime's first is slow)."""
        s = self.settings
        scorer = Scorer(s.bundle, device=s.device, threads=s.threads)
        ids = np.arange(scorer.bptt + 1, dtype=np.int32) % len(scorer.vocab)
        score_rows(scorer, [ids, ids[:1]], s.max_batch)
        return scorer

    # --- scoring ---

    def _run_batch(self, rows: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        return score_rows(self.scorer, rows, self.settings.max_batch)

    def _on_batch(self, requests: int, sizes: list[int], seconds: float) -> None:
        self.batch_requests.observe(requests)
        for size in sizes:
            self.batch_texts.observe(size)
        self.batch_seconds.observe(seconds)

    def check_ready(self) -> Scorer:
        if self.scorer is not None:
            return self.scorer
        if self.load_error is not None:
            raise ServiceError(503, "not_ready", f"the model failed to load: {self.load_error}")
        raise ServiceError(503, "loading", "the model is still loading; retry shortly",
                           retry_after=RETRY_AFTER)

    def encode(self, scorer: Scorer, texts: list[str], per_token: bool) -> list[_Encoded]:
        """Tokens and ids of each text (as Scorer.score tokenizes); 413 past the token limit."""
        limit = self.settings.max_tokens_per_text
        out = []
        for i, text in enumerate(texts):
            tokens = list(itertools.chain.from_iterable(scorer.pipeline.process(text)))
            if len(tokens) > limit:
                raise ServiceError(413, "too_many_tokens",
                                   f"texts[{i}] has {len(tokens)} tokens; the limit is {limit} "
                                   f"(max_tokens_per_text)", limit="max_tokens_per_text",
                                   max=limit)
            ids, oov = scorer.vocab.encode(tokens, return_oov=True)
            out.append(_Encoded(ids, oov, tokens if per_token else None))
        return out

    async def score(self, body: ScoreRequest, arrival: Any) -> dict:
        """The answer to one POST /v1/score (ServiceError for anything but 200)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        scorer = self.check_ready()
        if len(body.texts) > self.settings.max_texts:
            raise ServiceError(413, "too_many_texts",
                               f"{len(body.texts)} texts in one request; the limit is "
                               f"{self.settings.max_texts} (max_texts)", limit="max_texts",
                               max=self.settings.max_texts)
        for i, text in enumerate(body.texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ServiceError(422, "invalid_text", f"texts[{i}] is not valid Unicode (a "
                                   f"lone surrogate at character {err.start})") from None
        try:
            if sum(map(len, body.texts)) <= INLINE_CHARS:
                encoded = self.encode(scorer, body.texts, body.per_token)
            else:
                encoded = await asyncio.to_thread(self.encode, scorer, body.texts, body.per_token)
        except (UserError, TimeoutError) as err:  # e.g. no <unk> for an unknown word
            raise ServiceError(422, "unscorable_text", str(err)) from None
        rows = [e.ids for e in encoded if e.ids.size]
        logprobs: list[np.ndarray] = []
        if rows:
            if arrival is not None:
                arrival.close()
            try:
                job = self.batcher.submit(rows)
            except QueueFull:
                raise ServiceError(503, "overloaded",
                                   f"{self.settings.queue_size} requests are already waiting "
                                   f"(queue_size); retry shortly", limit="queue_size",
                                   max=self.settings.queue_size,
                                   retry_after=RETRY_AFTER) from None
            try:
                logprobs = await asyncio.wait_for(asyncio.shield(job.future),
                                                  max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                self.batcher.withdraw(job)
                raise ServiceError(504, "timeout", f"not scored within {self.settings.timeout:g}"
                                   f" s (timeout)", limit="timeout",
                                   max=self.settings.timeout) from None
            except UserError as err:
                raise ServiceError(500, "scoring_failed", str(err)) from None
        results, it = [], iter(logprobs)
        for e in encoded:
            lp = next(it) if e.ids.size else np.zeros(0, np.float32)
            result = _text_result(e, lp, scorer)
            results.append(result)
            self.tokens.inc(e.ids.size)
        self.texts.inc(len(encoded))
        return {"bundle": self.bundle_name, "results": results}


def _text_result(e: _Encoded, logprobs: np.ndarray, scorer: Scorer) -> dict:
    """One text's answer; the numbers are TextScore's, as score.py --per-line writes them."""
    score = TextScore(int(e.ids.size), int(e.oov), float(logprobs.sum(dtype=np.float64)))
    d = score.to_dict()
    result = {"tokens": d["num_tokens"], "oov": d["num_oov"],
              "log_likelihood": _finite(d["log_likelihood"]), "perplexity": d["perplexity"]}
    if e.tokens is not None:
        vocab = scorer.vocab
        result["per_token"] = [{"token": t, "logprob": _finite(float(x)), "oov": t not in vocab}
                               for t, x in zip(e.tokens, logprobs.tolist())]
    return result


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --- the HTTP edge: body limit and request metrics ----------------------------------------------

class _Edge:
    """The outermost ASGI layer: the body size limit, and requests counted by path and status."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.service
        path = scope["path"] if scope["path"] in PATHS else "other"
        started = time.perf_counter()
        status = 500
        arrival = None

        async def send_and_see(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path == SCORE_PATH:
                service.in_progress += 1
                arrival = scope["keraslm.arrival"] = service.batcher.arrival()
            if scope["method"] == "POST":
                receive = await self._read_body(scope, receive, send_and_see)
                if receive is None:
                    return
            await self.app(scope, receive, send_and_see)
        finally:
            if arrival is not None:
                arrival.close()
                service.in_progress -= 1
            service.requests.inc(path=path, status=status)
            service.latency.observe(time.perf_counter() - started, path=path)

    async def _read_body(self, scope: dict, receive: Callable, send: Callable
                         ) -> Callable | None:
        """The whole body, replayed to the app; None after answering 413 (or a disconnect)."""
        limit = self.service.settings.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = ServiceError(413, "body_too_large", f"the request body is over {limit} bytes "
                                 f"(max_body_bytes)", limit="max_body_bytes", max=limit)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._answer(too_large, scope, receive, send)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._answer(too_large, scope, receive, send)
                return None
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    async def _answer(self, err: ServiceError, scope: dict, receive: Callable,
                      send: Callable) -> None:
        self.service.errors.inc(code=err.code)
        await err.response()(scope, receive, send)


# --- the app ------------------------------------------------------------------------------------

def create_app(settings: Settings, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app over `settings.bundle`, loaded in the background once the app starts.

    `on_fatal` is called if the bundle cannot be loaded (main() uses it to stop the server).
    """
    service = Service(settings, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="keraslm scoring service", version="1",
                  summary="Log-likelihood and perplexity of texts under a keraslm LSTM bundle.",
                  lifespan=lifespan)
    app.state.service = service
    errors = {status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "invalid JSON"), (413, "over a limit: body, texts or tokens per text"),
        (415, "not sent as application/json"),
        (422, "wrong fields or types"), (503, "loading, or overloaded (see Retry-After)"),
        (504, "not scored within the timeout"))}

    @app.post(SCORE_PATH, response_model=ScoreResponse, responses=errors)
    async def score(body: ScoreRequest, request: Request) -> JSONResponse:
        """Score each text on its own: from a zero state with <eos> as context, like
        `Scorer.score` and `serve/score.py --per-line`. Log-likelihoods are natural logs."""
        answer = await service.score(body, request.scope.get("keraslm.arrival"))
        return JSONResponse(answer)

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is alive (the model may still be loading)."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        """200 once the model is loaded; 503 until then."""
        service.check_ready()
        return {"status": "ready", "bundle": service.bundle_name}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics, text exposition format."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, err: ServiceError) -> JSONResponse:
        service.errors.inc(code=err.code)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind != "application/json" and not kind.endswith("+json"):
            return await on_service_error(request, ServiceError(
                415, "unsupported_media_type",
                f"the body must be JSON sent as Content-Type: application/json, not "
                f"{kind or 'without a Content-Type'}"))
        if any(p.get("type") == "json_invalid" for p in problems):
            where = problems[0].get("ctx", {}).get("error", "")
            return await on_service_error(request, ServiceError(
                400, "invalid_json", f"the body is not valid JSON ({where})".replace(" ()", "")))
        first = problems[0] if problems else {}
        where = _location(first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "")
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        return await on_service_error(request, ServiceError(422, "invalid_request", message))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}
        response = await on_service_error(request, ServiceError(
            err.status_code, codes.get(err.status_code, "http_error"), str(err.detail)))
        response.headers.update(err.headers or {})
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        log.error("keraslm: unexpected error on %s", request.url.path, exc_info=err)
        return await on_service_error(request, ServiceError(
            500, "internal_error", f"the server failed ({type(err).__name__}); see its log"))

    app.add_middleware(_Edge, service=service)
    return app


def _location(loc: tuple | list) -> str:
    """('body', 'texts', 2) -> 'texts[2]'."""
    parts = [p for p in loc if p != "body"]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


# --- the command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    s = Settings(Path())
    p = argparse.ArgumentParser(prog="python -m serve.server",
                                description=__doc__.splitlines()[0].split(": `")[0])
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
                   help=f"texts per onnxruntime batch (default {s.max_batch})")
    p.add_argument("--max-wait-ms", type=float_at_least(0), default=s.max_wait_ms,
                   help="how long a batch may wait for requests already arriving "
                        f"(default {s.max_wait_ms:g})")
    p.add_argument("--queue-size", type=int_at_least(1), default=s.queue_size,
                   help=f"requests that may wait for a batch; more get 503 "
                        f"(default {s.queue_size})")
    p.add_argument("--max-texts", type=int_at_least(1), default=s.max_texts,
                   help=f"texts per request (default {s.max_texts})")
    p.add_argument("--max-tokens-per-text", type=int_at_least(1), default=s.max_tokens_per_text,
                   help=f"tokens per text, <eos> included (default {s.max_tokens_per_text})")
    p.add_argument("--max-body-bytes", type=int_at_least(1), default=s.max_body_bytes,
                   help=f"request body size (default {s.max_body_bytes})")
    p.add_argument("--timeout", type=float_at_least(1e-3), default=s.timeout,
                   help=f"seconds to answer a request before giving up with 504 "
                        f"(default {s.timeout:g})")
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
    settings = Settings(bundle=bundle, device=args.device, threads=args.threads,
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        queue_size=args.queue_size, max_texts=args.max_texts,
                        max_tokens_per_text=args.max_tokens_per_text,
                        max_body_bytes=args.max_body_bytes, timeout=args.timeout)
    server: uvicorn.Server | None = None

    def fatal() -> None:
        server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=math.ceil(args.timeout) + 5)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    log.info("keraslm: listening on http://%s:%d, loading %s", _url_host(host), port, bundle)
    with sock, _signals_stop_only():
        server.run(sockets=[sock])
    error = app.state.service.load_error
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


if __name__ == "__main__":
    sys.exit(main())
