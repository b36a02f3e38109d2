"""Corpora: registry, data root, verified files, and downloads that leave nothing behind on failure.

Offline: downloads go to a real HTTP server on 127.0.0.1 or to a closed local port.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from keraslm.corpora import (
    CORPORA,
    Corpus,
    CorpusFile,
    DataError,
    corpus_file,
    data_root,
    get_corpus,
    resolve_split,
    sha1_of,
    split_by_lines,
)
from keraslm.errors import UserError

SHARED_ROOT = data_root(os.environ["KERASLM_DATA"])  # conftest.py sets it (default: ../shared/data)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden ones too) with file contents; None for folders."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Local test servers must be reached directly, whatever proxy the environment sets."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def dead_url() -> str:
    """A URL on a local port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/corpus.zip"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


TRAIN, VALID = b"a b c\n\nd e\n", b"f g\n"


def zipped_corpus(url: str, archive: bytes, train_sha1: str = sha1(TRAIN)) -> Corpus:
    """A registry entry like WikiText's: two files inside one zip archive."""
    return Corpus("tiny", "tiny", "tokens", {
        "train": CorpusFile("tiny.train.tokens", train_sha1, (url,), sha1(archive)),
        "valid": CorpusFile("tiny.valid.tokens", sha1(VALID), (url,), sha1(archive)),
    })


# --- registry and data root ------------------------------------------------------------------

def test_registry_lists_the_four_corpora_with_official_file_names():
    assert set(CORPORA) == {"wikitext-2", "wikitext-103", "sherlockholmes", "tinyshakespeare"}
    assert CORPORA["wikitext-2"].files["valid"].name == "wiki.valid.tokens"
    assert CORPORA["sherlockholmes"].files["test"].name == "sherlockholmes.test.txt"
    assert list(CORPORA["tinyshakespeare"].files) == ["train"]
    assert {c.format for c in CORPORA.values()} == {"tokens", "raw"}
    for corpus in CORPORA.values():
        for entry in corpus.files.values():
            assert len(entry.sha1) == 40 and entry.urls
            assert all(url.startswith("https://") for url in entry.urls)


def test_a_named_corpus_or_a_format_decides_the_pipeline_else_the_inherited_one_does():
    from keraslm.data import corpus_format
    from keraslm.text import RAW, RAW_TUTORIAL, WIKITEXT, TextPipeline, pipeline_for_format

    assert corpus_format("sherlockholmes") == "raw" and corpus_format("wikitext-2") == "tokens"
    assert corpus_format("sherlockholmes", "tokens") == "tokens"  # --format wins
    assert corpus_format("my.txt") is None and corpus_format(None) is None
    inherited = TextPipeline(skip_empty=True)  # the run continued, fine-tuned or evaluated

    def choose(corpus, fmt=None, moses_tutorial=False):
        return pipeline_for_format(corpus_format(corpus, fmt), moses_tutorial,
                                   inherited=inherited)

    assert choose("my.txt") is inherited
    assert choose("sherlockholmes") is RAW
    assert choose("sherlockholmes", moses_tutorial=True) is RAW_TUTORIAL
    assert choose("my.txt", "raw") is RAW
    assert choose("wikitext-2") is WIKITEXT
    assert pipeline_for_format(corpus_format("my.txt")) is WIKITEXT  # nothing to inherit


def test_unknown_corpus_error_lists_known_ones():
    with pytest.raises(UserError, match=r"unknown corpus .wikitext-3.*wikitext-2.*tinyshakespeare"):
        get_corpus("wikitext-3")


def test_unknown_split_error_lists_the_corpus_splits():
    with pytest.raises(UserError, match="no split 'valid'; its splits: train"):
        corpus_file("tinyshakespeare", "valid", root=SHARED_ROOT, download=False)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERASLM_DATA", raising=False)
    assert data_root() == tmp_path / "home" / ".keraslm" / "datasets"
    monkeypatch.setenv("KERASLM_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.chdir(tmp_path)
    assert data_root("relative") == tmp_path / "relative"


def test_corpora_module_does_not_import_tensorflow():
    code = "import sys, keraslm.corpora; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- real files in the shared data root --------------------------------------------------------

SHARED_FILES = [(name, split) for name, corpus in CORPORA.items() for split in corpus.files
                if (SHARED_ROOT / corpus.folder / corpus.files[split].name).is_file()]


@pytest.mark.skipif(not SHARED_FILES, reason=f"no corpus files under {SHARED_ROOT}")
@pytest.mark.parametrize(("name", "split"), SHARED_FILES)
def test_present_verified_file_is_returned_without_download_or_write(name, split, dead_url):
    corpus = CORPORA[name]
    before = {p: p.stat().st_mtime_ns for p in (SHARED_ROOT / corpus.folder).iterdir()}
    path = corpus_file(name, split, root=SHARED_ROOT, url=dead_url, timeout=1)
    assert path == SHARED_ROOT / corpus.folder / corpus.files[split].name
    assert sha1_of(path) == corpus.files[split].sha1
    assert {p: p.stat().st_mtime_ns for p in (SHARED_ROOT / corpus.folder).iterdir()} == before


def test_resolve_split_takes_a_corpus_name_or_an_existing_file(tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("my own corpus\n")
    assert resolve_split(str(own), "train") == own
    assert resolve_split(own, "valid") == own
    if ("wikitext-2", "test") in SHARED_FILES:
        assert resolve_split("wikitext-2", "test", SHARED_ROOT, download=False).name == (
            "wiki.test.tokens")


def test_resolve_split_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=rf"valid corpus .*neither an existing file \({missing} "
                                        r"not found\) nor a known corpus \(wikitext-2"):
        resolve_split(str(missing), "valid")


# --- failures leave the data root exactly as it was -------------------------------------------

def test_corrupt_file_with_no_network_errors_and_changes_nothing(tmp_path, dead_url):
    root = tmp_path / "data"
    bad = root / "wikitext-2" / "wiki.train.tokens"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not wikitext\n")
    before = listing(root)
    with pytest.raises(DataError) as error:
        corpus_file("wikitext-2", "train", root=root, url=dead_url, timeout=2)
    message = str(error.value)
    assert "\n" not in message
    for part in (str(bad), "corrupt", sha1(b"not wikitext\n"),
                 "863f29c46ef9d167fff4940ec821195882fe29d1", dead_url, "KERASLM_DATA"):
        assert part in message
    assert listing(root) == before


def test_corrupt_file_without_download_says_expected_and_actual_sha1(tmp_path):
    bad = tmp_path / "sherlockholmes" / "sherlockholmes.valid.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"x")
    before = listing(tmp_path)
    with pytest.raises(DataError, match=rf"{bad} is corrupt \(sha1 {sha1(b'x')}, expected 7113.*"
                                        r"delete it"):
        corpus_file("sherlockholmes", "valid", root=tmp_path, download=False)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("root_name", [".", "new/root"])
def test_missing_file_with_no_network_errors_and_leaves_nothing(tmp_path, dead_url, root_name):
    root = tmp_path / root_name
    before = listing(tmp_path)
    with pytest.raises(DataError) as error:
        corpus_file("tinyshakespeare", "train", root=root, url=dead_url, timeout=2)
    message = str(error.value)
    expected_path = root.absolute() / "tinyshakespeare" / "input.txt"
    for part in ("missing", str(expected_path), dead_url, "download failed", "offline",
                 "KERASLM_DATA", "--data-root"):
        assert part in message
    assert listing(tmp_path) == before


def test_missing_file_without_download_says_where_it_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"missing: .*wikitext-103/wiki.valid.tokens.*"
                                        r"wikitext-103-v1.zip"):
        corpus_file("wikitext-103", "valid", root=tmp_path, download=False)
    assert listing(tmp_path) == {}


def test_unwritable_data_root_is_a_clear_error(tmp_path, dead_url):
    (tmp_path / "file.txt").write_text("a regular file, not a folder")
    before = listing(tmp_path)
    root = tmp_path / "file.txt" / "data"
    with pytest.raises(DataError, match=rf"not writable: cannot create {root}/wikitext-2 "):
        corpus_file("wikitext-2", "valid", root=root, url=dead_url, timeout=2)
    assert listing(tmp_path) == before


# --- real downloads from a local server -------------------------------------------------------

def test_zip_download_is_verified_extracted_and_leaves_no_temp_files(tmp_path, server):
    served, base = server
    archive = make_zip({"tiny/tiny.train.tokens": TRAIN, "tiny/tiny.valid.tokens": VALID,
                        "tiny/README": b"other"})
    (served / "tiny-v1.zip").write_bytes(archive)
    corpus = zipped_corpus(base + "tiny-v1.zip", archive)
    root = tmp_path / "data"
    path = corpus_file(corpus, "train", root=root, timeout=5)
    assert path == root / "tiny" / "tiny.train.tokens"
    assert path.read_bytes() == TRAIN
    # The sibling split came from the same archive; the archive itself is gone.
    assert listing(root) == {"tiny": None, "tiny/tiny.train.tokens": TRAIN,
                             "tiny/tiny.valid.tokens": VALID}
    (served / "tiny-v1.zip").unlink()
    assert corpus_file(corpus, "valid", root=root, timeout=5).read_bytes() == VALID


def test_plain_file_download_falls_back_to_the_next_mirror(tmp_path, server, dead_url):
    served, base = server
    (served / "input.txt").write_bytes(TRAIN)
    corpus = Corpus("one", "one", "raw", {
        "train": CorpusFile("input.txt", sha1(TRAIN), (dead_url, base + "input.txt")),
    })
    root = tmp_path / "data"
    assert corpus_file(corpus, "train", root=root, timeout=5).read_bytes() == TRAIN
    assert listing(root) == {"one": None, "one/input.txt": TRAIN}


def test_corrupt_file_is_replaced_by_a_verified_download(tmp_path, server):
    served, base = server
    (served / "input.txt").write_bytes(TRAIN)
    corpus = Corpus("one", "one", "raw", {
        "train": CorpusFile("input.txt", sha1(TRAIN), (base + "input.txt",)),
    })
    root = tmp_path / "data"
    (root / "one").mkdir(parents=True)
    (root / "one" / "input.txt").write_bytes(b"truncated")
    corpus_file(corpus, "train", root=root, timeout=5)
    assert listing(root) == {"one": None, "one/input.txt": TRAIN}


def test_archive_with_wrong_sha1_errors_and_leaves_nothing(tmp_path, server):
    served, base = server
    archive = make_zip({"tiny/tiny.train.tokens": TRAIN, "tiny/tiny.valid.tokens": VALID})
    (served / "tiny-v1.zip").write_bytes(archive + b"tampered")
    corpus = zipped_corpus(base + "tiny-v1.zip", archive)
    with pytest.raises(DataError, match=rf"missing.*got sha1 {sha1(archive + b'tampered')}, "
                                        rf"expected {sha1(archive)}"):
        corpus_file(corpus, "train", root=tmp_path / "data", timeout=5)
    assert listing(tmp_path / "data") == {}


def test_archive_member_with_wrong_sha1_errors_and_leaves_nothing(tmp_path, server):
    served, base = server
    archive = make_zip({"tiny/tiny.train.tokens": TRAIN, "tiny/tiny.valid.tokens": VALID})
    (served / "tiny-v1.zip").write_bytes(archive)
    corpus = zipped_corpus(base + "tiny-v1.zip", archive, train_sha1="0" * 40)
    with pytest.raises(DataError, match=rf"member tiny/tiny.train.tokens has sha1 {sha1(TRAIN)}"):
        corpus_file(corpus, "train", root=tmp_path / "data", timeout=5)
    assert listing(tmp_path / "data") == {}


def test_http_404_is_reported_with_its_url(tmp_path, server):
    _, base = server
    corpus = Corpus("one", "one", "raw", {"train": CorpusFile("input.txt", "0" * 40, (base,))})
    with pytest.raises(DataError, match=rf"{base}input.txt: HTTP 404"):
        corpus_file(corpus, "train", root=tmp_path / "data", url=base + "input.txt", timeout=5)
    assert listing(tmp_path / "data") == {}


# --- single-file corpora split by lines -------------------------------------------------------

def test_split_by_lines_is_90_5_5_and_reassembles_the_text():
    text = "".join(f"line {i}\n" for i in range(40))
    parts = [split_by_lines(text, split) for split in ("train", "valid", "test")]
    assert [part.count("\n") for part in parts] == [36, 2, 2]
    assert "".join(parts) == text
    assert parts[1].startswith("line 36\n")


@pytest.mark.skipif(("tinyshakespeare", "train") not in SHARED_FILES, reason="no tinyshakespeare")
def test_tinyshakespeare_splits_have_fixed_line_counts():
    text = corpus_file("tinyshakespeare", "train", root=SHARED_ROOT, download=False).read_text()
    counts = [split_by_lines(text, s).count("\n") for s in ("train", "valid", "test")]
    assert counts == [36000, 2000, 2000]
