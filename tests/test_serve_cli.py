"""`python serve/score.py`: as a script, as a module, its outputs, and one line for bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers_runs import edit_json

from serve import score as score_cli
from serve.scorer import Scorer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "serve" / "score.py"
TEXT = "the game began in 1998 .\n\n= Valkyria Chronicles =\nzyzzyva and flibbertigibbet\n" * 5


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def bundle(tiny_bundle) -> str:
    return str(tiny_bundle.bundle)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = score_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- how it runs ---------------------------------------------------------------------------------

def test_serving_never_imports_tensorflow(bundle, corpus):
    check = textwrap.dedent(f"""
        import sys
        import serve.bundle, serve.scorer, serve.score
        from serve.scorer import Scorer
        result = Scorer({bundle!r}).score_file({str(corpus)!r})
        assert result.num_tokens > 0
        assert serve.score.main([{str(corpus)!r}, "--model", {bundle!r}, "--json"]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras",
                                                                      "tf2onnx"))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_script_path_reads_stdin_with_the_newest_bundle(tiny_bundle, tmp_path):
    """`python serve/score.py -` from a folder whose bundles/ holds the bundle: no flags needed."""
    shutil.copytree(tiny_bundle.bundle, tmp_path / "bundles" / "tiny")
    result = subprocess.run([sys.executable, str(SCRIPT), "-"], input=TEXT, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":\t", 1) for line in result.stdout.splitlines())
    assert fields["Text"].startswith("<stdin> (one sample per line")
    assert fields["Bundle"].startswith("bundles/tiny")
    assert float(fields["Perplexity including <unk>"]) > 1


