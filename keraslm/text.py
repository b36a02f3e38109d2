"""Text pipeline: raw text -> samples -> tokens, with GluonNLP ``CorpusDataset`` semantics.

A ``TextPipeline`` splits text into samples (lines, or NLTK punkt sentences), strips each,
tokenizes it (whitespace, or Moses via sacremoses), and adds ``bos``/``eos``. One implementation
serves training, evaluation and scoring, and its settings travel with every run and bundle
(``to_dict``/``from_dict``), so a token means the same thing everywhere.

Files are read as a stream in constant memory (apart from the longest line or sentence) and give
exactly what processing the whole file at once gives. NLTK and sacremoses are imported only when
a pipeline needs them. This module never imports TensorFlow.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

from keraslm.errors import UserError

SPLITS = ("lines", "sentences")
TOKENIZERS = ("whitespace", "moses")
PUNKT_LANGUAGE = "english"
PUNKT_RESOURCE = f"tokenizers/punkt_tab/{PUNKT_LANGUAGE}/"
# Sentence mode feeds punkt about this many characters at a time. NLTK (3.10+) stops any regex
# scan after 5 s; punkt's period-context scan of 1 MB of short sentences takes longer than that,
# 64 KiB a small fraction of it. A "sentence" still unfinished after MAX_SENTENCE_CHARS (text
# with no sentence end at all) is given out as it is rather than rescanned ever longer.
BLOCK_CHARS = 1 << 16
MAX_SENTENCE_CHARS = 1 << 18

Source = str | os.PathLike | IO
NltkDirs = str | os.PathLike | Sequence[str | os.PathLike] | None


@dataclass(frozen=True)
class TextPipeline:
    """How raw text becomes a token stream (GluonNLP ``CorpusDataset`` with ``flatten=True``).

    split: ``"lines"`` (every line is a sample, blank lines included, as ``str.splitlines``) or
        ``"sentences"`` (NLTK punkt ``english`` over the whole text).
    tokenizer: ``"whitespace"`` (``str.split``) or ``"moses"`` (sacremoses, ``lang="en"``).
    escape: Moses XML escaping (``<`` -> ``&lt;``...), as GluonNLP's ``SacreMosesTokenizer`` does.
    protected: tokens Moses keeps intact (matched case-insensitively by sacremoses), also when
        escaping is on. Ignored by the whitespace tokenizer, which never splits them.
    bos, eos: tokens added before/after every sample (``None``: nothing).
    skip_empty: drop samples that are empty after stripping (else they give ``[bos] + [eos]``).
    """

    split: str = "lines"
    tokenizer: str = "whitespace"
    escape: bool = False
    protected: tuple[str, ...] = ("<unk>", "<eos>")
    bos: str | None = None
    eos: str | None = "<eos>"
    skip_empty: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.protected, (list, tuple)):
            object.__setattr__(self, "protected", tuple(self.protected))
        _validate(self)

    # --- whole texts -------------------------------------------------------------------------

    def samples(self, text: str) -> list[str]:
        """Split ``text`` into stripped sample strings (empty ones included)."""
        if self.split == "lines":
            return [line.strip() for line in text.splitlines()]
        return list(_stream_sentences(text.splitlines(keepends=True), BLOCK_CHARS))

    def tokenize(self, sample: str) -> list[str]:
        """Tokenize one sample (no bos/eos)."""
        if self.tokenizer == "whitespace":
            return sample.split()
        return _moses_tokenize(sample.strip(), self.escape, self.protected)

    def process(self, text: str) -> list[list[str]]:
        """Tokenize every sample of ``text`` and add bos/eos (empty samples kept unless skip_empty)."""
        return [self._finish(s) for s in self.samples(text) if s or not self.skip_empty]

    # --- files, streamed ---------------------------------------------------------------------

    def iter_samples(self, source: Source, errors: str = "strict", *,
                     block_chars: int = BLOCK_CHARS) -> Iterator[str]:
        """Stream the stripped sample strings of a file (path, text or binary file object).

        Lines mode reads line by line. Sentence mode feeds punkt blocks of about ``block_chars``
        characters cut at line ends and carries the last (possibly unfinished) sentence of each
        block over to the next, so the result equals whole-file processing.
        """
        lines = _read_lines(source, errors)
        if self.split == "lines":
            for line in lines:
                for sample in line.splitlines():
                    yield sample.strip()
        else:
            yield from _stream_sentences(lines, block_chars)

    def iter_processed(self, source: Source, errors: str = "strict", *,
                       block_chars: int = BLOCK_CHARS) -> Iterator[list[str]]:
        """Stream a file's samples as token lists with bos/eos (like ``process``)."""
        for sample in self.iter_samples(source, errors, block_chars=block_chars):
            if sample or not self.skip_empty:
                yield self._finish(sample)

    def iter_tokens(self, source: Source, errors: str = "strict", *,
                    block_chars: int = BLOCK_CHARS) -> Iterator[str]:
        """Stream a file as one flat token sequence (GluonNLP ``flatten=True``).

        Raises UserError for a missing file or invalid UTF-8 (naming the byte offset and line)
        unless ``errors="replace"``.
        """
        for tokens in self.iter_processed(source, errors, block_chars=block_chars):
            yield from tokens

    # --- settings ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable settings; ``from_dict`` restores an equal pipeline."""
        d = asdict(self)
        d["protected"] = list(self.protected)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextPipeline:
        """Rebuild a pipeline from ``to_dict`` output; missing keys take their defaults.

        Raises UserError for unknown keys or invalid values.
        """
        if not isinstance(d, dict):
            raise UserError(f"text pipeline settings must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown text pipeline setting(s) {unknown}; known: {sorted(known)}")
        values = dict(d)
        if "protected" in values:
            protected = values["protected"]
            if not isinstance(protected, (list, tuple)):
                raise UserError(f"text pipeline 'protected' must be a list of tokens, "
                                f"got {protected!r}")
            values["protected"] = tuple(protected)
        return cls(**values)

    def describe(self) -> str:
        """One line saying what the pipeline does, for logs and reports."""
        parts = ["one sample per line" if self.split == "lines" else "punkt sentences"]
        if self.tokenizer == "whitespace":
            parts.append("whitespace tokens")
        else:
            protected = " ".join(self.protected) if self.protected else "none"
            parts.append(f"Moses tokens (escape {'on' if self.escape else 'off'}, "
                         f"protected: {protected})")
        parts.append(f"bos={self.bos or 'none'}, eos={self.eos or 'none'}")
        if self.skip_empty:
            parts.append("empty samples skipped")
        return ", ".join(parts)

    def _finish(self, sample: str) -> list[str]:
        tokens = [self.bos] if self.bos else []
        tokens.extend(self.tokenize(sample))
        if self.eos:
            tokens.append(self.eos)
        return tokens


