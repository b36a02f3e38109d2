"""Prometheus metrics for the scoring service, written in the text exposition format (0.0.4).

Counters, gauges and histograms with labels, enough for one process, with no client library to
install: `Registry.render()` is the body of `GET /metrics`. Updates take a lock, so the model
thread and the event loop may both record.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Sample = tuple[str, dict[str, str], float]  # (name with suffix, labels, value)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)}, expected "
                             f"{sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _labels(self, key: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labelnames, key))

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError


class Counter(_Metric):
    """A count that only goes up; one series per label combination seen (none: one at 0)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[Sample]:
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield f"{self.name}_total", self._labels(key), value


class Gauge(_Metric):
    """A value read at scrape time from `read` (no labels): queue depth, readiness, ..."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self._read = read

    def samples(self) -> Iterator[Sample]:
        yield self.name, {}, float(self._read())


class Histogram(_Metric):
    """Observations counted into cumulative `le` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float],
                 labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {} if labelnames else {
            (): self._empty()}

    def _empty(self) -> list[float]:
        return [0.0] * (len(self.buckets) + 2)  # per bucket, then +Inf, then the sum

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, self._empty())
            i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            series[i] += 1
            series[-1] += value

    def samples(self) -> Iterator[Sample]:
        with self._lock:
            items = sorted((key, list(series)) for key, series in self._series.items())
        for key, series in items:
            labels, cumulative = self._labels(key), 0.0
            for bound, count in zip([*self.buckets, math.inf], series):
                cumulative += count
                yield f"{self.name}_bucket", {**labels, "le": _number(bound)}, cumulative
            yield f"{self.name}_sum", labels, series[-1]
            yield f"{self.name}_count", labels, cumulative


class Registry:
    """The metrics of one service, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        return self._add(Gauge(name, help, read))

    def histogram(self, name: str, help: str, buckets: Sequence[float],
                  labelnames: Sequence[str] = ()) -> Histogram:
        return self._add(Histogram(name, help, buckets, labelnames))

    def _add(self, metric):
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines = []
        for m in self._metrics:
            lines.append(f"# HELP {m.name} {_escape(m.help, quote=False)}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            for name, labels, value in m.samples():
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{text}}} {_number(value)}" if text
                             else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape(text: str, quote: bool = True) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))
