"""`--engine local`: score shards with a pool of worker processes on this machine.

Each worker (started with `spawn`, so nothing of the parent's state is shared) opens its own
Scorer once, with `cores // workers` onnxruntime threads so the workers together never ask for
more threads than there are cores. This process plans each shard's chunks (as it goes, so
scoring starts at once), keeps a few chunks per worker queued, and writes each shard as soon as
all its chunks are back, in chunk order (serve/dataset/output.py: atomically). A shard whose
output exists is skipped; one that cannot be read or written is reported and left for a rerun,
and the others go on. Ctrl-C (or SIGTERM) stops the workers; no output is left half-written.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TextIO

import pyarrow as pa

from keraslm.errors import UserError, first_line
from serve.dataset.output import prepare_outputs, write_shard
from serve.dataset.plan import Chunk, DatasetOptions, Shard, plan_chunks, shard_done
from serve.dataset.progress import Progress, Summary, report_skipped
from serve.dataset.scoring import open_scorer, score_chunk

QUEUED_PER_WORKER = 3  # chunks handed out ahead of the workers, each


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(shards: Sequence[Shard], bundle_path: str | os.PathLike, options: DatasetOptions,
        workers: int | None = None, *, stream: TextIO | None = None,
        progress: bool | None = None) -> Summary:
    """Score every shard whose output does not exist yet with `workers` processes (default: one
    per core) and write their outputs; the Summary says what was written, skipped and failed.

    Messages (skipped shards, failures) go to `stream` (default: standard error), and the
    progress line too when it is a terminal (or `progress` says so). KeyboardInterrupt stops
    the run cleanly and is re-raised.
    """
    started = time.perf_counter()
    stream = sys.stderr if stream is None else stream
    summary = Summary()
    done = [shard_done(s) for s in shards]
    skipped = [s for s, d in zip(shards, done) if d]
    todo = [s for s, d in zip(shards, done) if not d]
    summary.skipped = len(skipped)
    report_skipped(skipped, stream)
    if todo:
        workers = cores() if workers is None else workers
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        threads = max(1, cores() // workers)
        prepare_outputs(todo)
        open_scorer(bundle_path, options, threads=1)  # a bad bundle: one error, from here
        meter = Progress(sum(s.size for s in todo), stream, progress)
        try:
            with _pool(workers, bundle_path, options, threads) as pool:
                _Driver(pool, workers, options, summary, meter, stream).run(todo)
        finally:
            meter.close()
    summary.seconds = time.perf_counter() - started
    return summary


@contextlib.contextmanager
def _pool(workers: int, bundle_path: str | os.PathLike, options: DatasetOptions,
          threads: int) -> Iterator[ProcessPoolExecutor]:
    """The worker processes, stopped on the way out whatever happens (terminated, when it is an
    interruption). SIGTERM is turned into KeyboardInterrupt meanwhile, so that it stops the run
    the way Ctrl-C does."""
    # The cache's similarity matmul runs between onnxruntime calls: BLAS threads would fight
    # onnxruntime's (see serve/score.py). Set before the workers import numpy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                               (os.fspath(bundle_path), options, threads))
    try:
        with _sigterm_interrupts():
            yield pool
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Open:
    """A shard being scored: its chunks' tables as they come back."""

    shard: Shard
    tables: list[pa.Table | None]
    total_size: int  # of its chunks, for the progress line
    remaining: int


class _Driver:
    """Hands chunks to the pool, collects their tables and writes each shard once whole."""

    def __init__(self, pool: ProcessPoolExecutor, workers: int, options: DatasetOptions,
                 summary: Summary, meter: Progress, stream: TextIO) -> None:
        self.pool, self.options, self.summary = pool, options, summary
        self.meter, self.stream = meter, stream
        self.limit = workers * QUEUED_PER_WORKER
        self.pending: dict[Future, Chunk] = {}
        self.open: dict[Shard, _Open] = {}
        self.broken = False

    def run(self, shards: Sequence[Shard]) -> None:
        for shard in shards:
            try:
                chunks = plan_chunks(shard, self.options)
            except UserError as err:
                self._fail(shard, str(err))
                continue
            self.open[shard] = _Open(shard, [None] * len(chunks),
                                     sum(c.size for c in chunks), len(chunks))
            for chunk in chunks:
                while len(self.pending) >= self.limit and not self.broken:
                    self._collect()
                if self.broken:
                    return
                self.pending[self.pool.submit(_score, chunk)] = chunk
        while self.pending and not self.broken:
            self._collect()

    def _collect(self) -> None:
        """Take the chunks that are done; write each shard whose last chunk that was."""
        done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
        for future in done:
            chunk = self.pending.pop(future)
            try:
                _, table, error = future.result()
            except BrokenProcessPool:
                self.broken = True
                reason = ("a worker process died (killed, or out of memory?); the shards "
                          "written so far are kept: run again to score the rest")
                self.summary.failures.append(reason)
                self._say(reason)
                return
            self._take(chunk, table, error)

    def _take(self, chunk: Chunk, table: pa.Table | None, error: str | None) -> None:
        entry = self.open.get(chunk.shard)
        if entry is None:  # the shard failed already
            return
        if table is None:
            del self.open[chunk.shard]
            self._fail(chunk.shard, error or "no result")
            return
        entry.tables[chunk.index] = table
        entry.remaining -= 1
        self.meter.advance(table, chunk.shard.size * chunk.size / max(1, entry.total_size))
        if entry.remaining == 0:
            del self.open[chunk.shard]
            try:
                write_shard(entry.tables, chunk.shard, self.options)
            except UserError as err:
                self._fail(chunk.shard, str(err))
                return
            self.summary.add(entry.tables)

    def _fail(self, shard: Shard, reason: str) -> None:
        self.summary.fail(shard, reason)
        self._say(reason if shard.name in reason else f"{shard.name}: {reason}")

    def _say(self, message: str) -> None:
        self.meter.close()
        print(f"error: {message}", file=self.stream)


# ---- in the worker processes ---------------------------------------------------------------------

_worker: dict[str, object] = {}


def _start_worker(bundle_path: str, options: DatasetOptions, threads: int) -> None:
    """Open this worker's Scorer. Ctrl-C is the parent's to handle: the workers ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker["options"] = options
    try:
        _worker["scorer"] = open_scorer(bundle_path, options, threads)
    except Exception as err:  # noqa: BLE001 - every chunk then says why (the pool would
        _worker["error"] = f"cannot open the bundle: {first_line(err)}"  # restart us forever)


def _score(chunk: Chunk) -> tuple[Chunk, pa.Table | None, str | None]:
    """(chunk, its table, None), or (chunk, None, why) when the shard cannot be read."""
    if "error" in _worker:
        return chunk, None, str(_worker["error"])
    try:
        return chunk, score_chunk(_worker["scorer"], chunk, _worker["options"]), None
    except UserError as err:
        return chunk, None, str(err)
    except Exception as err:  # noqa: BLE001 - reported as the shard's failure, the rest go on
        return chunk, None, f"{type(err).__name__}: {first_line(err)}"