def _validate(p: TextPipeline) -> None:
    if p.split not in SPLITS:
        raise UserError(f"unknown split {p.split!r}; expected one of {list(SPLITS)}")
    if p.tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {p.tokenizer!r}; expected one of {list(TOKENIZERS)}")
    for name in ("escape", "skip_empty"):
        if not isinstance(getattr(p, name), bool):
            raise UserError(f"text pipeline {name!r} must be true or false, "
                            f"got {getattr(p, name)!r}")
    if not isinstance(p.protected, tuple) or not all(
            isinstance(t, str) and t.split() == [t] for t in p.protected):
        raise UserError(f"protected tokens must be a list of tokens without spaces, "
                        f"got {p.protected!r}")
    for name in ("bos", "eos"):
        value = getattr(p, name)
        if value is not None and not (isinstance(value, str) and value.split() == [value]):
            raise UserError(f"text pipeline {name!r} must be a token without spaces or null, "
                            f"got {value!r}")


WIKITEXT = TextPipeline()
"""WikiText ``.tokens`` files: one sample per line, whitespace tokens, ``<eos>`` after each."""

RAW = TextPipeline(split="sentences", tokenizer="moses")
"""Raw text, product default: punkt sentences, Moses without escaping, ``<unk>``/``<eos>`` kept."""

