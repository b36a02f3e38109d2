"""Text pipeline: raw text -> samples -> tokens, with GluonNLP ``CorpusDataset`` semantics.

A ``TextPipeline`` splits text into samples (lines, or NLTK punkt sentences), strips each,
tokenizes it (whitespace, or Moses via sacremoses), and adds ``bos``/``eos``. One implementation
serves training, evaluation and scoring, and its settings travel with every run and bundle
(``to_dict``/``from_dict``), so a token means the same thing everywhere.

Files are read as a stream, ``READ_BYTES`` at a time, and give exactly what processing the whole
file at once gives, in memory bounded whatever the line lengths: ``iter_parts`` gives a sample's
tokens in parts, and lines mode tokenizes a line longer than ``MAX_PIECE_CHARS`` in pieces cut at
whitespace where the tokenizer cannot tell the difference (see ``_cut``), so the tokens are those
of the whole line. Only ``iter_samples`` and ``iter_processed``, which give samples whole, hold a
long line. NLTK and sacremoses are imported only when a pipeline needs them. This module never
imports TensorFlow.
"""

from __future__ import annotations

import codecs
import functools
import io
import os
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
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
READ_BYTES = 1 << 20  # a file is read (and a text stream in characters) this much at a time
MAX_PIECE_CHARS = 1 << 18  # lines mode tokenizes a longer line in pieces of at most this

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
        return [self.sample_tokens(s) for s in self.samples(text) if s or not self.skip_empty]

    # --- files, streamed ---------------------------------------------------------------------

    def iter_samples(self, source: Source, errors: str = "strict", *,
                     block_chars: int = BLOCK_CHARS) -> Iterator[str]:
        """Stream the stripped sample strings of a file (path, text or binary file object).

        Lines mode splits the text as ``str.splitlines``. Sentence mode feeds punkt blocks of
        about ``block_chars`` characters cut at whitespace and carries the last (possibly
        unfinished) sentence of each block over to the next, so the result equals whole-file
        processing. A sample is given whole, however long its line: ``iter_parts`` is bounded.
        """
        pieces = []
        for piece, last in self._pieces(source, errors, block_chars):
            pieces.append(piece)
            if last:
                yield "".join(pieces).strip()
                pieces = []

    def iter_parts(self, source: Source, errors: str = "strict", *,
                   block_chars: int = BLOCK_CHARS) -> Iterator[tuple[list[str], bool]]:
        """Stream a file's samples as ``(tokens, last)`` parts, in memory bounded by the part.

        The parts of a sample, joined, are its tokens with bos/eos as ``process`` gives them;
        ``last`` marks its final part. A sample has one part unless it is a line longer than
        ``MAX_PIECE_CHARS``, tokenized piece by piece. Skipped empty samples give no part.
        """
        begun = False  # the current sample has text (or is ending): its bos has been given
        for piece, last in self._pieces(source, errors, block_chars):
            if not begun and (_has_text(piece) or (last and not self.skip_empty)):
                begun = True
                tokens = [self.bos] if self.bos else []
                tokens.extend(self.tokenize(piece))
            elif begun:
                tokens = self.tokenize(piece)
            else:
                continue  # whitespace at the start of a sample: no tokens, maybe no sample
            if last:
                if self.eos:
                    tokens.append(self.eos)
                begun = False
            yield tokens, last

    def iter_processed(self, source: Source, errors: str = "strict", *,
                       block_chars: int = BLOCK_CHARS) -> Iterator[list[str]]:
        """Stream a file's samples as token lists with bos/eos (like ``process``), each whole."""
        tokens: list[str] = []
        for part, last in self.iter_parts(source, errors, block_chars=block_chars):
            tokens += part
            if last:
                yield tokens
                tokens = []

    def iter_tokens(self, source: Source, errors: str = "strict", *,
                    block_chars: int = BLOCK_CHARS) -> Iterator[str]:
        """Stream a file as one flat token sequence (GluonNLP ``flatten=True``), in bounded memory.

        Raises UserError for a missing file or invalid UTF-8 (naming the byte offset and line)
        unless ``errors="replace"``, and for a line of ``MAX_PIECE_CHARS`` characters without
        whitespace.
        """
        for part, _ in self.iter_parts(source, errors, block_chars=block_chars):
            yield from part

    def _pieces(self, source: Source, errors: str, block_chars: int
                ) -> Iterator[tuple[str, bool]]:
        """The text of every sample as ``(piece, last)``: one piece, or a long line in several."""
        chunks = _read_text(source, errors)
        if self.split == "lines":
            return _line_pieces(chunks, _CUTS[self.tokenizer], _source_name(source))
        return ((sample, True) for sample in _stream_sentences(chunks, block_chars))

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

    def sample_tokens(self, sample: str) -> list[str]:
        """One sample's tokens with bos/eos, as ``process`` gives each sample."""
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


