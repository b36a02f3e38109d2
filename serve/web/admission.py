"""Admission control: can a request be answered in time? Asked twice, before any work.

At arrival, before the body is read (`Admission.arrive`), a request is refused if the service is
already full; otherwise it costs nothing while its body arrives (connections and the body
deadline bound those), so an idle or slow sender holds no place that others need. Once the body
is in (`Arrival.admit`), the request is admitted while fewer than `queue_size` admitted requests
wait for the model (tokenized or queued; the batch being scored is not counted) and while the
work already admitted, with this request's, is expected to take less than `BUDGET` of the
timeout.

The expected time is the body bytes in flight times the service's seconds per byte, the larger
of two moving averages: the work each answered request cost (tokenizing plus its share of the
model's batches; first measured at load time on a calibration text), and the wall time between
answers while the service is busy, per byte answered (which sees what the work alone does not:
the event loop, refusals, other processes on the machine). Refused requests get 503 at once,
with a Retry-After of half the admitted work's expected time (1 s at least), so a flood costs
the service little, clients that honour it do not keep knocking, and what it admits is answered
within the timeout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from serve.web.schemas import RETRY_AFTER, ServiceError

BUDGET = 0.5     # of the timeout, for the expected time of the admitted work (the rest is the
                 # margin for a wrong estimate: a busy machine, texts slower than the average)
SMOOTHING = 0.2  # weight of the newest request in the seconds-per-byte average


class Arrival:
    """A request whose body is still arriving: counted (`Admission.receiving`), not charged."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission
        admission.receiving += 1

    def admit(self, size: int) -> Ticket:
        """The body is in: a Ticket for its `size` bytes, or ServiceError 503 (overloaded)."""
        admission = self._admission
        if admission is None:
            raise RuntimeError("this arrival was already admitted or closed")
        self.close()
        return admission.admit(size)

    def close(self) -> None:
        """No longer receiving (admitted, refused or abandoned); closing twice is harmless."""
        if self._admission is not None:
            self._admission.receiving -= 1
            self._admission = None


class Ticket:
    """One admitted request: its bytes count against the backlog until `close()`."""

    def __init__(self, admission: Admission, size: int) -> None:
        self._admission: Admission | None = admission
        self.size = size
        if admission.in_flight == 0:
            admission.busy_since = admission.clock()  # a busy period starts
        admission.in_flight += 1
        admission.backlog += size

    def close(self) -> None:
        """The request was answered (or abandoned); closing twice is harmless."""
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission.backlog -= self.size
            if self._admission.in_flight == 0:
                self._admission.busy_since = None
            self._admission = None


class Admission:
    """Counts the admitted requests and their bytes; `admit` refuses what would come too late.

    `running()` is the number of admitted requests in the batch being scored.
    """

    def __init__(self, queue_size: int, timeout: float, running: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue_size, self.timeout, self.running, self.clock = (
            queue_size, timeout, running, clock)
        self.receiving = 0  # requests whose body is still arriving (not admitted yet)
        self.in_flight = 0  # admitted requests, not yet answered
        self.backlog = 0  # body bytes of the requests in flight
        self.busy_since: float | None = None  # the last answer, or the start of a busy period
        self.work_seconds_per_byte: float | None = None
        self.wall_seconds_per_byte: float | None = None

    @property
    def seconds_per_byte(self) -> float | None:
        """The larger (the more cautious) of the two estimates known."""
        known = [x for x in (self.work_seconds_per_byte, self.wall_seconds_per_byte)
                 if x is not None]
        return max(known) if known else None

    @property
    def waiting(self) -> int:
        """Admitted requests not in the running batch."""
        return self.in_flight - self.running()

    def arrive(self) -> Arrival:
        """A request has arrived: ServiceError 503 at once if the service is already full (the
        queue, or the admitted work's expected time), else its Arrival."""
        self._check(0)
        return Arrival(self)

    def admit(self, size: int) -> Ticket:
        """A ticket for a request of `size` body bytes, or ServiceError 503 (overloaded)."""
        self._check(size)
        return Ticket(self, size)

    def _check(self, size: int) -> None:
        if self.waiting >= self.queue_size:
            raise ServiceError(503, "overloaded", f"{self.queue_size} requests are already "
                               f"waiting (queue_size); retry shortly", limit="queue_size",
                               max=self.queue_size, retry_after=self.retry_after())
        expected = self.expected_seconds(size)
        if self.in_flight and expected > BUDGET * self.timeout:
            raise ServiceError(503, "overloaded", f"the work already admitted would keep this "
                               f"request past the timeout ({expected:.1f} s expected, timeout "
                               f"{self.timeout:g} s); retry shortly", limit="timeout",
                               max=self.timeout, retry_after=self.retry_after())

    def retry_after(self) -> int:
        """Seconds a refused client should wait: until the admitted work is expected to be half
        done (at least 1, at most the timeout), so retries do not flood a busy service."""
        seconds = self.expected_seconds(0) / 2
        return max(RETRY_AFTER, min(math.ceil(seconds), math.ceil(self.timeout)))

    def expected_seconds(self, size: int) -> float:
        """How long the admitted work plus `size` more bytes is expected to take."""
        return (self.backlog + size) * (self.seconds_per_byte or 0.0)

    def record(self, size: int, seconds: float, began: float | None = None) -> None:
        """An answered request of `size` bytes took `seconds` of tokenizing and scoring, from
        `began` (on `clock`, once its body was read: a slow sender's upload is not service
        time) to now."""
        if size <= 0:
            return
        self.work_seconds_per_byte = _average(self.work_seconds_per_byte, seconds / size)
        now = self.clock()
        if self.busy_since is not None:  # busy since the last answer: the wall time it took
            start = self.busy_since if began is None else max(self.busy_since, began)
            self.wall_seconds_per_byte = _average(self.wall_seconds_per_byte,
                                                  (now - start) / size)
            self.busy_since = now


def _average(previous: float | None, sample: float) -> float:
    return sample if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * sample