RAW_TUTORIAL = TextPipeline(split="sentences", tokenizer="moses", escape=True, protected=())
"""Raw text as GluonNLP's tutorial: Moses escaping on, so ``<unk>`` becomes ``&lt; unk &gt;``."""


def pipeline_for_format(fmt: str, tutorial: bool = False) -> TextPipeline:
    """The preset for a corpus text format: ``"tokens"`` (WikiText style) or ``"raw"``."""
    if fmt == "tokens":
        return WIKITEXT
    if fmt == "raw":
        return RAW_TUTORIAL if tutorial else RAW
    raise UserError(f"unknown text format {fmt!r}; expected 'tokens' or 'raw'")


# --- Moses ------------------------------------------------------------------------------------

@functools.cache
def _moses() -> Any:
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang="en")


@functools.cache
def _protection(protected: tuple[str, ...]) -> tuple[list[str], re.Pattern]:
    patterns = [re.escape(t) for t in protected]
    # sacremoses matches protected patterns case-insensitively; so do we.
    return patterns, re.compile("|".join(patterns), re.IGNORECASE)


def _moses_tokenize(text: str, escape: bool, protected: tuple[str, ...]) -> list[str]:
    """Moses-tokenize ``text``; protected tokens stay intact (and unescaped) even when escaping.

    Escaping is applied per token after tokenization, which equals Moses escaping the joined
    line (its substitutions are per character) except that protected tokens are left alone.
    """
    moses = _moses()
    if not protected:
        return moses.tokenize(text, escape=escape)
    patterns, combined = _protection(protected)
    if len(combined.findall(text)) < getattr(moses, "MAX_PROTECTED_TOKENS", 1000):
        tokens = moses.tokenize(text, escape=False, protected_patterns=patterns)
    else:
        # sacremoses refuses that many protected spans in one call: cut the text at them.
        tokens = []
        pos = 0
        for match in combined.finditer(text):
            tokens += moses.tokenize(text[pos:match.start()], escape=False)
            tokens.append(match.group())
            pos = match.end()
        tokens += moses.tokenize(text[pos:], escape=False)
    if escape:
        tokens = [t if combined.fullmatch(t) else moses.escape_xml(t) for t in tokens]
    return tokens


# --- punkt ------------------------------------------------------------------------------------

