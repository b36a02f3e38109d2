"""The outermost ASGI layer: access and admission before any work, every body read against a
deadline, and every request counted by path and status (and its time in the server given in a
`Server-Timing` header: `total;dur=<milliseconds>`).

The model's requests (POST /v1/score, /v1/generate) are refused at arrival if the service is
full, read by their deadline (`--timeout` from arrival; 408 after, 413 past `--max-body-bytes`),
then handed to the endpoint, which admits or refuses them on their real size once the checks
that cost nothing have passed (serve/web/service.py `RequestContext`). Any other request that announces a body, whatever
its path or method, is read under the same two limits before the app answers it, so no request
holds its connection past the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serve.web.access import announces_body
from serve.web.admission import Arrival
from serve.web.schemas import ServiceError
from serve.web.service import RequestContext, Service

SCORE_PATH = "/v1/score"
GENERATE_PATH = "/v1/generate"
ADMITTED_PATHS = (SCORE_PATH, GENERATE_PATH)  # the model's work: admission and a deadline
PATHS = (SCORE_PATH, GENERATE_PATH, "/", "/healthz", "/readyz", "/metrics", "/openapi.json",
         "/docs", "/redoc")
CONTEXT_KEY = "keraslm.request"  # the RequestContext of a model request, in its scope

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class Edge:
    """ASGI middleware over the FastAPI app (see the module doc)."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in PATHS else "other"
        started = time.perf_counter()
        status = 500

        async def send_and_see(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed = 1000 * (time.perf_counter() - started)
                message = {**message, "headers": [*message.get("headers", ()), (
                    b"server-timing", f"total;dur={elapsed:.1f}".encode())]}
            await send(message)

        try:
            refusal = self.service.access.check(scope)
            if refusal is not None:
                await self.answer(refusal, scope, receive, send_and_see)
            elif path in ADMITTED_PATHS and scope["method"] == "POST":
                await self._admitted(scope, receive, send_and_see)
            elif announces_body(scope["headers"]):  # a 404 or 405 to come: still, the body has a deadline
                deadline = asyncio.get_running_loop().time() + self.service.settings.timeout
                await self._read_then(scope, receive, send_and_see, deadline=deadline)
            else:
                await self.app(scope, receive, send_and_see)
        finally:
            m = self.service.metrics
            m.requests.labels(path=path, status=status).inc()
            m.latency.labels(path=path).observe(time.perf_counter() - started)

    async def _admitted(self, scope: dict, receive: Receive, send: Send) -> None:
        """Refuse at once if full, read the body by the deadline, admit it, then run the app."""
        service, settings = self.service, self.service.settings
        deadline = asyncio.get_running_loop().time() + settings.timeout
        try:
            service.check_ready()
            self._check_declared(scope)
            arrival = service.admission.arrive()
        except ServiceError as err:
            await self.answer(err, scope, receive, send)
            return
        try:
            await self._read_then(scope, receive, send, deadline=deadline, arrival=arrival)
        finally:
            arrival.close()
            if CONTEXT_KEY in scope:
                scope[CONTEXT_KEY].close()

    async def _read_then(self, scope: dict, receive: Receive, send: Send, *, deadline: float,
                         arrival: Arrival | None = None) -> None:
        """Read the whole body (413 past the limit, 408 past the deadline), then run the app with
        the body replayed and a watch for the client leaving; a model request's RequestContext
        (its `arrival`, for the endpoint to admit) goes in its scope."""
        try:
            self._check_declared(scope)
            body = await self._read_body(receive, deadline)
        except ServiceError as err:
            await self.answer(err, scope, receive, send)
            return
        if body is None:  # the client left
            return
        if arrival is not None:
            scope[CONTEXT_KEY] = RequestContext(deadline, arrival, len(body))
        context = scope.get(CONTEXT_KEY)
        watch = asyncio.ensure_future(_watch_disconnect(receive, context))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.shield(watch)
            return {"type": "http.disconnect"}

        try:
            await self.app(scope, replay, send)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    def _check_declared(self, scope: dict) -> None:
        """413 at once for a body announced over the limit."""
        declared, limit = _content_length(scope), self.service.settings.max_body_bytes
        if declared is not None and declared > limit:
            raise _too_large(limit)

    async def _read_body(self, receive: Receive, deadline: float) -> bytes | None:
        """The body; None if the client disconnected first."""
        settings, stopping = self.service.settings, self.service.stopping
        loop = asyncio.get_running_loop()
        chunks, size = [], 0
        while True:
            message = await _first_of(receive(), stopping.wait(), deadline - loop.time())
            if message is None:
                raise ServiceError(408, "body_timeout", f"the request body did not arrive "
                                   f"within {settings.timeout:g} s (timeout)", limit="timeout",
                                   max=settings.timeout, close=True)
            if message is True:  # the server is shutting down: no waiting for slow senders
                raise ServiceError(503, "shutting_down", "the server is shutting down",
                                   close=True)
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > settings.max_body_bytes:
                raise _too_large(settings.max_body_bytes)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def answer(self, err: ServiceError, scope: dict, receive: Receive, send: Send) -> None:
        """Send `err` as the JSON answer, counted by its code."""
        self.service.metrics.errors.labels(code=err.code).inc()
        await err.response()(scope, receive, send)


async def _first_of(message: Awaitable[dict], stopping: Awaitable[bool],
                    timeout: float) -> dict | bool | None:
    """The next message, True if `stopping` comes first, None at the timeout."""
    tasks = [asyncio.ensure_future(message), asyncio.ensure_future(stopping)]
    try:
        done, _ = await asyncio.wait(tasks, timeout=max(timeout, 0),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    if tasks[0] in done:
        return tasks[0].result()
    return True if done else None


async def _watch_disconnect(receive: Receive, context: RequestContext | None) -> None:
    """Wait for the client to leave (uvicorn also says so once the answer is sent)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if context is not None:
        context.disconnected.set()


def _content_length(scope: dict) -> int | None:
    value = dict(scope["headers"]).get(b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, "body_too_large", f"the request body is over {limit} bytes "
                        f"(max_body_bytes)", limit="max_body_bytes", max=limit, close=True)
