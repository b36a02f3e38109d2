"""Continuous batching: the texts of concurrent requests share every onnxruntime call.

Requests put their token-id rows on the queue (`Batcher.submit`; admission control has already
bounded how many may wait). One asyncio task drives a `serve.row_batch.RowBatch`: before every
call it fills the batch's free rows (up to `max_batch` texts) from the oldest queued requests,
then runs one call on the single model thread, so the event loop stays free to accept, parse and
answer while onnxruntime works. A text joins at the next call after it arrives and leaves as soon
as it is scored; a request is answered the moment its last text is, without waiting for its
batch-mates. From idle, the task waits (at most `max_wait` seconds) only while `coming()` says
other admitted requests are still being read, parsed or tokenized, so a lone request never
waits. A request that gave up (withdrawn) or whose deadline has passed is never scored: it is
dropped from the queue, and its texts leave the batch before the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from serve.row_batch import RowBatch

Rows = list[np.ndarray]


@dataclass(eq=False)
class Job:
    """One request's rows waiting for (or in) the batch; `future` gets their log-probabilities.

    `deadline` is on the event loop's clock; `model_seconds` is the job's share of the calls
    its rows were in (each call's time split evenly over its rows: a row costs the call's width
    whether it fills it or not), for admission control's estimate.
    """

    rows: Rows
    future: asyncio.Future
    deadline: float
    model_seconds: float = 0.0
    results: list[np.ndarray | None] = field(default_factory=list)
    queued: int = 0      # rows[:queued] have entered the batch
    unscored: int = 0    # rows not scored yet

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)
        self.unscored = len(self.rows)

    def gave_up(self, now: float) -> bool:
        return self.future.done() or now >= self.deadline


class Batcher:
    """Feeds queued jobs into a RowBatch and steps it, one call at a time, on `executor`.

    `use(batch)` gives it the batch once the model is loaded. `on_call(requests, texts,
    seconds)` is told about every call; `on_abandoned(texts)` about texts taken out of the
    batch unfinished because their request gave up (both for metrics).
    """

    def __init__(self, executor: Executor, *, max_batch: int, max_wait: float,
                 coming: Callable[[], int] = lambda: 0,
                 on_call: Callable[[int, int, float], None] | None = None,
                 on_abandoned: Callable[[int], None] | None = None) -> None:
        self.executor = executor
        self.max_batch, self.max_wait, self.coming = max_batch, max_wait, coming
        self.on_call, self.on_abandoned = on_call, on_abandoned
        self.batch: RowBatch | None = None
        self._queue: deque[Job] = deque()
        self._active: set[Job] = set()  # jobs with rows in the batch
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    def use(self, batch: RowBatch) -> None:
        """The RowBatch to score with (its `max_rows` bounds the texts of a call)."""
        self.batch = batch

    @property
    def depth(self) -> int:
        """Requests waiting for the batch (none of their texts in it yet)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests with texts in the batch."""
        return len(self._active)

    def submit(self, rows: Rows, deadline: float) -> Job:
        """Queue non-empty `rows`, to be scored before `deadline` or not at all."""
        job = Job(rows, asyncio.get_running_loop().create_future(), deadline)
        self._queue.append(job)
        self._arrived.set()
        return job

    def withdraw(self, job: Job) -> None:
        """Forget a job whose request gave up: out of the queue (its rows leave the batch before
        the next call), its result never read."""
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        job.future.cancel()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop the task; jobs still queued or in the batch (only after a forced shutdown) fail."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in [*self._queue, *self._active]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._queue.clear()
        self._active.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._active:
                while not self._queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._await_company(loop)
            self._drop_abandoned(loop.time())
            self._fill(loop.time())
            if not self._active:
                continue
            rows = len(self.batch.rows)
            share = Counter(row.key[0] for row in self.batch.rows)  # each job's rows in the call
            started = time.perf_counter()
            try:
                finished = await loop.run_in_executor(self.executor, self.batch.step)
            except Exception as err:  # noqa: BLE001 - handed to the requests in the batch
                self._fail_batch(err)
                continue
            seconds = time.perf_counter() - started
            if self.on_call is not None:
                self.on_call(len(share), rows, seconds)
            for job, count in share.items():
                job.model_seconds += seconds * count / rows
            for row in finished:
                job, index = row.key
                job.results[index] = row.logprobs
                job.unscored -= 1
                if not job.unscored:
                    self._active.discard(job)
                    if not job.future.done():
                        job.future.set_result(job.results)

    async def _await_company(self, loop: asyncio.AbstractEventLoop) -> None:
        """From idle: wait up to `max_wait` for requests still being read or tokenized, while
        the queued ones leave room in the batch."""
        deadline = loop.time() + self.max_wait
        while sum(len(job.rows) for job in self._queue) < self.max_batch and self.coming() > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _fill(self, now: float) -> None:
        """Free rows of the batch to the oldest live queued jobs, a job's rows in order (a job
        with more rows than are free enters over several calls)."""
        batch = self.batch
        while batch.free and self._queue:
            job = self._queue[0]
            if job.gave_up(now):
                self._queue.popleft()
                _expire(job)
                continue
            while batch.free and job.queued < len(job.rows):
                batch.add((job, job.queued), job.rows[job.queued])
                job.queued += 1
            self._active.add(job)
            if job.queued == len(job.rows):
                self._queue.popleft()

    def _drop_abandoned(self, now: float) -> None:
        """Take the rows of jobs that gave up out of the batch; they are never finished."""
        gone = {job for job in self._active if job.gave_up(now)}
        if not gone:
            return
        dropped = self.batch.drop({(job, i) for job in gone for i in range(len(job.rows))})
        for job in gone:
            self._active.discard(job)
            with contextlib.suppress(ValueError):
                self._queue.remove(job)  # entered only in part
            _expire(job)
        if self.on_abandoned is not None and dropped:
            self.on_abandoned(dropped)

    def _fail_batch(self, err: Exception) -> None:
        """A call failed: every request in the batch gets the error; the batch starts empty."""
        self.batch.drop({row.key for row in self.batch.rows})
        for job in self._active:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            if not job.future.done():
                job.future.set_exception(err)
        self._active.clear()


def _expire(job: Job) -> None:
    if not job.future.done():
        job.future.set_exception(asyncio.TimeoutError())