def default_nltk_dirs() -> list[Path]:
    """Where punkt is looked for by default: ``$NLTK_DATA`` entries, then ``<data root>/nltk_data``.

    The data root is ``$KERASLM_DATA`` or ``~/.keraslm/datasets``.
    """
    env = [Path(p).expanduser().absolute()
           for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    root = Path(os.environ.get("KERASLM_DATA") or "~/.keraslm/datasets").expanduser().absolute()
    return env + [root / "nltk_data"]


def punkt_tokenizer(nltk_data: NltkDirs = None, *, download: bool = True) -> Any:
    """The NLTK punkt ``english`` sentence tokenizer (``punkt_tab``, no pickles), cached.

    Looks in ``nltk_data`` (a folder or list of folders) if given, else in
    ``default_nltk_dirs()`` and then NLTK's own search path. If it is
    missing, downloads it into the last folder searched (``download=True``); failing that, raises
    UserError saying where it looked and how to install it offline.
    """
    if nltk_data is not None:
        dirs, explicit = _as_dirs(nltk_data), True
    else:
        dirs, explicit = tuple(default_nltk_dirs()), False
    return _load_punkt(dirs, explicit, download)


@functools.lru_cache(maxsize=8)
def _load_punkt(dirs: tuple[Path, ...], explicit: bool, download: bool) -> Any:
    import nltk.data
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    def find() -> Any:
        for d in dirs:
            if (d / "tokenizers").exists():
                _authorize(d)
                try:
                    return nltk.data.find(PUNKT_RESOURCE, paths=[str(d)])
                except LookupError:
                    pass
        if not explicit:
            try:
                return nltk.data.find(PUNKT_RESOURCE)
            except LookupError:
                pass
        return None

    location = find()
    failure = ""
    if location is None and download:
        target = dirs[-1]
        _authorize(target)
        try:
            ok = nltk.download("punkt_tab", download_dir=str(target), quiet=True,
                               raise_on_error=True)
            failure = "" if ok else "; download failed"
        except Exception as e:  # noqa: BLE001 - any failure means: install it by hand
            failure = f"; download failed: {e}"
        location = find()
    if location is None:
        looked = ", ".join(str(d) for d in dirs) + ("" if explicit else " and NLTK's default path")
        raise UserError(
            f"NLTK punkt_tab sentence model not found (looked in {looked}{failure}); on a "
            f"connected machine run `python -m nltk.downloader -d {dirs[-1]} punkt_tab` and "
            f"copy that folder to this machine, or point $NLTK_DATA at a folder holding "
            f"tokenizers/punkt_tab")
    return PunktSentenceTokenizer(load_punkt_params(location))


def _authorize(d: Path) -> None:
    """NLTK only opens files under ``nltk.data.path``: add the folder we chose to it."""
    import nltk.data

    if str(d) not in nltk.data.path:
        nltk.data.path.insert(0, str(d))


def _as_dirs(nltk_data: NltkDirs) -> tuple[Path, ...]:
    if isinstance(nltk_data, (str, os.PathLike)):
        nltk_data = [nltk_data]
    dirs = tuple(Path(d).expanduser().absolute() for d in nltk_data)
    if not dirs:
        raise UserError("no folder given to look for the NLTK punkt_tab model in")
    return dirs


def _stream_sentences(lines: Iterable[str], block_chars: int) -> Iterator[str]:
    tokenizer = punkt_tokenizer()

    def cut(text: str, final: bool) -> tuple[list[str], str]:
        spans = list(tokenizer.span_tokenize(text))
        if final:
            return [text[s:e].strip() for s, e in spans], ""
        if len(spans) < 2:
            return [], text
        # The last sentence may continue in the next block: keep it for then.
        done = [text[s:e].strip() for s, e in spans[:-1]]
        return done, text[spans[-1][0]:]

    carry = ""
    for block in _blocks(lines, block_chars):
        done, carry = cut(carry + block, final=False)
        yield from done
        if len(carry) > MAX_SENTENCE_CHARS:
            yield carry.strip()
            carry = ""
    done, _ = cut(carry, final=True)
    yield from done


def _blocks(lines: Iterable[str], block_chars: int) -> Iterator[str]:
    """The concatenated lines in pieces of about `block_chars`, cut after whitespace where
    possible (a long line is cut too)."""
    pending = ""
    for line in lines:
        pending += line
        start = 0
        while len(pending) - start >= block_chars:
            limit = start + block_chars
            end = max(pending.rfind(" ", start, limit), pending.rfind("\n", start, limit)) + 1
            end = end if end > start else limit
            yield pending[start:end]
            start = end
        pending = pending[start:]
    if pending:
        yield pending


# --- reading ----------------------------------------------------------------------------------

def _read_lines(source: Source, errors: str) -> Iterator[str]:
    """Yield a file's lines as text with universal newlines (``\\r\\n`` and ``\\r`` -> ``\\n``)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        try:
            with open(path, "rb") as f:
                yield from _decode_lines(f, str(path), errors)
        except FileNotFoundError:
            raise UserError(f"file not found: {path}") from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    elif isinstance(source, io.TextIOBase):
        name = getattr(source, "name", "<text stream>")
        try:
            for line in source:
                yield _universal(line)
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid text ({e.reason}); "
                            f"re-encode it as UTF-8 or decode with errors='replace'") from None
    else:
        yield from _decode_lines(source, str(getattr(source, "name", "<byte stream>")), errors)


def _decode_lines(f: IO[bytes], name: str, errors: str) -> Iterator[str]:
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        start = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0  # UTF-8 BOM
        try:
            line = raw[start:].decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid UTF-8 at byte {offset + start + e.start} "
                            f"(line {lineno}); re-encode it as UTF-8 or decode with "
                            f"errors='replace'") from None
        offset += len(raw)
        yield _universal(line)


def _universal(line: str) -> str:
    if "\r" in line:
        line = line.replace("\r\n", "\n").replace("\r", "\n")
    return line
