"""What to score and where it goes: the run's options, its shards and their chunks.

A *shard* is one input file (.jsonl, .parquet or .txt, by path or by any URI pyarrow knows) and
the one output file it becomes. A *chunk* is a slice of a shard's documents, the unit of work
that engines hand to their workers: a byte range cut at line starts (JSON Lines, text) or a row
range (Parquet). Chunks are cut by size alone, never by the number of workers, so a single big
shard keeps every worker busy and any number of workers gives the same chunks (and so the same
output). Both engines (serve/dataset/local.py and the Ray engine) call exactly these functions,
`scoring.score_chunk` and `output.write_shard`.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from keraslm.errors import UserError, first_line
from serve.cache import CacheSettings

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
OUT_FORMATS = ("parquet", "jsonl")
ERRORS = ("strict", "replace")
CHUNK_BYTES = 1 << 20  # plan_chunks' default: about this much input per chunk
MAX_DOCUMENT_BYTES = 4 << 20  # a longer document (line, or text) is recorded as an error
MAX_GROUP_SPLITS = 32  # a Parquet row group is cut into at most this many chunks (each chunk
                       # reads its group from the start: more would read it over and over)
_SCAN_BYTES = 1 << 20  # plan_chunks reads a line-based file this much at a time
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class DatasetOptions:
    """How documents are read, scored and written; the same for every shard of a run.

    `id_field` names each document (absent: `<file>:<line>`, 1-based, for JSON Lines and text;
    `<file>:<row>`, from 0, for Parquet). `keep_fields` passes the input's other fields through
    (not the text). `errors` is what invalid UTF-8 does: the document is recorded with an error
    ("strict") or read with U+FFFD in its place ("replace"). A document over `max_document_bytes`
    (its line, or its text in a Parquet file) is recorded with an error, unread. `text_format`
    ("tokens" or "raw") overrides the bundle's text pipeline; `cache` turns the continuous cache
    on (reset for every document); `batch_size` is the rows scored together, `device`
    onnxruntime's. `chunk_bytes` is about how much input a chunk covers (`plan_chunks`): every
    engine cuts the same chunks, and so scores exactly the same calls.
    """

    text_field: str = "text"
    id_field: str = "id"
    keep_fields: bool = True
    out_format: str = "parquet"
    cache: CacheSettings | None = None
    errors: str = "strict"
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    text_format: str | None = None
    batch_size: int = 20
    device: str = "auto"
    chunk_bytes: int = CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.out_format not in OUT_FORMATS:
            raise UserError(f"unknown output format {self.out_format!r}; expected "
                            f"{' or '.join(OUT_FORMATS)}")
        if self.errors not in ERRORS:
            raise UserError(f"errors must be {' or '.join(ERRORS)}, got {self.errors!r}")
        for name in ("max_document_bytes", "batch_size", "chunk_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, "
                                f"got {value!r}")
        if not self.text_field:
            raise UserError("the text field's name is empty")


@dataclass(frozen=True)
class Shard:
    """One input file and the output file it becomes.

    `input` and `output` are local absolute paths or URIs (`open_location` opens either);
    `name` is the input as the user named it (in ids and messages); `size` its bytes.
    """

    input: str
    name: str
    format: str
    output: str
    size: int


@dataclass(frozen=True)
class Chunk:
    """Documents `start` to `stop` of a shard: byte offsets at line starts for JSON Lines and
    text (the line at `start` being line `first_line`, from 1), row numbers for Parquet.

    `index` is its place among the shard's `count` chunks; `size` is about how many bytes of
    input it covers (for progress)."""

    shard: Shard
    index: int
    count: int
    start: int
    stop: int
    first_line: int
    size: int


# ---- locations: local paths and URIs -------------------------------------------------------------

def is_uri(location: str) -> bool:
    """Whether `location` is a URI (`scheme://...`) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or URI; a one-line UserError naming it when pyarrow
    knows no such filesystem or cannot reach it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
        raise UserError(f"{location}: {first_line(err)}") from None


def _child(location: str, relative: str) -> str:
    """The location of `relative` (a /-separated path) under the folder `location`."""
    if not is_uri(location):
        return os.path.join(location, *relative.split("/"))
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + relative))


