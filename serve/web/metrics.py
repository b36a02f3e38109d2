"""The service's Prometheus metrics, in a registry of their own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the README documents; gauges read their value when scraped."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("keraslm_requests", "HTTP requests answered, by path and status",
                                ("path", "status"), registry=r)
        self.errors = Counter("keraslm_request_errors", "error answers, by error code",
                              ("code",), registry=r)
        self.latency = Histogram("keraslm_request_duration_seconds",
                                 "time from a request's arrival to its answer, by path", ("path",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.texts = Counter("keraslm_texts_scored", "texts scored", registry=r)
        self.tokens = Counter("keraslm_tokens_scored", "tokens scored", registry=r)
        self.batch_texts = Histogram("keraslm_batch_size_texts", "texts per onnxruntime call",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("keraslm_batch_size_requests",
                                        "requests with texts in one onnxruntime call",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("keraslm_batch_duration_seconds",
                                       "time of one onnxruntime call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.texts_abandoned = Counter(
            "keraslm_texts_abandoned", "texts taken out of the batch unfinished: their request "
            "gave up (deadline or client gone)", registry=r)
        self.connections_refused = Counter(
            "keraslm_connections_refused", "connections closed at once: over max_connections",
            registry=r)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is `read()` at every scrape."""
        Gauge(name, help, registry=self.registry).set_function(lambda: float(read()))

    def render(self) -> bytes:
        """The body of GET /metrics (text exposition format 0.0.4)."""
        return generate_latest(self.registry)
