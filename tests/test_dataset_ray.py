"""`--engine ray` (serve/dataset/ray_engine.py) on a real local Ray cluster of 2 CPUs, started
once for the module: the same rows as the local engine and as `Scorer.score` for every input
format, hostile shards (invalid UTF-8, a line over the cap, an empty file), a scoring actor
killed with SIGKILL in the middle of a chunk, a rerun after a partial run, the CLI joining a running cluster by address, and the bundle reaching the actors through
the object store alone.

Needs the `ray` extra; skipped without it, except under KERASLM_REQUIRE_RAY (set by .ci/run).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers_runs import REPO, WIKITEXT_VALID

if not os.environ.get("KERASLM_REQUIRE_RAY"):
    pytest.importorskip("ray.data", reason="--engine ray needs the ray extra")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from serve.dataset import local, ray_engine
from serve.dataset.plan import DatasetOptions, expand_inputs, plan_chunks

CHUNK_BYTES = 16_000  # several chunks a shard, so that chunks of one shard meet many actors
OPTIONS = DatasetOptions(chunk_bytes=CHUNK_BYTES)
NUMBERS = ("num_tokens", "num_oov", "log_likelihood", "perplexity")
BUSY_ACTOR = "ray::MapWorker(MapBatches(ChunkScorer)).submit"  # an actor in a call's title


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs in this process (the engine uses it as it is); its address."""
    import ray

    context = ray.init(address="local", num_cpus=2, object_store_memory=200 << 20,
                       include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One shard of each format, from WikiText-2 valid lines: JSON Lines with ids and a field
    to pass through, Parquet with a text column and another one, text with empty lines."""
    folder = tmp_path_factory.mktemp("ray-inputs")
    lines = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()
    with (folder / "docs.jsonl").open("w", encoding="utf-8") as f:
        for i, line in enumerate(lines[:400]):
            f.write(json.dumps({"id": f"doc-{i}", "text": line, "n": i}) + "\n")
    pq.write_table(pa.table({"text": lines[400:700], "row": list(range(300))}),
                   folder / "rows.parquet", row_group_size=60)
    (folder / "lines.txt").write_text("\n".join(lines[700:1100]) + "\n", encoding="utf-8")
    return folder


def shards_of(inputs: Path, out: Path):
    return expand_inputs([str(inputs)], str(out), OPTIONS)


@pytest.fixture(scope="module")
def reference(inputs, tiny_bundle, tmp_path_factory) -> dict[str, pa.Table]:
    """The local engine's outputs (2 workers), by output file name."""
    out = tmp_path_factory.mktemp("ray-reference")
    summary = local.run(shards_of(inputs, out), tiny_bundle.bundle, OPTIONS, workers=2,
                        stream=io.StringIO())
    assert summary.written == 3 and not summary.failures
    return read_outputs(out)


def read_outputs(out: Path) -> dict[str, pa.Table]:
    """Every file in `out`, by name (hidden ones too: a leftover temporary file must show)."""
    return {p.name: pq.read_table(p) for p in sorted(out.iterdir())}


def documents(inputs: Path) -> dict[str, list[tuple[str, str]]]:
    """(id, text) of every document of each input, by output file name, read here directly."""
    jsonl = [json.loads(line) for line in (inputs / "docs.jsonl").open(encoding="utf-8")]
    parquet = pq.read_table(inputs / "rows.parquet").column("text").to_pylist()
    text = (inputs / "lines.txt").read_text(encoding="utf-8").splitlines()
    return {"docs.parquet": [(d["id"], d["text"]) for d in jsonl],
            "rows.parquet": [(f"{inputs / 'rows.parquet'}:{i}", t) for i, t in enumerate(parquet)],
            "lines.parquet": [(f"{inputs / 'lines.txt'}:{i + 1}", t) for i, t in enumerate(text)]}


def test_ray_scores_every_format_as_the_local_engine_and_scorer_score(
        cluster, inputs, reference, tiny_bundle, tmp_path):
    from serve.scorer import Scorer

    shards = shards_of(inputs, tmp_path / "out")
    assert all(len(plan_chunks(s, OPTIONS)) > 2 for s in shards)  # chunks meet many actors
    summary = ray_engine.run(shards, tiny_bundle.bundle, OPTIONS, workers=2,
                             stream=io.StringIO())
    assert (summary.written, summary.skipped, summary.failures) == (3, 0, [])
    assert (summary.actors, summary.threads) == (2, 1)
    outputs = read_outputs(tmp_path / "out")
    assert outputs.keys() == reference.keys()
    for name, table in outputs.items():
        assert table.equals(reference[name]), name  # row for row, column for column
    assert summary.documents == sum(t.num_rows for t in outputs.values()) == 1100

    scorer = Scorer(tiny_bundle.bundle, threads=1)
    for name, docs in documents(inputs).items():
        rows = outputs[name].to_pylist()
        assert [r["id"] for r in rows] == [doc_id for doc_id, _ in docs]
        assert all(r["error"] is None for r in rows)
        for row, score in zip(rows, scorer.score([text for _, text in docs])):
            expected = score.to_dict()
            assert row["num_tokens"] == expected["num_tokens"]
            assert row["num_oov"] == expected["num_oov"]
            assert math.isclose(row["log_likelihood"], expected["log_likelihood"],
                                rel_tol=1e-6, abs_tol=1e-6)
    assert outputs["docs.parquet"].column("n").to_pylist() == list(range(400))
    assert outputs["rows.parquet"].column("row").to_pylist() == list(range(300))


def busy_actor_pid(deadline: float) -> int | None:
    """The pid of a scoring actor in the middle of a call (its process title says so)."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                if title.strip() == BUSY_ACTOR:
                    return int(entry.name)
        time.sleep(0.01)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor in /proc")
def test_an_actor_killed_mid_chunk_is_replaced_and_its_chunk_scored_again(
        cluster, inputs, reference, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    shards = shards_of(inputs, out)
    result = {}
    run = threading.Thread(target=lambda: result.update(summary=ray_engine.run(
        shards, tiny_bundle.bundle, OPTIONS, workers=2, stream=io.StringIO())))
    run.start()
    try:
        victim = busy_actor_pid(time.monotonic() + 120)
        assert victim is not None, f"no actor titled {BUSY_ACTOR!r} while the run went on"
        os.kill(victim, signal.SIGKILL)
        killed_mid_run = run.is_alive()
    finally:
        run.join(300)
    assert killed_mid_run and not run.is_alive()
    summary = result["summary"]
    assert (summary.written, summary.failures) == (3, [])
    outputs = read_outputs(out)  # every file: no temporary one left behind
    assert outputs.keys() == reference.keys()
    for name, table in outputs.items():
        assert table.equals(reference[name]), name


def test_a_rerun_after_a_partial_run_scores_only_the_missing_shards(
        cluster, inputs, reference, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    shards = shards_of(inputs, out)
    first = ray_engine.run(shards[:1], tiny_bundle.bundle, OPTIONS, workers=2,
                           stream=io.StringIO())
    assert (first.written, first.skipped) == (1, 0)
    written = Path(shards[0].output)
    before = written.stat().st_mtime_ns
    messages = io.StringIO()
    second = ray_engine.run(shards, tiny_bundle.bundle, OPTIONS, workers=2, stream=messages)
    assert (second.written, second.skipped, second.failures) == (2, 1, [])
    assert f"skipping 1 shard(s) already written: {written}" in messages.getvalue()
    assert written.stat().st_mtime_ns == before  # not written again
    outputs = read_outputs(out)
    assert outputs.keys() == reference.keys()
    for name, table in outputs.items():
        assert table.equals(reference[name]), name
    third = ray_engine.run(shards, tiny_bundle.bundle, OPTIONS, workers=2, stream=io.StringIO())
    assert (third.written, third.skipped) == (0, 3)


def test_hostile_shards_give_the_local_engines_rows(cluster, tiny_bundle, tmp_path):
    """Invalid UTF-8, a line over the size cap, lines that are not documents and an empty
    file: the Ray engine records the same errors and scores the same rest as the local one."""
    lines = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:60]
    hostile = [json.dumps({"text": line}).encode() for line in lines]
    hostile[3] = b'{"text": "bad \xff byte"}'
    hostile[10] = json.dumps({"text": "the " * 2_000}).encode()  # over the cap below
    hostile[20], hostile[30] = b"[1, 2]", b'{"body": "no text"}'
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "hostile.jsonl").write_bytes(b"\n".join(hostile) + b"\n")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "bad.txt").write_bytes(b"the cat\n\xc3\x28 oops\n" + b"x " * 3_000 + b"\n")
    options = DatasetOptions(chunk_bytes=500, max_document_bytes=4_000)

    local.run(expand_inputs([str(folder)], str(tmp_path / "local"), options), tiny_bundle.bundle,
              options, workers=2, stream=io.StringIO())
    summary = ray_engine.run(expand_inputs([str(folder)], str(tmp_path / "ray"), options),
                             tiny_bundle.bundle, options, workers=2, stream=io.StringIO())
    assert (summary.written, summary.failures) == (3, [])
    expected, outputs = read_outputs(tmp_path / "local"), read_outputs(tmp_path / "ray")
    assert outputs.keys() == expected.keys() == {"bad.parquet", "empty.parquet",
                                                 "hostile.parquet"}
    for name, table in outputs.items():
        assert table.equals(expected[name]), name
    assert outputs["empty.parquet"].num_rows == 0
    errors = outputs["hostile.parquet"].column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3, 10, 20, 30]
    assert outputs["bad.parquet"].column("error").to_pylist()[0] is None
    assert all(outputs["bad.parquet"].column("error").to_pylist()[1:])


def test_a_shard_that_cannot_be_read_is_reported_and_the_others_are_written(
        cluster, inputs, reference, tiny_bundle, tmp_path):
    folder = Path(shutil.copytree(inputs, tmp_path / "in"))
    (folder / "broken.parquet").write_bytes(b"not a Parquet file")
    out = tmp_path / "out"
    messages = io.StringIO()
    summary = ray_engine.run(expand_inputs([str(folder)], str(out), OPTIONS),
                             tiny_bundle.bundle, OPTIONS, workers=2, stream=messages)
    assert (summary.written, summary.failed) == (3, 1)
    assert f"error: {folder / 'broken.parquet'}: not a readable Parquet file" in \
        messages.getvalue()
    outputs = read_outputs(out)
    assert outputs.keys() == reference.keys()
    for name, table in outputs.items():
        assert table.select(NUMBERS).equals(reference[name].select(NUMBERS)), name


def test_the_cli_joins_a_running_cluster_by_address(cluster, inputs, reference, tiny_bundle,
                                                     tmp_path):
    """A second driver (the CLI, in its own process) scores on the module's cluster and leaves
    it running."""
    import ray

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "serve.dataset", str(inputs), "--model", str(tiny_bundle.bundle),
         "--out", str(out), "--engine", "ray", "--ray-address", cluster, "--workers", "2",
         "--chunk-bytes", str(CHUNK_BYTES)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shards: 3 written, 0 skipped" in done.stdout
    assert read_outputs(out).keys() == reference.keys()
    for name, table in read_outputs(out).items():
        assert table.equals(reference[name]), name
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2


def test_the_actors_get_the_bundle_from_the_object_store_not_its_path(
        cluster, inputs, reference, tiny_bundle, tmp_path):
    """A ChunkScorer built from the packed bytes of a bundle folder that no longer exists
    scores a chunk as the reference did."""
    import ray

    from serve.dataset.ray_engine import ChunkScorer, pack_bundle

    copy = Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundle"))
    files = ray.put(pack_bundle(copy))
    shutil.rmtree(copy)
    scorer = ChunkScorer([files], OPTIONS, threads=1)
    shard = next(s for s in shards_of(inputs, tmp_path / "out") if s.format == "jsonl")
    chunks = plan_chunks(shard, OPTIONS)
    answer = scorer(pa.table({"shard": [0], "chunk": [pickle.dumps(chunks[0])]}))
    assert answer.column("error").to_pylist() == [None]
    table = ray_engine._from_ipc(answer.column("table")[0].as_py())
    expected = reference["docs.parquet"].slice(0, table.num_rows)
    assert table.select(["id", *NUMBERS]).equals(expected.select(["id", *NUMBERS]))


def test_unpacking_refuses_a_file_outside_the_folder(tmp_path):
    from keraslm.errors import UserError

    with pytest.raises(UserError, match="outside the bundle folder"):
        ray_engine.unpack_bundle({"../evil.json": b"{}"}, tmp_path)
    assert not (tmp_path.parent / "evil.json").exists()


@pytest.mark.parametrize(("workers", "cpus", "node_cpus", "chunks", "layout"), [
    (None, 2, 2, 10, (2, 1)),   # default: one actor per CPU, one thread each
    (1, 2, 2, 10, (1, 2)),      # one actor gets both CPUs
    (4, 2, 2, 10, (2, 1)),      # no more actors than CPUs
    (2, 8, 4, 10, (2, 4)),      # two nodes of 4: an actor of 4 threads on each
    (2, 6, 2, 10, (2, 2)),      # never more threads than the smallest node has
    (None, 8, 4, 3, (3, 2)),    # never more actors than chunks
])
def test_actors_times_threads_never_exceed_the_cpus(workers, cpus, node_cpus, chunks, layout):
    cluster = ray_engine.Cluster(cpus=cpus, node_cpus=node_cpus)
    actors, threads = ray_engine.actor_layout(workers, cluster, chunks)
    assert (actors, threads) == layout
    assert actors * threads <= cpus and threads <= node_cpus
