"""Write a shard's output: its chunks' tables, in chunk order, as one Parquet or JSON Lines file
that appears under its final name only once it is whole.

Fields passed through from JSON Lines arrive as each value's JSON text (serve/dataset/
documents.py). Here, with the whole shard in hand, each such field gets one type: string,
boolean, int64 or float64 (ints and floats together) when every value fits it; otherwise (objects,
arrays, mixed types) the column keeps the JSON text, marked in its Parquet field metadata
(`keraslm.json`). JSON Lines output writes the values back as they were. The result depends on
the shard's rows alone, never on how they were cut into chunks.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from keraslm.errors import UserError, first_line
from keraslm.files import atomic_path
from serve.dataset.documents import JSON_TEXT
from serve.dataset.plan import DatasetOptions, Shard, is_uri, open_location
from serve.dataset.scoring import output_schema

JSONL_ROWS = 4096  # JSON Lines output is converted this many rows at a time
_INT64 = (-(1 << 63), (1 << 63) - 1)


def write_shard(tables: Sequence[pa.Table], shard: Shard, options: DatasetOptions) -> None:
    """Concatenate the chunk tables of `shard` (in chunk order) and write them atomically to
    `shard.output` in `options.out_format`; no tables (an empty input) write a valid empty file
    with the output columns. A one-line UserError names the output when it cannot be written."""
    table = combine(tables, options)
    try:
        with _atomic(shard.output) as (fs, tmp), fs.open_output_stream(tmp) as sink:
            if options.out_format == "parquet":
                pq.write_table(table, sink)
            else:
                _write_jsonl(table, sink)
    except OSError as err:
        raise UserError(f"cannot write {shard.output}: {first_line(err)}") from None


def prepare_outputs(shards: Sequence[Shard]) -> None:
    """Create the folders the shards' outputs go to, before any scoring: a folder that cannot be
    made is one UserError naming it now, not a failure of every shard once it is scored."""
    for folder in dict.fromkeys(_parent(s.output) for s in shards):
        fs, path = open_location(folder)
        try:
            fs.create_dir(path, recursive=True)
        except OSError as err:
            raise UserError(f"cannot create the output folder {folder}: "
                            f"{first_line(err)}") from None


def _parent(location: str) -> str:
    if is_uri(location):
        parts = urlsplit(location)
        return urlunsplit(parts._replace(path=posixpath.dirname(parts.path)))
    return os.path.dirname(location)


def combine(tables: Sequence[pa.Table], options: DatasetOptions) -> pa.Table:
    """One table of the shard: the output columns, then every passed-through field in order of
    first appearance (null where a chunk lacks it), JSON-text fields typed (see module doc)
    unless the output is JSON Lines."""
    schema = output_schema(options)
    base = pa.concat_tables([t.select(schema.names) for t in tables]) if tables \
        else schema.empty_table()
    fields: dict[str, pa.Field] = {}
    for t in tables:
        for f in t.schema:
            if f.name not in schema.names:
                fields.setdefault(f.name, f)
    for name, field in fields.items():
        parts = [t.column(name).combine_chunks() if name in t.column_names
                 else pa.nulls(t.num_rows, field.type) for t in tables]
        column = pa.chunked_array(parts, field.type)
        if _is_json(field) and options.out_format == "parquet":
            field, column = _typed(field, column)
        base = base.append_column(field, column)
    return base


def _is_json(field: pa.Field) -> bool:
    return bool(field.metadata) and JSON_TEXT in field.metadata


def _typed(field: pa.Field, column: pa.ChunkedArray) -> tuple[pa.Field, pa.ChunkedArray]:
    """A JSON-text column as the one type all its values have, if they have one."""
    values = [None if v is None else json.loads(v) for v in column.to_pylist()]
    kinds = {type(v) for v in values if v is not None}
    kind = None
    if kinds == {str}:
        kind = pa.string()
    elif kinds == {bool}:
        kind = pa.bool_()
    elif kinds == {int} and all(_INT64[0] <= v <= _INT64[1] for v in values if v is not None):
        kind = pa.int64()
    elif kinds and kinds <= {int, float}:
        kind = pa.float64()
    if kind is None:
        return field, column
    try:
        return pa.field(field.name, kind), pa.chunked_array([pa.array(values, kind)], kind)
    except (pa.ArrowException, OverflowError, UnicodeError):  # e.g. a string with a lone
        return field, column                                    # surrogate, an int past 1e308


def _write_jsonl(table: pa.Table, sink) -> None:
    """One JSON object per row, the passed-through JSON-text fields as the values they were."""
    json_columns = [f.name for f in table.schema if _is_json(f)]
    for offset in range(0, table.num_rows, JSONL_ROWS):
        rows = table.slice(offset, JSONL_ROWS).to_pylist()
        lines = []
        for row in rows:
            for name in json_columns:
                if row[name] is not None:
                    row[name] = json.loads(row[name])
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        # a lone surrogate (JSON can escape one; UTF-8 cannot hold it) is written as its escape
        sink.write("".join(lines).encode("utf-8", "backslashreplace"))


@contextlib.contextmanager
def _atomic(location: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """A temporary file beside `location` (hidden, in the same folder), moved onto it if the block
    succeeds and removed otherwise. Locally this is keraslm.files.atomic_path (flushed to disk,
    then renamed); elsewhere the filesystem's move (an object store shows only whole objects)."""
    fs, path = open_location(location)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_path(path) as tmp:
            yield fs, os.fspath(tmp)
        return
    parent, name = posixpath.split(path)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        yield fs, tmp
        fs.move(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