def test_module_run_prints_json_equal_to_the_library(bundle, corpus):
    result = subprocess.run([sys.executable, "-m", "serve.score", str(corpus), "--model", bundle,
                             "--json", "--batch-size", "3", "--bptt", "7", "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = Scorer(bundle, device="cpu").score_file(corpus, 3, 7)
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-12)
    assert report["num_tokens"] == expected.num_tokens and report["batch_size"] == 3
    assert report["num_oov"] == expected.num_oov > 0
    assert report["perplexity_excl_unk"] < report["perplexity"]


# ---- outputs ---------------------------------------------------------------------------------------

def test_summary_reads_like_kenlm_query(capsys, bundle, corpus):
    code, out, err = run_cli(capsys, corpus, "--model", bundle)
    assert code == 0 and err == ""
    fields = dict(line.split(":\t", 1) for line in out.splitlines())
    for key in ("Perplexity including <unk>", "Perplexity excluding <unk>", "OOVs", "Tokens",
                "Layout", "Speed"):
        assert key in fields
    assert fields["Layout"].startswith("20 streams x bptt 35")
    expected = Scorer(bundle).score_file(corpus)
    assert fields["OOVs"].startswith(f"{expected.num_oov} (")
    assert fields["Tokens"] == f"{expected.num_tokens} scored of {expected.num_stream_tokens}"
    assert fields["Perplexity including <unk>"] == f"{expected.perplexity:.2f}"


def test_per_line_scores_every_line_on_its_own(capsys, each_bundle, corpus, tmp_path):
    bundle = str(each_bundle.bundle)  # either softmax: the script never asks which
    out_path = tmp_path / "lines.jsonl"
    code, out, _ = run_cli(capsys, corpus, "--model", bundle, "--per-line", out_path, "--json")
    assert code == 0 and json.loads(out)["num_tokens"] > 0
    records = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    lines = TEXT.splitlines()
    assert [r["index"] for r in records] == list(range(len(lines)))
    expected = Scorer(bundle).score([line + "\n" for line in lines])  # "" alone has no sample
    for record, score in zip(records, expected):
        assert record["num_tokens"] == score.num_tokens and record["num_oov"] == score.num_oov
        assert record["log_likelihood"] == pytest.approx(score.log_likelihood, rel=1e-6)
        assert record["perplexity"] == pytest.approx(score.perplexity, rel=1e-6)
    assert records[1]["num_tokens"] == 1  # an empty line is its <eos>


def test_raw_format_scores_sentences(capsys, bundle, tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text("Mr. Holmes sat down. He was\nquiet. It rained!\n", encoding="utf-8")
    out_path = tmp_path / "sentences.jsonl"
    code, out, _ = run_cli(capsys, path, "--model", bundle, "--format", "raw", "--per-line",
                           out_path)
    assert code == 0 and "punkt sentences" in out
    assert len(out_path.read_text(encoding="utf-8").splitlines()) == 3


# ---- bad input: one line on stderr, exit status 1 -----------------------------------------------

def _corrupt_bundle(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"not a model")


def _mismatched_vocab(bundle: Path) -> None:
    edit_json(bundle / "vocab.json", lambda v: v["tokens"].pop())


BAD_INPUTS = {
    "missing file": ("missing.txt", None, None, "file not found: "),
    "directory": (".", None, None, "is a directory"),
    "empty file": ("empty.txt", b"", None, "no tokens to score"),
    "no tokens": ("blank.txt", b"   \n \n", "raw", "no tokens to score"),
    "invalid UTF-8": ("latin1.txt", "caf\u00e9 ok\nna\u00efve\n".encode("latin-1"), None,
                      "invalid UTF-8 at byte 3 (line 1)"),
    "binary file": ("data.bin", b"\x7fELF\x02\x01\x01\x00\x00\x00", None, "binary file"),
    "missing bundle": ("corpus.txt", TEXT.encode(), "no-such-bundle", "no such bundle"),
    "corrupt bundle": ("corpus.txt", TEXT.encode(), _corrupt_bundle,
                       "onnxruntime cannot load it"),
    "vocab does not match model": ("corpus.txt", TEXT.encode(), _mismatched_vocab,
                                   "vocabulary and model do not match"),
}


@pytest.mark.parametrize("name, content, variant, expected", BAD_INPUTS.values(),
                         ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_status_1(capsys, tiny_bundle, tmp_path, monkeypatch,
                                            name, content, variant, expected):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / name).write_bytes(content)
    model = Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundle"))
    extra = []
    if variant == "raw":
        extra = ["--format", "raw"]
    elif isinstance(variant, str):
        model = tmp_path / variant
    elif variant is not None:
        variant(model)
    code, out, err = run_cli(capsys, name, "--model", model, *extra)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err


def test_invalid_utf8_names_the_flag_that_goes_on(capsys, bundle, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("na\u00efve text\n".encode("latin-1"))
    code, _, err = run_cli(capsys, path, "--model", bundle)
    assert code == 1 and "pass --errors replace" in err
    code, out, _ = run_cli(capsys, path, "--model", bundle, "--errors", "replace")
    assert code == 0 and "Tokens:\t2 scored of 3" in out


def test_bad_flag_values_exit_2(capsys, bundle, corpus):
    with pytest.raises(SystemExit) as exit_:
        score_cli.main([str(corpus), "--model", bundle, "--batch-size", "0"])
    assert exit_.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_a_fifo_and_dev_stdin_are_read_once_and_score_like_the_file(bundle, corpus, tmp_path):
    want = json.loads(subprocess.run(
        [sys.executable, str(SCRIPT), str(corpus), "--model", bundle, "--json"],
        capture_output=True, text=True, timeout=120, check=True).stdout)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(corpus.read_bytes()))
    writer.start()
    got = subprocess.run([sys.executable, str(SCRIPT), str(fifo), "--model", bundle, "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    writer.join(timeout=10)
    assert got.returncode == 0, got.stderr
    via_stdin = subprocess.run(
        [sys.executable, str(SCRIPT), "/dev/stdin", "--model", bundle, "--json"],
        input=corpus.read_text(), capture_output=True, text=True, timeout=120, check=False)
    assert via_stdin.returncode == 0, via_stdin.stderr
    for out in (got.stdout, via_stdin.stdout):
        result = json.loads(out)
        assert result["nll_sum"] == want["nll_sum"]
        assert result["num_tokens"] == want["num_tokens"]


def test_input_that_is_not_text_is_refused_at_once(capsys, bundle):
    code, _, err = run_cli(capsys, "/dev/zero", "--model", bundle)
    assert code == 1
    assert err == "error: /dev/zero: binary file (NUL byte at byte 0, line 1); expected UTF-8 text\n"


def test_dev_zero_given_to_the_script_ends_in_seconds_with_one_line(bundle):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), "/dev/zero", "--model", bundle],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: /dev/zero: binary file (NUL byte at byte 0, line 1)")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 20  # the start-up of Python and onnxruntime included


def test_a_fifo_is_copied_only_up_to_its_first_nul_byte(capsys, bundle, tmp_path):
    """Text, then 64 MiB of NUL bytes: the copy stops at the first chunk holding one."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), fifo.open("wb") as f:
            f.write(b"the cat\nsat" + b"\0" * (64 << 20))

    writer = threading.Thread(target=write)
    writer.start()
    code, _, err = run_cli(capsys, fifo, "--model", bundle)
    writer.join(timeout=30)
    assert code == 1 and not writer.is_alive()
    assert err == (f"error: {fifo}: binary file (NUL byte at byte 11, line 2); expected UTF-8 "
                   f"text\n")


def test_per_line_output_onto_a_symlink_writes_its_target_and_keeps_the_link(
        capsys, bundle, corpus, tmp_path):
    target = tmp_path / "elsewhere" / "scores.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    code, _, err = run_cli(capsys, corpus, "--model", bundle, "--per-line", link)
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text().splitlines()[0])["index"] == 0


def test_a_bundle_whose_vocabulary_is_a_fifo_is_one_error_line(tiny_bundle, corpus, tmp_path):
    model = Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundle"))
    (model / "vocab.json").unlink()
    os.mkfifo(model / "vocab.json")
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), str(corpus)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: {model / 'vocab.json'}: is not a regular file (a FIFO)\n"


# ---- the cache is never tuned on the text it scores -----------------------------------------------

def _score(*argv: str, stdin) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], stdin=stdin, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("corpus_arg, valid_arg", [("-", "FILE"), ("FILE", "-")],
                         ids=["corpus on stdin", "tuning text on stdin"])
def test_tuning_on_the_corpus_through_standard_input_is_refused(bundle, corpus, corpus_arg,
                                                                valid_arg):
    """`score.py - --tune-cache valid.txt < valid.txt`: one file under two names."""
    given = {"-": "-", "FILE": str(corpus)}
    with corpus.open("rb") as stdin:
        result = _score(given[corpus_arg], "--model", bundle, "--cache-size", "9",
                        "--tune-cache", given[valid_arg], stdin=stdin)
    other = {"-": "<stdin>", "FILE": str(corpus)}[corpus_arg]
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: --tune-cache {given[valid_arg]} is the corpus being scored "
                             f"({other}): tune on validation text and report on other text\n")


def test_tuning_on_the_corpus_by_another_name_is_refused(capsys, bundle, corpus, tmp_path):
    link = tmp_path / "also-corpus.txt"
    os.link(corpus, link)
    code, out, err = run_cli(capsys, corpus, "--model", bundle, "--cache-size", "9",
                             "--tune-cache", link)
    assert code == 1 and out == ""
    assert err.startswith(f"error: --tune-cache {link} is the corpus being scored ({corpus})")


@pytest.mark.parametrize("corpus_arg, valid_arg", [("-", "FILE"), ("FILE", "-")],
                         ids=["corpus on stdin", "tuning text on stdin"])
def test_a_pipe_on_standard_input_is_never_the_same_file(bundle, corpus, tmp_path, corpus_arg,
                                                         valid_arg):
    """A pipe is read once: it cannot be the other input, so tuning and scoring both run."""
    other = tmp_path / "other.txt"
    other.write_text("".join(reversed(TEXT.splitlines(keepends=True))), encoding="utf-8")
    given = {"-": "-", "FILE": str(other)}
    reader, writer = os.pipe()
    with os.fdopen(reader, "rb") as stdin, os.fdopen(writer, "wb") as feed:
        feed.write(corpus.read_bytes())  # TEXT fits the pipe's buffer
        feed.close()
        result = _score(given[corpus_arg], "--model", bundle, "--cache-size", "9",
                        "--tune-cache", given[valid_arg], "--json", stdin=stdin)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_tokens"] > 0
    assert report["cache_tuning"]["tuned_on"] == {"-": "<stdin>", "FILE": str(other)}[valid_arg]
