"""Connections: at most `max_connections` open, `header_timeout` to send a request's headers,
and at most `max_header_bytes` of them.

uvicorn's HTTP/1.1 protocols wait forever for a client that sends its request a byte at a time,
accept every connection, and (with httptools) buffer request heads of any size. The subclass made
here (of the httptools protocol, uvicorn's C-parser one, when httptools is installed, else of the
pure-Python h11 one):
- refuses a connection over the cap at once (a JSON 503, then closed);
- with TLS, does the handshake itself (the event loop's `start_tls`), within `header_timeout` and
  counted in the cap while it runs (uvicorn's own TLS gives a handshake 60 s, uncounted);
- closes a connection that has not sent a whole request head within `header_timeout` of
  connecting (or of its handshake) or of its previous answer;
- answers a head (request line and headers) over `max_header_bytes` with a JSON 431 before the
  parser sees more of it, then closes;
- closes a connection that pipelines more than `MAX_PIPELINED` requests behind the one being
  answered (httptools would parse and queue them all).
The body is bounded by the request's own deadline (serve/web/edge.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.web.schemas import RETRY_AFTER, ServiceError
from serve.web.settings import Settings

HTTP_IMPLEMENTATIONS = ("auto", "httptools", "h11")
LINGER = 1.0  # seconds a refused connection's input is read and dropped before it is closed
MAX_PIPELINED = 16  # requests queued behind the one being answered; more: the connection closes


def http_protocol(name: str = "auto") -> type:
    """uvicorn's protocol class for `name`; "auto" is httptools when installed, else h11."""
    if name == "auto":
        name = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if name == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    if name == "h11":
        return H11Protocol
    raise ValueError(f"unknown HTTP implementation {name!r}")


def guarded_protocol(max_connections: int, header_timeout: float,
                     on_refused: Callable[[], None] = lambda: None,
                     on_shutdown: Callable[[], None] = lambda: None,
                     http: str = "auto", max_header_bytes: int = Settings.max_header_bytes,
                     tls: ssl.SSLContext | None = None) -> type:
    """A uvicorn protocol class enforcing the three limits, for `uvicorn.Config(http=...)`.

    `on_refused` counts refused connections; `on_shutdown` is called when the server starts
    to shut down (so requests still sending their body can be answered at once); `http` picks
    the parser (HTTP_IMPLEMENTATIONS). With `tls`, each connection first completes a TLS
    handshake with that context within `header_timeout` (counted in `max_connections` while
    it runs); give uvicorn no certificate of its own then."""
    refusal = ServiceError(503, "too_many_connections", f"{max_connections} connections are "
                           f"open (max_connections); retry shortly", limit="max_connections",
                           max=max_connections, retry_after=RETRY_AFTER).http_bytes()
    head_refusal = ServiceError(431, "headers_too_large", f"the request line and headers are over "
                                f"{max_header_bytes} bytes (max_header_bytes)",
                                limit="max_header_bytes", max=max_header_bytes).http_bytes()
    base = http_protocol(http)

    handshakes: set[GuardedProtocol] = set()  # TLS handshakes under way

    class GuardedProtocol(base):
        _refused = False  # over max_connections, or its handshake failed: never given to uvicorn
        _closing = False  # answered 431: what still arrives is dropped
        _head_bytes = 0  # of the request head being received
        _early: list[bytes] | None = None  # decrypted before the handshake's end was seen
        _idle_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) + len(handshakes) >= max_connections:
                self._refused = True
                if tls is None:  # a TLS client could not read a plain answer
                    transport.write(refusal)
                transport.close()
                on_refused()
                return
            if tls is None:
                self._begin(transport)
                return
            transport.pause_reading()  # nothing reaches the parser before the handshake
            self._early = []
            handshakes.add(self)
            self.loop.create_task(self._handshake(transport))

        async def _handshake(self, transport: asyncio.Transport) -> None:
            try:
                secure = await self.loop.start_tls(transport, self, tls, server_side=True,
                                                   ssl_handshake_timeout=header_timeout)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
                secure = None  # timed out, not TLS, or the client left
            finally:
                handshakes.discard(self)
            if secure is None:
                self._refused = True
                transport.abort()
                return
            self._begin(secure)

        def _begin(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._expect_request(after=None)
            early, self._early = self._early, None
            if early:
                self.data_received(b"".join(early))

        def connection_lost(self, exc: Exception | None) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if not self._refused:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused or self._closing:
                return
            if self._early is not None:  # the handshake is done, but not yet seen by _begin
                self._early.append(data)
                return
            while data and self._receiving_head():
                room = max_header_bytes - self._head_bytes
                if room <= 0:
                    self._answer_and_close(head_refusal)
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
                cycle = self.cycle
                super().data_received(piece)
                if self.transport.is_closing():
                    return
                if self.cycle is not cycle:  # the head is complete: a request has begun
                    self._head_bytes = 0
            if data:
                super().data_received(data)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if len(getattr(self, "pipeline", ())) > MAX_PIPELINED:  # httptools queues them all
                self.transport.close()

        def _answer_and_close(self, answer: bytes) -> None:
            """Send `answer`, then close after a moment of dropping what the client still sends
            (closing with unread bytes would reset the connection and could lose the answer)."""
            self._closing = True
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)

        def _receiving_head(self) -> bool:
            """No request is being received or answered: what arrives is the next one's head."""
            return self.cycle is None or self.cycle.response_complete

        def shutdown(self) -> None:
            on_shutdown()
            super().shutdown()

        def on_response_complete(self) -> None:
            finished = self.cycle  # super() may start a pipelined request's cycle at once
            super().on_response_complete()
            self._expect_request(after=finished)

        def _expect_request(self, after: object) -> None:
            """Close the connection unless a request after `after` has begun within
            header_timeout (one timer a connection: each holds its request until it fires)."""
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = self.loop.call_later(header_timeout, self._close_if_idle, after)

        def _close_if_idle(self, cycle_then: object) -> None:
            idle = cycle_then is None or cycle_then.response_complete  # not still answering
            if self.cycle is cycle_then and idle and not self.transport.is_closing():
                self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol
