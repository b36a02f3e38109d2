"""The Ray engine: a dataset's chunks scored by a pool of Ray actors, through Ray Data.

    python -m serve.dataset INPUT... --model BUNDLE --out DIR --engine ray [--ray-address ADDR]

The driver (this process) plans every pending shard's chunks, exactly as the local engine does
(reading a JSON Lines or text input once to find line starts, a Parquet file's footer), and
hands them to `Dataset.map_batches` over a fixed pool of actors (`workers` of them). Each
actor loads the bundle once, when it starts, from bytes it fetches from Ray's object store: the
driver puts the bundle folder's files there, so workers need no filesystem in common with it,
only keraslm installed. Each actor scores one chunk at a time with `score_chunk` and sends back
its table; the driver writes a shard with `write_shard` (atomically) once all of its chunks are
back, so an output is either whole or absent. Inputs and outputs are local paths or any URI
pyarrow knows (`s3://`, `gs://`, `hdfs://`...): the actors read their chunks, the driver writes.

Faults: an actor whose process dies is restarted by Ray (loading the bundle again) and the
chunks it held are sent again (`max_restarts`, `max_task_retries`); a chunk whose actor dies
more often than that fails the run, and the shards already written stay written, so a rerun
scores only the rest.

The cluster: `address` (else `RAY_ADDRESS`) connects to a running one and leaves it running
(`auto`: the one `ray start` last started on this machine); with neither, a new local cluster is
started for the run and shut down after it. A process that has already called `ray.init` is
used as it is. Each actor reserves as many CPUs as it gives onnxruntime threads, so actors x
threads never exceeds a node's CPUs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow as pa

from keraslm.errors import UserError, first_line
from serve.dataset.output import prepare_outputs, write_shard
from serve.dataset.plan import Chunk, DatasetOptions, Shard, plan_chunks, shard_done
from serve.dataset.progress import Progress, Summary, report_skipped
from serve.dataset.scoring import open_scorer, score_chunk

MAX_TASK_RETRIES = 3  # times a chunk is sent again after its actor died holding it
MAX_BUNDLE_BYTES = 2 << 30  # refuse to ship a bundle folder larger than this (not a bundle?)


# ---- the bundle, as bytes ------------------------------------------------------------------------

def pack_bundle(path: str | os.PathLike) -> dict[str, bytes]:
    """Every regular file under the bundle folder `path`, by its /-separated relative path."""
    root = Path(path)
    files: dict[str, bytes] = {}
    total = 0
    for file in sorted(root.rglob("*")):
        if file.is_file():
            total += file.stat().st_size
            if total > MAX_BUNDLE_BYTES:
                raise UserError(f"{root}: over {MAX_BUNDLE_BYTES >> 30} GB of files: not a "
                                f"bundle folder to send to Ray workers")
            files[file.relative_to(root).as_posix()] = file.read_bytes()
    return files


def unpack_bundle(files: dict[str, bytes], folder: str | os.PathLike) -> Path:
    """Write `pack_bundle`'s files under `folder` (which must exist); the folder."""
    root = Path(folder)
    for relative, data in files.items():
        target = root.joinpath(*relative.split("/"))
        if root.resolve() not in target.resolve().parents:
            raise UserError(f"bundle file {relative!r} leads outside the bundle folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


# ---- the actor -----------------------------------------------------------------------------------

class ChunkScorer:
    """A Ray Data callable class: one per actor. It loads the bundle once (from the object store,
    into a temporary folder removed as soon as the Scorer has read it) and then scores chunks.

    A batch holds pickled `Chunk`s (column `chunk`) with their shard's number (`shard`). The
    answer has, for each, the shard's number, the chunk's `index` and `size`, and either its
    table as Arrow IPC bytes (`table`) or why the shard cannot be scored (`error`, as the local
    engine reports it), so chunks of any columns travel together in one Ray Data block."""

    def __init__(self, bundle: list, options: DatasetOptions, threads: int) -> None:
        import ray

        self.options = options
        files = ray.get(bundle[0])
        folder = tempfile.mkdtemp(prefix="keraslm-bundle-")
        try:
            self.scorer = open_scorer(unpack_bundle(files, folder), options, threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        indices, sizes, tables, errors = [], [], [], []
        for spec in batch.column("chunk").to_pylist():
            chunk: Chunk = pickle.loads(spec)
            table, error = self._score(chunk)
            indices.append(chunk.index)
            sizes.append(chunk.size)
            tables.append(None if table is None else _ipc_bytes(table))
            errors.append(error)
        return pa.table({"shard": batch.column("shard"), "index": pa.array(indices, pa.int64()),
                         "size": pa.array(sizes, pa.int64()),
                         "table": pa.array(tables, pa.large_binary()),
                         "error": pa.array(errors, pa.string())})

    def _score(self, chunk: Chunk) -> tuple[pa.Table | None, str | None]:
        try:
            return score_chunk(self.scorer, chunk, self.options), None
        except UserError as err:
            return None, str(err)
        except Exception as err:  # noqa: BLE001 - reported as the shard's failure, the rest go on
            return None, f"{type(err).__name__}: {first_line(err)}"


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(data) as reader:
        return reader.read_all()


# ---- the cluster ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """The CPUs of the Ray cluster a run uses: in all, and on its smallest node."""

    cpus: int
    node_cpus: int


@contextlib.contextmanager
def connect(address: str | None) -> Iterator[Cluster]:
    """Ray, for the duration of the block: one already initialised in this process, else the
    cluster at `address` (else $RAY_ADDRESS), else a local cluster started here and shut down
    afterwards. A one-line UserError when the address cannot be reached."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    owner = not ray.is_initialized()
    if owner:
        try:  # "local": a new cluster, not the last one `ray start` left on this machine
            ray.init(address=address or "local", include_dashboard=False,
                     configure_logging=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot connect to the Ray cluster at {address}: "
                            f"{first_line(err)}") from None
    try:
        node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive")]
        cluster = Cluster(cpus=int(ray.cluster_resources().get("CPU", 0)),
                          node_cpus=min((c for c in node_cpus if c), default=0))
        if cluster.cpus < 1:
            raise UserError("the Ray cluster has no CPUs to run scoring actors on")
        yield cluster
    finally:
        if owner:
            ray.shutdown()  # stops the cluster this run started; only disconnects from others


def actor_layout(workers: int | None, cluster: Cluster, chunks: int) -> tuple[int, int]:
    """(actors, onnxruntime threads per actor): `workers` actors (default: one per CPU of the
    cluster; never more than its CPUs, nor than the `chunks` to score), each with the CPUs the
    cluster has per actor, no more than its smallest node's, so that every actor fits on a node
    and actors x threads <= CPUs."""
    actors = max(1, min(workers or cluster.cpus, cluster.cpus, chunks))
    threads = max(1, min(cluster.cpus // actors, cluster.node_cpus or 1))
    return actors, threads


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class RaySummary(Summary):
    """The run's Summary, and how it ran: actors and onnxruntime threads each, and the fixed
    cost in seconds (connecting to or starting the cluster, then until the first chunk is back:
    the actors started and the bundle loaded)."""

    actors: int = 0
    threads: int = 0
    startup_seconds: float = 0.0


def run(shards: Sequence[Shard], bundle_path: str | os.PathLike, options: DatasetOptions,
        workers: int | None = None, address: str | None = None, *,
        stream: TextIO | None = None, progress: bool | None = None) -> RaySummary:
    """Score every shard whose output does not exist yet on Ray with `workers` actors (default:
    one per CPU of the cluster) and write their outputs (see the module docstring).

    As serve.dataset.local.run: messages go to `stream` (default: standard error), the progress
    line too when it is a terminal (or `progress` says so); a shard that cannot be read or
    written is reported and left for a rerun, and the others go on."""
    started = time.perf_counter()
    stream = sys.stderr if stream is None else stream
    summary = RaySummary()
    done = [shard_done(s) for s in shards]
    todo = [s for s, d in zip(shards, done) if not d]
    summary.skipped = len(shards) - len(todo)
    report_skipped([s for s, d in zip(shards, done) if d], stream)
    if todo:
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        prepare_outputs(todo)
        open_scorer(bundle_path, options, threads=1)  # a bad bundle: one error, from here
        _Driver(summary, options, stream, progress).run(todo, pack_bundle(bundle_path),
                                                        workers, address)
    summary.seconds = time.perf_counter() - started
    return summary


class _Driver:
    """Plans the shards, runs their chunks through the actor pool and writes each shard once
    all its chunks are back, in chunk order."""

    def __init__(self, summary: RaySummary, options: DatasetOptions, stream: TextIO,
                 progress: bool | None) -> None:
        self.summary, self.options, self.stream, self.progress = summary, options, stream, progress
        self.shards: list[Shard] = []
        self.tables: dict[int, list[pa.Table | None]] = {}  # by shard number, till written
        self.left: dict[int, int] = {}  # chunks not back yet, by shard number
        self.planned: dict[int, int] = {}  # the sizes of its chunks, summed, by shard number
        self.meter: Progress | None = None

    def run(self, shards: Sequence[Shard], files: dict[str, bytes], workers: int | None,
            address: str | None) -> None:
        self.shards = list(shards)
        rows = []
        for i, shard in enumerate(self.shards):
            try:
                chunks = plan_chunks(shard, self.options)
            except UserError as err:
                self._fail(i, str(err))
                continue
            self.tables[i], self.left[i] = [None] * len(chunks), len(chunks)
            self.planned[i] = sum(chunk.size for chunk in chunks)
            rows += [{"shard": i, "chunk": pickle.dumps(chunk)} for chunk in chunks]
        if not rows:
            return
        self.meter = Progress(sum(self.shards[i].size for i in self.tables), self.stream,
                              self.progress)
        started = time.perf_counter()
        try:
            with connect(address) as cluster, _quiet_ray_data():
                self._score(rows, files, cluster, workers, started)
        finally:
            self.meter.close()

    def _score(self, rows: list[dict], files: dict[str, bytes], cluster: Cluster,
               workers: int | None, started: float) -> None:
        import ray

        actors, threads = actor_layout(workers, cluster, len(rows))
        if workers and actors < min(workers, len(rows)):
            self._say(f"the cluster has {cluster.cpus} CPU(s): {actors} actor(s), not {workers}",
                      "note")
        self.summary.actors, self.summary.threads = actors, threads
        bundle = ray.put(files)  # referenced until the run ends: a restarted actor fetches it
        try:
            for batch in _scored(rows, bundle, self.options, actors, threads):
                if not self.summary.startup_seconds:
                    self.summary.startup_seconds = time.perf_counter() - started
                for answer in batch.to_pylist():
                    self._take(answer)
        except ray.exceptions.RayError as err:
            reason = (f"the Ray run failed: {first_line(err)}; the shards written so far are "
                      f"kept: run again to score the rest")
            self.summary.failures.append(reason)
            self._say(reason)

    def _take(self, answer: dict) -> None:
        """One chunk's answer: keep its table; write its shard if it was the last."""
        i = answer["shard"]
        if i not in self.tables:  # the shard failed already
            return
        if answer["error"] is not None:
            self._fail(i, answer["error"])
            return
        table = self.tables[i][answer["index"]] = _from_ipc(answer["table"])
        self.left[i] -= 1
        shard = self.shards[i]  # progress in input bytes (a Parquet chunk's size is not)
        self.meter.advance(table, shard.size * answer["size"] / max(1, self.planned[i]))
        if self.left[i] == 0:
            tables = self.tables.pop(i)
            try:
                write_shard(tables, shard, self.options)
            except UserError as err:
                self._fail(i, str(err))
                return
            self.summary.add(tables)

    def _fail(self, i: int, reason: str) -> None:
        shard = self.shards[i]
        self.tables.pop(i, None)
        self.summary.fail(shard, reason)
        self._say(reason if shard.name in reason else f"{shard.name}: {reason}")

    def _say(self, message: str, kind: str = "error") -> None:
        if self.meter is not None:
            self.meter.close()
        print(f"{kind}: {message}", file=self.stream)


def _scored(rows: list[dict], bundle, options: DatasetOptions, actors: int, threads: int
            ) -> Iterator[pa.Table]:
    """The actors' answers (ChunkScorer), as they come: one chunk a call, each chunk its own
    block, at most one call queued per actor, so that chunks go to whichever actor is free."""
    import ray.data

    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    kwargs = {"batch_size": 1, "batch_format": "pyarrow", "num_cpus": threads,
              "compute": ray.data.ActorPoolStrategy(size=actors,
                                                    max_tasks_in_flight_per_actor=1),
              "fn_constructor_kwargs": {"bundle": [bundle], "options": options,
                                        "threads": threads}}
    retries = {"max_restarts": -1, "max_task_retries": MAX_TASK_RETRIES}
    if _takes_remote_args(dataset.map_batches):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            scored = dataset.map_batches(ChunkScorer, **kwargs, **retries)
    else:  # Ray Data's own defaults for actor pools retry too (without a bound)
        scored = dataset.map_batches(ChunkScorer, **kwargs)
    yield from scored.iter_batches(batch_size=None, batch_format="pyarrow")


def _takes_remote_args(method) -> bool:
    """Whether `map_batches` still takes Ray's remote arguments as keywords."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(method).parameters.values())


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data without its own progress bars and start/finish lines: the engine has its
    progress line and summary. The driver's settings are put back afterwards."""
    import ray.data

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = context.enable_progress_bars, logger.level
    context.enable_progress_bars = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars, level = saved
        logger.setLevel(level)