def _file_info(fs: pafs.FileSystem, path: str, name: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise UserError(f"cannot read {name}: {first_line(err)}") from None


# ---- inputs to shards ----------------------------------------------------------------------------

def expand_inputs(inputs: Sequence[str], out_dir: str, options: DatasetOptions) -> list[Shard]:
    """The shards of `inputs` (files, globs, folders searched recursively for .jsonl, .parquet and
    .txt files, by local path or URI), in the order given (each folder's or glob's files sorted),
    each named once, each with its own output file under `out_dir`.

    Outputs are `<stem>.parquet` (or `.jsonl`); inputs that share a stem are told apart by their
    folders and extension (`a__x.jsonl.parquet`), so the names depend only on the inputs. Files
    under `out_dir` and hidden files are never inputs. A one-line UserError names an input that
    matches nothing, a file of an unknown format, or an `out_dir` that is a file.
    """
    out_fs, out_path = open_location(out_dir)
    if _file_info(out_fs, out_path, out_dir).type == pafs.FileType.File:
        raise UserError(f"--out {out_dir}: is a file, not a folder")
    excluded = _comparable(out_dir)
    found: dict[str, tuple[str, str, int]] = {}  # -> (location, name, size), first seen first
    for spec in inputs:
        for location, name, size in _expand_one(spec, excluded):
            found.setdefault(_comparable(location), (location, name, size))
    entries = list(found.values())
    outputs = _output_names([name for _, name, _ in entries], options.out_format)
    out_dir = _absolute(out_dir)
    return [Shard(input=_absolute(location), name=name, format=_format_of(name), size=size,
                  output=_child(out_dir, out_name))
            for (location, name, size), out_name in zip(entries, outputs)]


def _absolute(location: str) -> str:
    """A URI as it is, a local path made absolute (workers may run elsewhere than here)."""
    return location if is_uri(location) else os.path.abspath(location)


def _comparable(location: str) -> str:
    """A location in one spelling: an absolute local path, or the URI as given."""
    return location.rstrip("/") if is_uri(location) else os.path.abspath(location)


def _under(location: str, folder: str) -> bool:
    """Whether `location` is the folder (in `_comparable` spelling) or inside it."""
    location = _comparable(location)
    sep = "/" if is_uri(location) else os.sep
    return location == folder or location.startswith(folder.rstrip(sep) + sep)


def _format_of(name: str) -> str:
    return FORMATS[posixpath.splitext(name.replace(os.sep, "/"))[1].lower()]


def _supported(name: str) -> bool:
    return posixpath.splitext(name.replace(os.sep, "/"))[1].lower() in FORMATS


def _expand_one(spec: str, excluded: str) -> list[tuple[str, str, int]]:
    """(location, name, size) of every input file `spec` stands for; UserError when none."""
    uri = is_uri(spec)
    path_part = urlsplit(spec).path if uri else spec
    if _GLOB_MAGIC.search(path_part):
        files = _glob_uri(spec) if uri else _glob_local(spec)
        what = "matches no .jsonl, .parquet or .txt file"
    else:
        fs, path = open_location(spec)
        info = _file_info(fs, path, spec)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{spec}: no such file or folder")
        if info.type == pafs.FileType.File:
            if not _supported(spec):
                raise UserError(f"{spec}: unknown input format (expected a .jsonl, .parquet or "
                                f".txt file, or a folder of them)")
            return [(spec, spec, info.size)]
        files = _folder_files(spec)
        what = "holds no .jsonl, .parquet or .txt file"
    files = [f for f in files if not _under(f[0], excluded)]
    if not files:
        raise UserError(f"{spec}: {what}")
    return files


def _folder_files(folder: str) -> list[tuple[str, str, int]]:
    """The supported, non-hidden files under `folder`, recursively, sorted by relative path."""
    fs, path = open_location(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as err:
        raise UserError(f"cannot list {folder}: {first_line(err)}") from None
    base = path.rstrip("/")
    found = []
    for info in infos:
        relative = info.path[len(base):].lstrip("/") if info.path.startswith(base) else info.path
        relative = relative.replace(os.sep, "/")
        if (info.type == pafs.FileType.File and _supported(relative)
                and not any(part.startswith(".") for part in relative.split("/"))):
            found.append((relative, info.size))
    return [(_child(folder, rel), _child(folder, rel), size) for rel, size in sorted(found)]


def _glob_local(pattern: str) -> list[tuple[str, str, int]]:
    files = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isdir(match):
            files += _folder_files(match)
        elif _supported(match) and os.path.isfile(match):
            files.append((match, match, os.path.getsize(match)))
    return files


def _glob_uri(pattern: str) -> list[tuple[str, str, int]]:
    """A URI glob: the folder before the first wildcard is listed and its files matched (`*` and
    `?` within a name, `**` across folders, `[...]` a set)."""
    parts = urlsplit(pattern)
    magic = _GLOB_MAGIC.search(parts.path).start()
    base_path = parts.path[:parts.path.rfind("/", 0, magic) + 1]
    base = urlunsplit(parts._replace(path=base_path))
    regex = _glob_regex(parts.path[len(base_path):])
    listed = _folder_files(base)
    return [f for f in listed if regex.fullmatch(urlsplit(f[0]).path[len(base_path):])]


def _glob_regex(pattern: str) -> re.Pattern:
    """The regular expression of a glob pattern over /-separated paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _output_names(names: Sequence[str], out_format: str) -> list[str]:
    """One output file name per input name: `<stem>.<format>`, or, for inputs that share a stem,
    their path below the folder they share with `__` for `/`, extension kept; `-2`, `-3`...
    for anything still the same."""
    split = [n.replace(os.sep, "/").rstrip("/").split("/") for n in names]
    stems = [posixpath.splitext(parts[-1])[0] for parts in split]
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem, []).append(i)
    result = list(stems)
    for members in groups.values():
        if len(members) > 1:
            common = os.path.commonprefix([split[i][:-1] for i in members])
            for i in members:
                result[i] = "__".join(p for p in split[i][len(common):] if p not in ("", "."))
    seen: dict[str, int] = {}
    final = []
    for name in result:
        count = seen[name] = seen.get(name, 0) + 1
        final.append(f"{name}.{out_format}" if count == 1 else f"{name}-{count}.{out_format}")
    return final


# ---- shards to chunks ----------------------------------------------------------------------------

def plan_chunks(shard: Shard, options: DatasetOptions | None = None,
                target_bytes: int | None = None) -> list[Chunk]:
    """Cut a shard into chunks of about `target_bytes` (default: the options' `chunk_bytes`) of
    input each (at least one chunk, empty for an empty file), in document order.

    JSON Lines and text are cut at the first line start at or after each multiple of the target
    (one pass over the file, counting lines for the ids); a line longer than the target makes
    its chunk longer. Parquet is cut at row groups, small groups merged and big ones split into
    row ranges (at most MAX_GROUP_SPLITS each), by their uncompressed size. Chunks depend on
    the file and the target alone.
    """
    if target_bytes is None:
        target_bytes = CHUNK_BYTES if options is None else options.chunk_bytes
    if not (isinstance(target_bytes, int) and target_bytes >= 1):
        raise ValueError(f"target_bytes must be a positive integer, got {target_bytes!r}")
    if shard.format == "parquet":
        spans = list(_row_spans(shard, target_bytes))
    else:
        spans = list(_line_spans(shard, target_bytes))
    return [Chunk(shard, i, len(spans), start, stop, first, size)
            for i, (start, stop, first, size) in enumerate(spans)]


def _line_spans(shard: Shard, target: int) -> Iterator[tuple[int, int, int, int]]:
    """(start byte, stop byte, first line, bytes) of each chunk of a line-based file."""
    fs, path = open_location(shard.input)
    start, line = 0, 1  # the current chunk's first byte and line
    pos, newlines = 0, 0  # bytes read so far, and the newlines in them
    cut = target  # the next chunk starts at the first line start at or after this byte
    try:
        with fs.open_input_stream(path) as f:
            while block := f.read(_SCAN_BYTES):
                at = max(0, cut - 1 - pos)  # a newline at byte >= cut - 1 ends the chunk
                while (nl := block.find(b"\n", at)) >= 0:
                    boundary = pos + nl + 1
                    lines_before = newlines + block.count(b"\n", 0, nl + 1)
                    yield start, boundary, line, boundary - start
                    start, line = boundary, 1 + lines_before
                    cut = boundary + target
                    at = max(nl + 1, cut - 1 - pos)
                pos += len(block)
                newlines += block.count(b"\n")
    except OSError as err:
        raise UserError(f"cannot read {shard.name}: {first_line(err)}") from None
    if pos > start or start == 0:
        yield start, pos, line, pos - start


def _row_spans(shard: Shard, target: int) -> Iterator[tuple[int, int, int, int]]:
    """(first row, stop row, first row, bytes) of each chunk of a Parquet file."""
    metadata = read_parquet_metadata(shard)
    start = row = size = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        rows, nbytes = group.num_rows, max(1, group.total_byte_size)
        if nbytes > target and rows > 1:
            if row > start:
                yield start, row, start, size
            pieces = min(MAX_GROUP_SPLITS, rows, math.ceil(nbytes / target))
            cuts = [row + rows * k // pieces for k in range(pieces + 1)]
            for a, b in itertools.pairwise(cuts):
                yield a, b, a, nbytes * (b - a) // rows
            row += rows
            start, size = row, 0
            continue
        if row > start and size + nbytes > target:
            yield start, row, start, size
            start, size = row, 0
        row += rows
        size += nbytes
    if row > start or row == 0:
        yield start, row, start, size


def read_parquet_metadata(shard: Shard) -> pq.FileMetaData:
    """The Parquet footer of a shard; a one-line UserError naming it if it is not Parquet."""
    fs, path = open_location(shard.input)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except (OSError, ValueError) as err:
        raise UserError(f"{shard.name}: not a readable Parquet file ({first_line(err)})") from None


def shard_done(shard: Shard) -> bool:
    """Whether the shard's output exists (written whole: outputs appear only complete)."""
    fs, path = open_location(shard.output)
    return _file_info(fs, path, shard.output).type == pafs.FileType.File