def pipeline_for_format(fmt: str | None = None, moses_tutorial: bool = False, *,
                        inherited: TextPipeline | None = None) -> TextPipeline:
    """How to tokenize a text: the one rule for training, fine-tuning, evaluation and scoring.

    `fmt` is a text format, ``"tokens"`` (WikiText style) or ``"raw"`` (punkt sentences, Moses
    tokens): the one asked for, or a named corpus's (the caller looks it up). It, or the
    tutorial's Moses settings (`moses_tutorial`, for raw text), decide; with neither, a text is
    read as `inherited` (the run continued, fine-tuned or evaluated) when there is one, else
    as whitespace tokens.
    """
    if fmt is None and not moses_tutorial and inherited is not None:
        return inherited
    if fmt is None or fmt == "tokens":
        return WIKITEXT
    if fmt == "raw":
        return RAW_TUTORIAL if moses_tutorial else RAW
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

_DATA_ROOTS: list[Path] = []  # data roots named by the program (--data-root), newest first


def use_data_root(root: str | os.PathLike[str]) -> None:
    """Look for punkt in ``<root>/nltk_data`` too (before ``$KERASLM_DATA``'s): a CLI given
    ``--data-root`` finds the sentence model where it finds the corpora."""
    folder = Path(root).expanduser().absolute()
    if folder not in _DATA_ROOTS:
        _DATA_ROOTS.insert(0, folder)


