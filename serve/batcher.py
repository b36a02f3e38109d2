"""Dynamic batching: the texts of concurrent requests scored together in one onnxruntime batch.

Requests put their token-id rows on a bounded queue (`Batcher.submit`, `QueueFull` when it is
full). One asyncio task takes the oldest waiting request, adds the following ones while the batch
holds at most `max_batch` texts, and runs it on the single model thread, so the event loop stays
free to accept, parse and answer while onnxruntime works. Requests that arrive while a batch runs
form the next one. Waiting for more is worth it only when more are coming: the task waits (at most
`max_wait` seconds) only while other requests have arrived and are still being read, parsed or
tokenized (`Batcher.arrival`), so a lone request never waits.

Each text is scored as `Scorer.score_tokens` scores it: from a zero state with `<eos>` as context,
padded at the end and masked, so its numbers do not depend on its batch-mates.
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

from serve.scorer import PAD_INPUT, PAD_TARGET, Scorer

Rows = list[np.ndarray]
RunBatch = Callable[[Rows], tuple[Rows, list[int]]]


class QueueFull(Exception):
    """The queue holds `queue_size` requests already: the caller should retry later."""


def score_rows(scorer: Scorer, rows: Rows, max_rows: int) -> tuple[Rows, list[int]]:
    """Per-token log-probabilities of every id row, each row scored on its own.

    Rows run longest first, at most `max_rows` to an onnxruntime batch, `scorer.bptt` steps per
    call with the state carried. Sorted by length, the rows still running are always a prefix of
    the batch, so a row that has ended leaves it instead of being carried as padding. Returns the
    float32 log-probabilities of each row (in input order) and the size of every batch run.
    """
    out: Rows = [np.zeros(0, np.float32)] * len(rows)
    order = sorted((i for i, r in enumerate(rows) if r.size), key=lambda i: -rows[i].size)
    sizes = []
    for start in range(0, len(order), max_rows):
        group = order[start:start + max_rows]
        lengths = np.array([rows[i].size for i in group])
        width = int(lengths[0])
        tokens = np.full((len(group), width), PAD_INPUT, np.int32)
        targets = np.full_like(tokens, PAD_TARGET)
        for r, i in enumerate(group):
            tokens[r, 0] = scorer.context_id
            tokens[r, 1:lengths[r]] = rows[i][:-1]
            targets[r, :lengths[r]] = rows[i]
        logprobs = np.zeros(tokens.shape, np.float32)
        state = scorer.zero_state(len(group))
        for t in range(0, width, scorer.bptt):
            live = int(np.count_nonzero(lengths > t))
            state = [s[:live] for s in state]
            chunk, state = scorer.step(tokens[:live, t:t + scorer.bptt],
                                       targets[:live, t:t + scorer.bptt], state)
            logprobs[:live, t:t + scorer.bptt] = chunk
        for r, i in enumerate(group):
            out[i] = logprobs[r, :lengths[r]]
        sizes.append(len(group))
    return out, sizes


@dataclass(eq=False)
class Job:
    """One request's rows waiting for (or in) a batch; `future` gets their log-probabilities."""

    rows: Rows
    future: asyncio.Future


class Arrival:
    """A request being read, parsed or tokenized: a batch being gathered may wait for it."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher: Batcher | None = batcher
        batcher._coming += 1

    def close(self) -> None:
        """It was queued, or answered without the model; closing twice is harmless."""
        if self._batcher is not None:
            self._batcher._coming -= 1
            self._batcher = None


class Batcher:
    """Gathers queued jobs into batches and runs them, one at a time, on `executor`.

    `run_batch(rows)` returns (per-row log-probabilities, sizes of the onnxruntime batches run);
    `on_batch(requests, sizes, seconds)` is told about every batch (for metrics).
    """

    def __init__(self, run_batch: RunBatch, executor: Executor, *, max_batch: int,
                 max_wait: float, queue_size: int,
                 on_batch: Callable[[int, list[int], float], None] | None = None) -> None:
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_wait, self.queue_size = max_batch, max_wait, queue_size
        self.on_batch = on_batch
        self.running = 0  # requests in the batch being scored
        self._coming = 0  # open arrivals: requests on their way to the queue
        self._queue: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def arrival(self) -> Arrival:
        """Count a request as on its way to the queue until `Arrival.close()`."""
        return Arrival(self)

    def submit(self, rows: Rows) -> Job:
        """Queue `rows` for the next batches; QueueFull if `queue_size` requests already wait."""
        if len(self._queue) >= self.queue_size:
            raise QueueFull
        job = Job(rows, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        return job

    def withdraw(self, job: Job) -> None:
        """Forget a job whose request gave up: out of the queue, its result never read."""
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())

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
            rows = [row for job in batch for row in job.rows]
            self.running = len(batch)
            started = time.perf_counter()
            try:
                results, sizes = await loop.run_in_executor(self.executor, self.run_batch, rows)
            except Exception as err:  # noqa: BLE001 - handed to the waiting requests
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            finally:
                self.running = 0
            if self.on_batch is not None:
                self.on_batch(len(batch), sizes, time.perf_counter() - started)
            at = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(results[at:at + len(job.rows)])
                at += len(job.rows)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """The oldest job and those after it that fit in `max_batch` texts (see the module doc)."""
        batch = [self._queue.popleft()]
        texts = len(batch[0].rows)
        deadline = loop.time() + self.max_wait
        while texts < self.max_batch:
            if self._queue:
                if texts + len(self._queue[0].rows) > self.max_batch:
                    break
                batch.append(self._queue.popleft())
                texts += len(batch[-1].rows)
                continue
            remaining = deadline - loop.time()
            if not self._coming or remaining <= 0:
                break  # nobody else is on the way, or we waited long enough
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch
