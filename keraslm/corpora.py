"""Named corpora: their files, SHA-1 sums and download URLs; the data root; download and verify.

A corpus file is trusted only once its SHA-1 matches the registry. Files live under the data root
(`--data-root` > `$KERASLM_DATA` > `~/.keraslm/datasets`), one folder per corpus, with the official
file names. A missing file is downloaded (and unzipped) under a temporary name beside its final
place, verified, then renamed into place: a failed download leaves nothing behind, and a file
that is already present and correct is only read, never written.

A corpus published as one file (Tiny Shakespeare) gets its train/valid/test splits carved out by
line ranges (`LINE_SPLITS`: first 90 % of the lines, next 5 %, last 5 %). The split files are
written to a cache folder (`$KERASLM_CACHE` > `$XDG_CACHE_HOME/keraslm` > `~/.cache/keraslm`),
never into the data root, which may be read-only; like the corpus files they are written
atomically and trusted only once their SHA-1 matches the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from keraslm.errors import UserError

DATA_ENV = "KERASLM_DATA"
DEFAULT_DATA_ROOT = "~/.keraslm/datasets"
CACHE_ENV = "KERASLM_CACHE"
_CHUNK = 1 << 20


class DataError(UserError):
    """A corpus file is missing, corrupt, or cannot be fetched or stored."""


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus: its name in the corpus folder, its SHA-1 and where to get it.

    `urls` are mirrors, tried in order. With `archive_sha1` set they point at a zip archive (of that
    SHA-1) whose member with the same base name as `name` is the file; otherwise at the file itself.
    """

    name: str
    sha1: str
    urls: tuple[str, ...]
    archive_sha1: str | None = None


@dataclass(frozen=True)
class Corpus:
    """A named corpus: its folder under the data root, its files per split, and its text format.

    `format` is "tokens" (one sample per line, whitespace tokens: WikiText) or "raw" (running text,
    split into sentences and tokenized by Moses: Sherlock Holmes, Tiny Shakespeare).

    `line_splits` is for a corpus published as one file, `files["train"]` (the whole text): the
    SHA-1 of each split `split_by_lines` carves out of it (see LINE_SPLITS). `resolve_split` then
    gives each split as its own cached file; `corpus_file(..., "train")` stays the whole text.
    """

    name: str
    folder: str
    format: Literal["tokens", "raw"]
    files: Mapping[str, CorpusFile]
    line_splits: Mapping[str, str] = field(default_factory=dict)


# WikiText (Merity et al. 2016), CC BY-SA. Archive and member SHA-1s as in GluonNLP
# (gluonnlp/data/language_model.py); d2l pairs the same archive SHA-1s with the Salesforce URL.
# Second URL: the copy GluonNLP downloads (MXNet's Gluon repo, namespace gluon/dataset/<name>).
# Neither URL could be checked live from here (no network); a download is verified either way.
_WIKITEXT_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/{}-v1.zip"
_GLUON_URL = ("https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/"
              "gluon/dataset/{0}/{0}-v1.zip")
_WT2_URLS = (_WIKITEXT_URL.format("wikitext-2"), _GLUON_URL.format("wikitext-2"))
_WT2_ZIP = "3c914d17d80b1459be871a5039ac23e752a53cbe"
_WT103_URLS = (_WIKITEXT_URL.format("wikitext-103"), _GLUON_URL.format("wikitext-103"))
_WT103_ZIP = "0aec09a7537b58d4bb65362fee27650eeaba625a"
# Sherlock Holmes and Tiny Shakespeare: the GluonNLP language-model tutorial's URLs and SHA-1s.
# Tiny Shakespeare's second URL is Karpathy's char-rnn original (same size; SHA-1 not checked).
_DMLC = "https://raw.githubusercontent.com/dmlc/web-data/master/mxnet/"
_CHAR_RNN = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"

CORPORA: dict[str, Corpus] = {
    "wikitext-2": Corpus("wikitext-2", "wikitext-2", "tokens", {
        "train": CorpusFile("wiki.train.tokens", "863f29c46ef9d167fff4940ec821195882fe29d1",
                            _WT2_URLS, _WT2_ZIP),
        "valid": CorpusFile("wiki.valid.tokens", "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
                            _WT2_URLS, _WT2_ZIP),
        "test": CorpusFile("wiki.test.tokens", "c7b8ce0aa086fb34dab808c5c49224211eb2b172",
                           _WT2_URLS, _WT2_ZIP),
    }),
    "wikitext-103": Corpus("wikitext-103", "wikitext-103", "tokens", {
        "train": CorpusFile("wiki.train.tokens", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
                            _WT103_URLS, _WT103_ZIP),
        "valid": CorpusFile("wiki.valid.tokens", "c326ac59dc587676d58c422eb8a03e119582f92b",
                            _WT103_URLS, _WT103_ZIP),
        "test": CorpusFile("wiki.test.tokens", "8a5befc548865cec54ed4273cf87dbbad60d1e47",
                           _WT103_URLS, _WT103_ZIP),
    }),
    "sherlockholmes": Corpus("sherlockholmes", "sherlockholmes", "raw", {
        split: CorpusFile(f"sherlockholmes.{split}.txt", sha1,
                          (f"{_DMLC}sherlockholmes/sherlockholmes.{split}.txt",))
        for split, sha1 in [("train", "d65a52baaf32df613d4942e0254c81cff37da5e8"),
                            ("valid", "71133db736a0ff6d5f024bb64b4a0672b31fc6b3"),
                            ("test", "b7ccc4778fd3296c515a3c21ed79e9c2ee249f70")]
    }),
    # One file of 40,000 lines; `split_by_lines` carves train/valid/test out of it (LINE_SPLITS:
    # lines 1-36,000 / 36,001-38,000 / 38,001-40,000), each split verified by its SHA-1 below.
    "tinyshakespeare": Corpus("tinyshakespeare", "tinyshakespeare", "raw", {
        "train": CorpusFile("input.txt", "04486597058d11dcc2c556b1d0433891eb639d2e",
                            (f"{_DMLC}tinyshakespeare/input.txt", f"{_CHAR_RNN}input.txt")),
    }, line_splits={"train": "4ce7b65ee2fe00125a2f9823acedcac4c8f8513a",
                    "valid": "f6cde1cba27ce0866346e55e77832b1a701027f4",
                    "test": "8c75839c2e6a8e78164486731f995f2e93554645"}),
}

# Line ranges, in percent of the lines, for single-file corpora: first 90% / next 5% / last 5%.
LINE_SPLITS: dict[str, tuple[int, int]] = {"train": (0, 90), "valid": (90, 95), "test": (95, 100)}


def data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `explicit` (from `--data-root`) > `$KERASLM_DATA` > `~/.keraslm/datasets`."""
    chosen = explicit or os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser().absolute()


def cache_root() -> Path:
    """Where derived files (split files) go: `$KERASLM_CACHE` > `$XDG_CACHE_HOME/keraslm` >
    `~/.cache/keraslm`."""
    chosen = os.environ.get(CACHE_ENV)
    if not chosen:
        xdg = os.environ.get("XDG_CACHE_HOME")
        chosen = os.path.join(xdg, "keraslm") if xdg else "~/.cache/keraslm"
    return Path(chosen).expanduser().absolute()


def sha1_of(path: str | os.PathLike[str]) -> str:
    """The hex SHA-1 of a file, read in chunks so large corpora need little memory."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def get_corpus(name: str) -> Corpus:
    """The registry entry for `name`; a UserError listing the known corpora if there is none."""
    try:
        return CORPORA[name]
    except KeyError:
        raise UserError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}") from None


def corpus_file(
    corpus: str | Corpus,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 30.0,
    url: str | None = None,
) -> Path:
    """The verified path of one split of a corpus, downloading it first if needed.

    A present file with the right SHA-1 is returned untouched. A missing or corrupt one is fetched
    (from `url` if given, else the registry's URLs) when `download` is true, and replaces the old
    one only once verified; otherwise, or if fetching fails, a DataError says what to do.
    """
    spec = get_corpus(corpus) if isinstance(corpus, str) else corpus
    if split not in spec.files:
        raise UserError(f"corpus {spec.name!r} has no split {split!r}; "
                        f"its splits: {', '.join(spec.files)}")
    entry = spec.files[split]
    path = data_root(root) / spec.folder / entry.name
    urls = (url,) if url else entry.urls
    if path.is_file():
        actual = sha1_of(path)
        if actual == entry.sha1:
            return path
        problem = (f"{spec.name} {split} file {path} is corrupt "
                   f"(sha1 {actual}, expected {entry.sha1})")
        if not download:
            raise DataError(f"{problem}; delete it and download it again, "
                            f"or {_offline_hint(spec, entry, path)}")
    elif path.exists():
        raise DataError(f"{spec.name} {split} file {path} is not a regular file; remove it")
    else:
        problem = f"{spec.name} {split} file is missing: {path}"
        if not download:
            raise DataError(f"{problem} (downloads are off); {_offline_hint(spec, entry, path)}")
    _fetch(spec, entry, path, urls, timeout, problem)
    return path


def resolve_split(
    spec: str | os.PathLike[str],
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 30.0,
) -> Path:
    """The file for `split` of `spec`: a registered corpus name, or the path of your own file.

    An existing file path is used as is (whatever `split` is); anything else must be a known corpus.
    A corpus published as one file gives each split as its own cached file (see `split_file`).
    """
    if isinstance(spec, str) and spec in CORPORA:
        if CORPORA[spec].line_splits:
            return split_file(spec, split, root, download=download, timeout=timeout)
        return corpus_file(spec, split, root, download=download, timeout=timeout)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise DataError(f"{split} corpus {path} is not a regular file")
    raise DataError(f"{split} corpus {str(spec)!r} is neither an existing file "
                    f"({path.absolute()} not found) nor a known corpus ({', '.join(CORPORA)})")


def split_file(
    corpus: str | Corpus,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 30.0,
) -> Path:
    """The verified file of `split` carved out of a single-file corpus, made once and cached.

    It lives at `<cache_root()>/<folder>/<SHA-1 of the source>/<split>.txt`, so a different source
    file never reuses another's splits. A cached file is used only if its SHA-1 matches the
    registry; otherwise the source is fetched and verified as by `corpus_file`, split, checked, and
    written atomically (temporary file, then rename). Nothing is written under the data root
    unless the source itself has to be downloaded.
    """
    spec = get_corpus(corpus) if isinstance(corpus, str) else corpus
    if split not in spec.line_splits:
        raise UserError(f"corpus {spec.name!r} has no split {split!r}; "
                        f"its splits: {', '.join(spec.line_splits) or 'none carved by lines'}")
    expected = spec.line_splits[split]
    source_entry = spec.files["train"]
    path = cache_root() / spec.folder / source_entry.sha1 / f"{split}.txt"
    if path.is_file() and sha1_of(path) == expected:
        return path
    source = corpus_file(spec, "train", root, download=download, timeout=timeout)
    data = split_by_lines(source.read_bytes().decode("utf-8"), split).encode("utf-8")
    actual = hashlib.sha1(data).hexdigest()
    if actual != expected:
        raise DataError(f"the {spec.name} {split} split carved out of {source} has sha1 {actual}, "
                        f"expected {expected} (LINE_SPLITS and the registry disagree)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temp_file(path) as tmp:
            tmp.write_bytes(data)
            os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cache not writable: cannot write {path} ({e.strerror or e}); "
                        f"set {CACHE_ENV} to a writable folder") from None
    return path


def split_by_lines(text: str, split: str) -> str:
    """The `split` part of a single-file corpus: a fixed range of its lines (see LINE_SPLITS).

    Deterministic (no shuffling); the three parts concatenate back to `text`.
    """
    if split not in LINE_SPLITS:
        raise UserError(f"unknown split {split!r}; splits: {', '.join(LINE_SPLITS)}")
    lines = text.splitlines(keepends=True)
    start, end = (len(lines) * percent // 100 for percent in LINE_SPLITS[split])
    return "".join(lines[start:end])


def _offline_hint(corpus: Corpus, entry: CorpusFile, path: Path) -> str:
    source = f" (from {entry.urls[0].rsplit('/', 1)[-1]})" if entry.archive_sha1 else ""
    return (f"to provide it offline, put {entry.name}{source} with sha1 {entry.sha1} at {path}, "
            f"or set {DATA_ENV} or --data-root to a folder holding {corpus.folder}/{entry.name}")


class _FetchFailed(Exception):
    """One URL did not yield a verified file; the message says why."""


def _fetch(corpus: Corpus, entry: CorpusFile, path: Path, urls: tuple[str, ...],
           timeout: float, problem: str) -> None:
    """Download `entry` to `path` from the first URL that works; on failure leave nothing behind."""
    hint = _offline_hint(corpus, entry, path)
    created = _make_dirs(path.parent, f"{problem}; {hint}")
    done = False
    try:
        try:
            download = _new_temp(path)
        except OSError as e:
            raise DataError(f"data root not writable: cannot write in {path.parent} "
                            f"({e.strerror or e}); {problem}; {hint}") from None
        try:
            reasons = []
            for url in urls:
                try:
                    _fetch_from(corpus, entry, path, url, download, timeout)
                    done = True
                    return
                except _FetchFailed as e:
                    reasons.append(f"{url}: {e}")
            raise DataError(f"{problem}; download failed ({'; '.join(reasons)}); {hint}")
        finally:
            download.unlink(missing_ok=True)
    finally:
        if not done:
            for folder in created:
                with contextlib.suppress(OSError):  # not empty: someone else is using it
                    folder.rmdir()


def _make_dirs(folder: Path, context: str) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        for created in missing:
            with contextlib.suppress(OSError):
                created.rmdir()
        raise DataError(f"data root not writable: cannot create {folder} ({e.strerror or e}); "
                        f"{context}") from None
    return missing


def _fetch_from(corpus: Corpus, entry: CorpusFile, path: Path, url: str, download: Path,
                timeout: float) -> None:
    """Download one URL into `download`, verify, (unzip, verify,) then move into place."""
    expected = entry.archive_sha1 or entry.sha1
    actual = _download(url, download, timeout)
    if actual != expected:
        raise _FetchFailed(f"got sha1 {actual}, expected {expected}")
    if entry.archive_sha1 is None:
        _replace(download, path)
        return
    _extract(download, entry, path)
    # Also unpack the corpus's other missing files from the same archive, saving downloads.
    for other in corpus.files.values():
        target = path.parent / other.name
        if other.archive_sha1 == entry.archive_sha1 and not target.exists():
            with contextlib.suppress(_FetchFailed):
                _extract(download, other, target)


def _extract(archive: Path, entry: CorpusFile, path: Path) -> None:
    """Unzip the member named like `entry` to `path`, verified, via a temporary file."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == entry.name]
            if not members:
                raise _FetchFailed(f"the archive has no member named {entry.name}")
            with _temp_file(path) as tmp:
                digest = hashlib.sha1()
                with zf.open(members[0]) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        digest.update(chunk)
                if digest.hexdigest() != entry.sha1:
                    raise _FetchFailed(f"archive member {members[0]} has sha1 "
                                       f"{digest.hexdigest()}, expected {entry.sha1}")
                _replace(tmp, path)
    except (OSError, zipfile.BadZipFile) as e:
        raise _FetchFailed(f"cannot unzip {entry.name}: {e}") from None


def _replace(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise _FetchFailed(f"cannot move the verified file into place: {e}") from None


def _new_temp(beside: Path) -> Path:
    """A fresh empty file next to `beside` (same filesystem, so os.replace is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=".part", dir=beside.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def _temp_file(beside: Path) -> Iterator[Path]:
    """A temporary file next to `beside`, removed on exit unless it was moved into place."""
    path = _new_temp(beside)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _download(url: str, dest: Path, timeout: float) -> str:
    """Stream `url` into `dest` and return the SHA-1 of what was received."""
    digest = hashlib.sha1()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with _progress(url, size) as advance:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
    except urllib.error.HTTPError as e:
        raise _FetchFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _FetchFailed(str(e.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _FetchFailed(str(e) or type(e).__name__) from None
    return digest.hexdigest()


@contextlib.contextmanager
def _progress(url: str, size: int | None) -> Iterator[Callable[[int], object]]:
    """Say what is being downloaded; show a tqdm bar on a terminal when tqdm is installed."""
    print(f"downloading {url}", file=sys.stderr, flush=True)
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda n: None
        return
    with tqdm(total=size, unit="B", unit_scale=True, disable=None, file=sys.stderr) as bar:
        yield bar.update


__all__ = [
    "CACHE_ENV", "CORPORA", "DATA_ENV", "LINE_SPLITS", "Corpus", "CorpusFile", "DataError",
    "cache_root", "corpus_file", "data_root", "get_corpus", "resolve_split",
    "sha1_of", "split_by_lines", "split_file",
]