def default_nltk_dirs() -> list[Path]:
    """Where punkt is looked for by default: ``$NLTK_DATA`` entries, then ``<data root>/nltk_data``
    for every root given to `use_data_root`, then for ``$KERASLM_DATA`` (or
    ``~/.keraslm/datasets``)."""
    env = [Path(p).expanduser().absolute()
           for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    root = Path(os.environ.get("KERASLM_DATA") or "~/.keraslm/datasets").expanduser().absolute()
    roots = [*_DATA_ROOTS, *([root] if root not in _DATA_ROOTS else [])]
    return env + [r / "nltk_data" for r in roots]


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


def _stream_sentences(texts: Iterable[str], block_chars: int) -> Iterator[str]:
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
    for block in _blocks(texts, block_chars):
        done, carry = cut(carry + block, final=False)
        yield from done
        if len(carry) > MAX_SENTENCE_CHARS:
            yield carry.strip()
            carry = ""
    done, _ = cut(carry, final=True)
    yield from done


def _blocks(texts: Iterable[str], block_chars: int) -> Iterator[str]:
    """The concatenated texts in pieces of about `block_chars`, cut after whitespace where
    possible (a long line is cut too)."""
    pending = ""
    for text in texts:
        pending += text
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


# --- long lines -------------------------------------------------------------------------------

_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines splits
_SPACE = re.compile(r"\s")  # str.split's whitespace
# Moses looks across whitespace only at ".", "," and "'" (nonbreaking prefixes, numbers, English
# apostrophes), and treats the ends of its input apart, where it also drops control characters:
# cut in whitespace between two characters that are none of these (nor "`"), the pieces give the
# tokens of the whole line.
_MOSES_SAFE = r"[^\s.,'`\x00-\x1f]"
_CUTS = {"whitespace": _SPACE,
         "moses": re.compile(rf"(?<={_MOSES_SAFE})\s+(?={_MOSES_SAFE})")}


def _has_text(piece: str) -> bool:
    """Whether anything is left of `piece` after ``strip()``."""
    return bool(piece) and not piece.isspace()


def _line_pieces(texts: Iterable[str], cut: re.Pattern, name: str
                 ) -> Iterator[tuple[str, bool]]:
    """The lines of a text given in chunks (as ``str.splitlines`` of the whole), as
    ``(piece, last)``: a line longer than MAX_PIECE_CHARS comes in pieces (see `_cut`)."""
    pending = ""  # the start of an unfinished line
    number = 1  # the line number of `pending`
    for text in texts:
        text = pending + text
        lines = text.splitlines()
        pending = lines.pop() if text[-1:] not in _LINE_BREAKS else ""
        for line in lines:
            rest = yield from _first_pieces(line, cut, name, number)
            yield rest, True
            number += 1
        pending = yield from _first_pieces(pending, cut, name, number)
    if pending:
        yield pending, True


def _first_pieces(line: str, cut: re.Pattern, name: str, number: int
                  ) -> Generator[tuple[str, bool], None, str]:
    """Give pieces of `line` while more than MAX_PIECE_CHARS of it remain; return the rest."""
    start = 0
    while len(line) - start > MAX_PIECE_CHARS:
        end = _cut(line, start, cut, name, number)
        yield line[start:end], False
        start = end
    return line[start:]


def _cut(text: str, start: int, cut: re.Pattern, name: str, number: int) -> int:
    """Where to end the piece of `text` from `start`: at the last place `cut` allows within
    MAX_PIECE_CHARS characters, else after their last whitespace (for Moses, text with no safe
    place in that many characters, a token next to this cut may come out differently from the
    whole line's); UserError if they have no whitespace at all."""
    window = text[start:start + MAX_PIECE_CHARS][::-1]  # searched from its end
    match = cut.search(window) or _SPACE.search(window)
    if match is None:
        raise UserError(f"{name}: line {number} has {MAX_PIECE_CHARS} characters without "
                        f"whitespace; is it text?")
    return start + len(window) - match.start()


# --- reading ----------------------------------------------------------------------------------

def _source_name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).expanduser())
    return str(getattr(source, "name", "<text stream>" if isinstance(source, io.TextIOBase)
                       else "<byte stream>"))


def _read_text(source: Source, errors: str) -> Iterator[str]:
    """A file's text in chunks, with universal newlines (``\\r\\n`` and ``\\r`` -> ``\\n``)."""
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(name, "rb") as f:
                yield from _universal(_decode(f, name, errors))
        except FileNotFoundError:
            raise UserError(f"file not found: {name}") from None
        except OSError as e:
            raise UserError(f"cannot read {name}: {e.strerror or e}") from None
    elif isinstance(source, io.TextIOBase):
        try:
            yield from _universal(iter(functools.partial(source.read, READ_BYTES), ""))
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid text ({e.reason}); "
                            f"re-encode it as UTF-8 or decode with errors='replace'") from None
    else:
        yield from _universal(_decode(source, name, errors))


def _decode(f: IO[bytes], name: str, errors: str) -> Iterator[str]:
    """The UTF-8 text of a binary stream, READ_BYTES at a time, without a byte order mark.

    A character may straddle two reads; invalid UTF-8 is named by its byte offset and line.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = newlines = 0  # before `data`
    at_start = True
    while True:
        data = f.read(READ_BYTES)
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            held = len(e.object) - len(data)  # bytes of a character begun by the last read
            line = newlines + data[:max(0, e.start - held)].count(b"\n") + 1
            raise UserError(f"{name}: invalid UTF-8 at byte {offset - held + e.start} "
                            f"(line {line}); re-encode it as UTF-8 or decode with "
                            f"errors='replace'") from None
        if at_start and text:
            text, at_start = text.removeprefix("\ufeff"), False
        if text:
            yield text
        if not data:
            return
        offset += len(data)
        newlines += data.count(b"\n")


def _universal(texts: Iterable[str]) -> Iterator[str]:
    """The texts with ``\\r\\n`` and ``\\r`` as ``\\n`` (a final ``\\r`` waits for the next text)."""
    held = ""
    for text in texts:
        text, held = held + text, ""
        if text.endswith("\r"):
            text, held = text[:-1], "\r"
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text:
            yield text
    if held:
        yield "\n"
