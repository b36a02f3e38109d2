"""Per-document scores of a dataset (serve/dataset/): every input format gives `Scorer.score`'s
numbers, chunks and workers never change a row, reruns finish what a partial run left, hostile
documents are recorded and the rest scored, outputs appear whole, and the CLI says what went
wrong in one line. Real tiny bundles, real files, real worker processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_runs import WIKITEXT_VALID

from keraslm.errors import UserError
from serve.cache import CacheSettings
from serve.dataset import cli, local
from serve.dataset.output import combine, write_shard
from serve.dataset.plan import DatasetOptions, Shard, expand_inputs, plan_chunks, shard_done
from serve.dataset.scoring import score_chunk
from serve.scorer import Scorer

REPO = Path(__file__).resolve().parents[1]
SCORES = ("num_tokens", "num_oov", "log_likelihood", "perplexity")
LINES = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:150] + [
    "zyzzyva and flibbertigibbet are not in the vocabulary", "", "  the  "]


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle.bundle


@pytest.fixture(scope="module")
def scorer(bundle) -> Scorer:
    return Scorer(bundle, threads=1)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def shard_of(path: Path, out: Path, options: DatasetOptions) -> Shard:
    (shard,) = expand_inputs([str(path)], str(out), options)
    return shard


def score_here(scorer: Scorer, path: Path, out: Path, options: DatasetOptions,
               chunk_bytes: int | None = None) -> pa.Table:
    """Score one file in this process, as an engine does, and read its output back."""
    shard = shard_of(path, out, options)
    tables = [score_chunk(scorer, c, options) for c in plan_chunks(shard, options, chunk_bytes)]
    write_shard(tables, shard, options)
    return read_output(Path(shard.output))


def read_output(path: Path) -> pa.Table:
    """An output shard; JSON Lines as the table of its score columns, the rest as its rows."""
    if path.suffix == ".parquet":
        return pq.read_table(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    table = pa.Table.from_pylist([{k: r[k] for k in ("id", *SCORES, "error")} for r in rows])
    return table.replace_schema_metadata({"rows": json.dumps(rows)})


def assert_scores(table: pa.Table, expected: list) -> None:
    """The rows' numbers are the TextScores' (as `to_dict` writes them), row for row."""
    assert table.num_rows == len(expected)
    for name in SCORES:
        want = [e.to_dict()[name] for e in expected]
        got = table[name].to_pylist()
        assert [g is None for g in got] == [w is None for w in want], name
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], rel=1e-6), name


# ---- each input format ---------------------------------------------------------------------------

def test_jsonl_with_ids_gives_scorer_score_and_keeps_the_other_fields(scorer, tmp_path):
    rows = [{"id": f"doc-{i}", "text": t, "n": i, "tag": "x" * (i % 3), "meta": {"k": [i]},
             "mixed": i if i % 2 else str(i), "num_tokens": -1} for i, t in enumerate(LINES)]
    table = score_here(scorer, write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "out",
                       DatasetOptions(), chunk_bytes=2000)
    assert_scores(table, scorer.score(LINES))
    assert table["id"].to_pylist() == [f"doc-{i}" for i in range(len(LINES))]
    assert table["error"].null_count == table.num_rows
    assert table.column_names[:6] == ["id", *SCORES, "error"]
    # one type per field over the whole shard; objects and mixed types as their JSON text
    assert table.schema.field("n").type == pa.int64()
    assert table["n"].to_pylist() == list(range(len(LINES)))
    assert table["tag"].to_pylist() == [r["tag"] for r in rows]
    assert table["meta"].to_pylist() == [json.dumps(r["meta"]) for r in rows]
    assert table["mixed"].to_pylist() == [json.dumps(r["mixed"]) for r in rows]
    assert table["input.num_tokens"].to_pylist() == [-1] * len(rows)  # not the score's column
    assert "text" not in table.column_names


def test_jsonl_without_ids_is_named_by_file_and_line_and_drops_fields(scorer, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "the cat"}\n\n{"text": "sat on", "x": 1}\n   \n'
                    '{"text": "the mat", "id": null}', encoding="utf-8")  # no final newline
    table = score_here(scorer, path, tmp_path / "out", DatasetOptions(keep_fields=False))
    assert table["id"].to_pylist() == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert table.column_names == ["id", *SCORES, "error"]
    assert_scores(table, scorer.score(["the cat", "sat on", "the mat"]))


def test_named_text_and_id_fields(scorer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "the cat", "key": 7, "text": "no"},
                                              {"body": "sat", "key": "k2"}])
    table = score_here(scorer, path, tmp_path / "out",
                       DatasetOptions(text_field="body", id_field="key"))
    assert table["id"].to_pylist() == ["7", "k2"]
    assert table["text"].to_pylist() == ["no", None]  # another field, passed through
    assert_scores(table, scorer.score(["the cat", "sat"]))


def test_parquet_gives_scorer_score_by_row_ranges(scorer, tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": LINES, "id": list(range(len(LINES))),
                             "score": [i / 2 for i in range(len(LINES))]}),
                   path, row_group_size=40)
    table = score_here(scorer, path, tmp_path / "out", DatasetOptions(), chunk_bytes=1500)
    assert_scores(table, scorer.score(LINES))
    assert table["id"].to_pylist() == [str(i) for i in range(len(LINES))]
    assert table["score"].to_pylist() == [i / 2 for i in range(len(LINES))]
    pq.write_table(pa.table({"text": ["the cat", None]}), tmp_path / "q.parquet")
    table = score_here(scorer, tmp_path / "q.parquet", tmp_path / "out", DatasetOptions())
    assert table["id"].to_pylist() == [f"{tmp_path / 'q.parquet'}:0", f"{tmp_path / 'q.parquet'}:1"]
    assert table["error"].to_pylist() == [None, "'text' is null"]
    pq.write_table(pa.table({"text": pa.array(["sat", "the cat", "sat"]).dictionary_encode(),
                             "n": [1.5, 2.5, None]}), tmp_path / "r.parquet")  # a category
    table = score_here(scorer, tmp_path / "r.parquet", tmp_path / "out", DatasetOptions())
    assert_scores(table, scorer.score(["sat", "the cat", "sat"]))
    assert table["n"].to_pylist() == [1.5, 2.5, None]


def test_txt_is_one_document_per_line_blank_ones_too(scorer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    table = score_here(scorer, path, tmp_path / "out", DatasetOptions(), chunk_bytes=1000)
    assert_scores(table, scorer.score(LINES))
    assert table["id"].to_pylist() == [f"{path}:{i + 1}" for i in range(len(LINES))]


def test_jsonl_output_writes_the_fields_back_as_they_were(scorer, tmp_path):
    rows = [{"text": "the cat", "meta": {"a": [1, None]}, "n": 1},
            {"text": "sat", "meta": "plain", "n": 2.5}]
    options = DatasetOptions(out_format="jsonl")
    table = score_here(scorer, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", options)
    assert os.listdir(tmp_path / "out") == ["d.jsonl"]
    written = json.loads(table.schema.metadata[b"rows"])
    assert [r["meta"] for r in written] == [{"a": [1, None]}, "plain"]
    assert [r["n"] for r in written] == [1, 2.5]
    assert_scores(table, scorer.score(["the cat", "sat"]))


def test_cache_numbers_equal_the_scorer_with_the_cache(bundle, tmp_path):
    settings = CacheSettings(20, 0.5, 0.3)
    cached = Scorer(bundle, threads=1, cache=settings)
    path = tmp_path / "t.txt"
    path.write_text("\n".join(LINES[:60]) + "\n", encoding="utf-8")
    table = score_here(cached, path, tmp_path / "out", DatasetOptions(cache=settings))
    assert_scores(table, cached.score(LINES[:60]))
    assert table["cache"].to_pylist() == [settings.to_dict()] * 60
    plain = Scorer(bundle, threads=1).score(LINES[:60])
    assert [r.log_likelihood for r in cached.score(LINES[:60])] != \
        [r.log_likelihood for r in plain], "the cache changed nothing: the test proves nothing"


# ---- chunks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "txt"])
def test_a_shard_in_many_chunks_equals_one_chunk(scorer, tmp_path, suffix):
    path = tmp_path / f"s.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, [{"text": t, "i": i} for i, t in enumerate(LINES)])
    elif suffix == "parquet":
        pq.write_table(pa.table({"text": LINES}), path, row_group_size=25)
    else:
        path.write_text("\n".join(LINES), encoding="utf-8")
    options = DatasetOptions()
    shard = shard_of(path, tmp_path / "out", options)
    many, one = plan_chunks(shard, options, 700), plan_chunks(shard, options, 10 ** 9)
    assert len(many) > 5 and len(one) == 1
    assert [c.index for c in many] == list(range(len(many)))
    assert {c.count for c in many} == {len(many)}
    assert all(a.stop == b.start for a, b in itertools.pairwise(many))
    whole = combine([score_chunk(scorer, c, options) for c in one], options)
    cut = combine([score_chunk(scorer, c, options) for c in many], options)
    assert cut.drop_columns(["log_likelihood", "perplexity"]).equals(
        whole.drop_columns(["log_likelihood", "perplexity"]))
    for name in ("log_likelihood", "perplexity"):
        assert [v for v in cut[name].to_pylist() if v is not None] == pytest.approx(
            [v for v in whole[name].to_pylist() if v is not None], rel=1e-6)


def test_line_chunks_start_at_line_starts_with_their_line_numbers(tmp_path):
    path = tmp_path / "t.txt"
    data = "\n".join(LINES).encode("utf-8")
    path.write_bytes(data)
    chunks = plan_chunks(shard_of(path, tmp_path / "out", DatasetOptions()), None, 500)
    assert chunks[0].start == 0 and chunks[-1].stop == len(data)
    for c in chunks:
        assert c.start == 0 or data[c.start - 1:c.start] == b"\n"
        assert c.first_line == data.count(b"\n", 0, c.start) + 1


# ---- hostile shards ------------------------------------------------------------------------------

def test_hostile_documents_are_recorded_and_the_rest_scored(scorer, tmp_path):
    huge = json.dumps({"text": "the " * (1_100_000)})  # 4.4 MB: over the 4 MiB default
    lines = [b'{"text": "the cat"}', b'{"text": "bad \xff byte"}', huge.encode(),
             b'[1, 2]', b'{"body": "no text"}', b'{"text": 5}', b'{"text": "sat on', b'"str"',
             b'{"text": "the mat"}']
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    table = score_here(scorer, path, tmp_path / "out", DatasetOptions(), chunk_bytes=64)
    assert table["error"].to_pylist() == [
        None, "invalid UTF-8 at byte 14",
        f"document of {len(huge):,} bytes, over the limit of 4,194,304 (--max-document-bytes)",
        "not a JSON object (an array)", "no 'text' field", "'text' is a number, not a string",
        "not valid JSON (Unterminated string starting at: character 9)",
        "not a JSON object (a string)", None]
    assert table["id"].to_pylist() == [f"{path}:{i}" for i in range(1, 10)]
    good = [0, 8]
    assert_scores(table.take(good), scorer.score(["the cat", "the mat"]))
    bad = [i for i in range(9) if i not in good]
    assert table.take(bad)["num_tokens"].null_count == len(bad)
    assert table["body"].to_pylist()[4] == "no text"  # a document without text keeps its fields

    replaced = score_here(scorer, path, tmp_path / "out2", DatasetOptions(errors="replace"))
    assert replaced["error"][1].as_py() is None
    assert_scores(replaced.take([1]), scorer.score(["bad \ufffd byte"]))


def test_hostile_text_and_empty_files(scorer, tmp_path):
    path = tmp_path / "h.txt"
    path.write_bytes(b"the cat\n\xc3\x28 oops\r\n" + b"x" * 3000 + b"\nsat on\r\n")
    options = DatasetOptions(max_document_bytes=2000)
    table = score_here(scorer, path, tmp_path / "out", options, chunk_bytes=100)
    assert table["error"].to_pylist() == [
        None, "invalid UTF-8 at byte 0",
        "document of 3,000 bytes, over the limit of 2,000 (--max-document-bytes)", None]
    assert_scores(table.take([0, 3]), scorer.score(["the cat", "sat on"]))
    assert os.listdir(tmp_path / "out") == ["h.parquet"]  # no temporary file left
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "e.jsonl").write_bytes(b"")
    for name in ("e.txt", "e.jsonl", "e.parquet"):
        empty = score_here(scorer, tmp_path / name, tmp_path / name.replace(".", "-"),
                           DatasetOptions())
        assert empty.num_rows == 0
        assert empty.schema == pa.schema([("id", pa.string()), ("num_tokens", pa.int64()),
                                          ("num_oov", pa.int64()),
                                          ("log_likelihood", pa.float64()),
                                          ("perplexity", pa.float64()),
                                          ("error", pa.string())]), name


# ---- inputs and outputs --------------------------------------------------------------------------

def test_inputs_expand_to_sorted_unique_shards_with_stable_names(tmp_path):
    data = tmp_path / "data"
    for name in ("b/x.jsonl", "a/x.jsonl", "a/y.txt", "a/y.jsonl", "z.parquet", "a/.hidden.txt",
                 "notes.md", "out/old.parquet"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("", encoding="utf-8")
    out = data / "out"
    shards = expand_inputs([str(data)], str(out), DatasetOptions())
    assert [s.name for s in shards] == [str(data / n) for n in
                                        ("a/x.jsonl", "a/y.jsonl", "a/y.txt", "b/x.jsonl",
                                         "z.parquet")]
    assert [Path(s.output).name for s in shards] == [
        "a__x.jsonl.parquet", "y.jsonl.parquet", "y.txt.parquet", "b__x.jsonl.parquet",
        "z.parquet"]
    assert [s.format for s in shards] == ["jsonl", "jsonl", "txt", "jsonl", "parquet"]
    globbed = expand_inputs([str(data / "*" / "*.jsonl"), str(data / "a" / "x.jsonl")],
                            str(out), DatasetOptions(out_format="jsonl"))
    assert [Path(s.output).name for s in globbed] == [
        "a__x.jsonl.jsonl", "y.jsonl", "b__x.jsonl.jsonl"]  # each file once
    for bad, message in ((str(data / "nope"), "no such file or folder"),
                         (str(data / "notes.md"), "unknown input format"),
                         (str(data / "*.csv"), "matches no .jsonl, .parquet or .txt file"),
                         (str(out), "holds no .jsonl")):
        with pytest.raises(UserError, match=message) as err:
            expand_inputs([bad], str(out), DatasetOptions())
        assert bad in str(err.value)
    with pytest.raises(UserError, match="is a file"):
        expand_inputs([str(data)], str(data / "notes.md"), DatasetOptions())


def test_inputs_by_file_uri(tmp_path):
    write_jsonl(tmp_path / "u.jsonl", [{"text": "the cat"}])
    shards = expand_inputs([(tmp_path / "u.jsonl").as_uri(), tmp_path.as_uri()],
                           (tmp_path / "out").as_uri(), DatasetOptions())
    assert len(shards) == 1  # the file, and the folder that holds it: the file once
    assert shards[0].output == (tmp_path / "out" / "u.parquet").as_uri()


# ---- the local engine ----------------------------------------------------------------------------

def make_inputs(folder: Path) -> list[str]:
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": i, "text": t, "k": i} for i, t in enumerate(LINES)])
    pq.write_table(pa.table({"text": LINES[::-1]}), folder / "b.parquet", row_group_size=30)
    (folder / "c.txt").write_text("\n".join(LINES), encoding="utf-8")
    return [str(folder)]


def outputs(folder: Path) -> dict[str, pa.Table]:
    return {name: pq.read_table(folder / name) for name in sorted(os.listdir(folder))}


def test_one_worker_equals_two_and_a_rerun_finishes_a_partial_run(bundle, scorer, tmp_path,
                                                                   capfd):
    inputs = make_inputs(tmp_path / "in")
    options = DatasetOptions(chunk_bytes=1500)
    one = local.run(expand_inputs(inputs, str(tmp_path / "one"), options), bundle, options, 1)
    two = local.run(expand_inputs(inputs, str(tmp_path / "two"), options), bundle, options, 2)
    assert (one.written, two.written, one.failed, two.failed) == (3, 3, 0, 0)
    assert one.documents == two.documents == 3 * len(LINES)
    first = outputs(tmp_path / "one")
    assert list(first) == ["a.parquet", "b.parquet", "c.parquet"]  # no temporary files
    assert all(first[n].equals(t) for n, t in outputs(tmp_path / "two").items())
    assert_scores(first["b.parquet"], scorer.score(LINES[::-1]))

    # a run killed after writing a.parquet and b.parquet, with c.parquet unwritten
    (tmp_path / "two" / "c.parquet").unlink()
    kept = (tmp_path / "two" / "a.parquet").stat().st_mtime_ns
    capfd.readouterr()
    again = local.run(expand_inputs(inputs, str(tmp_path / "two"), options), bundle, options, 2)
    err = capfd.readouterr().err
    assert (again.written, again.skipped) == (1, 2)
    assert "skipping 2 shard(s) already written" in err and "a.parquet" in err
    assert (tmp_path / "two" / "a.parquet").stat().st_mtime_ns == kept
    assert outputs(tmp_path / "two")["c.parquet"].equals(first["c.parquet"])
    assert shard_done(expand_inputs(inputs, str(tmp_path / "two"), options)[2])


def test_ctrl_c_stops_with_whole_outputs_and_a_rerun_finishes(bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    text = "\n".join(WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:1500])
    for i in range(6):
        (folder / f"s{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "serve.dataset", str(folder), "--model", str(bundle), "--out",
            str(out), "--workers", "2", "--chunk-bytes", "20000"]
    run = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(out.glob("s*.parquet"))) and run.poll() is None:
        assert time.monotonic() < deadline, "no output within 120 s"
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    assert stderr.strip().endswith("interrupted: the shards written so far are whole; run again "
                                   "to score the rest")
    written = sorted(os.listdir(out))
    assert 1 <= len(written) < 6 and all(n.startswith("s") for n in written), written  # no temp
    assert all(pq.read_table(out / n).num_rows == 1500 for n in written)

    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"shards: {6 - len(written)} written, {len(written)} skipped")
    assert sorted(os.listdir(out)) == [f"s{i}.parquet" for i in range(6)]


# ---- the CLI -------------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_mistakes_are_one_line_and_status_1(capsys, bundle, tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "the cat"}])
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    cases = [
        ([tmp_path / "nope.jsonl", "--model", bundle], f"{tmp_path / 'nope.jsonl'}: no such"),
        ([tmp_path / "x.csv", "--model", bundle], f"{tmp_path / 'x.csv'}: unknown input format"),
        ([tmp_path / "ok.jsonl", "--model", tmp_path], "not a bundle folder"),
        ([tmp_path / "ok.jsonl", "--model", bundle, "--cache-theta", "1"], "needs --cache-size"),
        ([tmp_path / "ok.jsonl", "--model", bundle, "--cache-size", "x"], "--cache-size: expected"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "out")
        assert code == 1, argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert out == ""
    code, _, err = run_cli(capsys, tmp_path / "ok.jsonl", "--model", bundle, "--out",
                           tmp_path / "x.csv" / "out")
    assert code == 1 and err.startswith(f"error: cannot create the output folder {tmp_path}")
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, tmp_path / "ok.jsonl", "--model", bundle, "--out", tmp_path / "out",
                "--workers", "0")
    assert exit_.value.code == 2 and "--workers: expected an integer >= 1" in \
        capsys.readouterr().err


def test_cli_scores_reports_and_fails_only_the_broken_shard(bundle, tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in LINES[:20]])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "serve.dataset", str(tmp_path / "good.jsonl"),
            str(tmp_path / "broken.parquet"), "--model", str(bundle), "--out", str(out),
            "--workers", "1", "--out-format", "jsonl"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300,
                            check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'broken.parquet'}: not a readable Parquet file" in result.stderr
    assert result.stdout.startswith("shards: 1 written, 0 skipped (already written), 1 failed; "
                                    "documents: 20 (0 with an error)")
    assert sorted(os.listdir(out)) == ["good.jsonl"]
    (tmp_path / "broken.parquet").unlink()
    result = subprocess.run(argv[:4] + argv[5:], capture_output=True, text=True, cwd=REPO,
                            timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.startswith("shards: 0 written, 1 skipped")


def test_cli_without_pyarrow_says_how_to_install_it(bundle, tmp_path):
    check = ("import sys; sys.modules['pyarrow'] = None\n"
             "from serve.dataset.cli import main\n"
             f"sys.exit(main([{str(tmp_path)!r}, '--model', {str(bundle)!r}, '--out', 'o']))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=REPO, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr == ("error: scoring a dataset needs pyarrow: "
                             "pip install 'keraslm[dataset]'\n")
