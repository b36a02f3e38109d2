"""What the command-line flags set: one frozen `Settings` per app."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """The service's limits; `create_app` takes one. Times are in seconds."""

    bundle: Path
    device: str = "auto"
    threads: int | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 128          # requests admitted and not yet in a running batch
    max_texts: int = 64
    max_tokens_per_text: int = 2000
    max_body_bytes: int = 1 << 20
    timeout: float = 30.0          # from arrival to answer: reading, tokenizing, waiting, scoring
    max_connections: int = 1024    # open connections; more are closed at once
    header_timeout: float = 10.0   # to send a request's headers once connected or kept alive
    max_header_bytes: int = 64 * 1024  # of a request's line and headers; more: 431, closed
    http: str = "auto"             # the HTTP/1.1 parser: httptools (C) when installed, else h11
    # who may use it (serve/web/access.py); the CLI narrows the hosts to loopback names when it
    # listens on loopback
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # Authorization: Bearer KEY
    open_metrics: bool = False     # /metrics answers without a key
    open_docs: bool = False        # /docs, /redoc and /openapi.json answer without a key
    allowed_hosts: tuple[str, ...] = ("*",)  # Host-header patterns (access.parse_allowed_hosts)
