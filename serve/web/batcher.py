"""Dynamic batching: the texts of concurrent requests scored together in one onnxruntime batch.

Requests put their token-id rows on the queue (`Batcher.submit`; admission control has already
bounded how many may wait). One asyncio task takes the oldest waiting request, adds the following
ones while the batch holds at most `max_batch` texts, and runs it on the single model thread, so
the event loop stays free to accept, parse and answer while onnxruntime works. Requests that
arrive while a batch runs form the next one. Waiting for more is worth it only when more are
coming: the task waits (at most `max_wait` seconds) only while `coming()` says other admitted
requests are still being read, parsed or tokenized, so a lone request never waits. A request
that gave up (withdrawn) or whose deadline has passed is never scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

Rows = list[np.ndarray]
RunBatch = Callable[[Rows, Callable[[], bool]], tuple[Rows, list[int]]]


@dataclass(eq=False)
class Job:
    """One request's rows waiting for (or in) a batch; `future` gets their log-probabilities.

    `deadline` is on the event loop's clock; `model_seconds` is the job's share of its batch's
    time, in proportion to its tokens (for admission control's estimate).
    """

    rows: Rows
    future: asyncio.Future
    deadline: float
    model_seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(row.size for row in self.rows)


class Batcher:
    """Gathers queued jobs into batches and runs them, one at a time, on `executor`.

    `run_batch(rows, stop)` returns (per-row log-probabilities, sizes of the onnxruntime batches
    run), and may end early once `stop()` is true: every request in the batch has given up.
    `on_batch(requests, sizes, seconds)` is told about every batch (for metrics).
    """

    def __init__(self, run_batch: RunBatch, executor: Executor, *, max_batch: int,
                 max_wait: float, coming: Callable[[], int] = lambda: 0,
                 on_batch: Callable[[int, list[int], float], None] | None = None) -> None:
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_wait, self.coming = max_batch, max_wait, coming
        self.on_batch = on_batch
        self.running = 0  # requests in the batch being scored
        self._queue: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def submit(self, rows: Rows, deadline: float) -> Job:
        """Queue `rows` for the next batches, to be scored before `deadline` or not at all."""
        job = Job(rows, asyncio.get_running_loop().create_future(), deadline)
        self._queue.append(job)
        self._arrived.set()
        return job

    def withdraw(self, job: Job) -> None:
        """Forget a job whose request gave up: out of the queue, its result never read."""
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        job.future.cancel()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop the task; jobs still queued (only after a forced shutdown) fail."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather(loop)
            if not batch:
                continue
            rows = [row for job in batch for row in job.rows]
            self.running = len(batch)
            started = time.perf_counter()
            try:
                results, sizes = await loop.run_in_executor(
                    self.executor, self.run_batch, rows, _all_gave_up(batch, loop))
            except Exception as err:  # noqa: BLE001 - handed to the waiting requests
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            finally:
                self.running = 0
            seconds = time.perf_counter() - started
            if self.on_batch is not None:
                self.on_batch(len(batch), sizes, seconds)
            total, at = max(sum(row.size for row in rows), 1), 0
            for job in batch:
                job.model_seconds = seconds * job.tokens / total
                if not job.future.done():
                    job.future.set_result(results[at:at + len(job.rows)])
                at += len(job.rows)

    def _next_live(self, loop: asyncio.AbstractEventLoop) -> Job | None:
        """Drop abandoned or expired jobs from the head of the queue; the first live one."""
        while self._queue:
            job = self._queue[0]
            if not job.future.done() and loop.time() < job.deadline:
                return job
            self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(asyncio.TimeoutError())
        return None

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """The oldest live job and those after it that fit in `max_batch` texts."""
        first = self._next_live(loop)
        if first is None:
            return []
        batch = [self._queue.popleft()]
        texts = len(first.rows)
        deadline = loop.time() + self.max_wait
        while texts < self.max_batch:
            job = self._next_live(loop)
            if job is not None:
                if texts + len(job.rows) > self.max_batch:
                    break
                batch.append(self._queue.popleft())
                texts += len(job.rows)
                continue
            remaining = deadline - loop.time()
            if self.coming() <= 0 or remaining <= 0:
                break  # nobody else is on the way, or we waited long enough
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch


def _all_gave_up(batch: list[Job], loop: asyncio.AbstractEventLoop) -> Callable[[], bool]:
    """True once no request in `batch` still waits for it (asked from the model thread: it only
    reads a flag and the monotonic clock)."""
    return lambda: all(job.future.done() or loop.time() >= job.deadline for job in batch)
