"""A chunk's documents as the scorer takes them: id, text (or why there is none) and the other
fields of the input, in document order.

JSON Lines: one JSON object a line (blank lines are no documents); the text and id are fields
named by the options, every other field is passed through as its JSON text (serve/dataset/
output.py gives the shard's columns their types once all its chunks are in). Text: one document a
line, every line (a blank one too). Parquet: one document a row; other columns are passed through
as they are. A document the pipeline cannot take gets an error instead of a text, one line saying
why; it never stops the chunk. A line is read a block at a time and one over the size limit is
skipped unread, so memory stays bounded whatever the input.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from keraslm.errors import UserError, first_line
from serve.dataset.plan import Chunk, DatasetOptions, open_location

OUTPUT_COLUMNS = ("id", "num_tokens", "num_oov", "log_likelihood", "perplexity", "error", "cache")
INPUT_PREFIX = "input."  # a passed-through field named like an output column gets this prefix
JSON_TEXT = b"keraslm.json"  # field metadata key: the column holds each value's JSON text
READ_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1 << 14


@dataclass
class Documents:
    """A chunk's documents: parallel lists (`texts[i]` is None when `errors[i]` says why), and
    the passed-through fields as (field, array) columns of the same length."""

    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    fields: list[tuple[pa.Field, pa.Array]] = field(default_factory=list)

    def add(self, doc_id: str, text: str | None, error: str | None = None) -> None:
        self.ids.append(doc_id)
        self.texts.append(text)
        self.errors.append(error)


def read_documents(chunk: Chunk, options: DatasetOptions) -> Documents:
    """The documents of `chunk` (see the module docstring); a one-line UserError naming the
    shard when it cannot be read at all."""
    try:
        if chunk.shard.format == "parquet":
            return _parquet_documents(chunk, options)
        return _line_documents(chunk, options)
    except OSError as err:
        raise UserError(f"cannot read {chunk.shard.name}: {first_line(err)}") from None


def passthrough_name(name: str) -> str:
    """The output column of an input field: its own name, unless an output column has it."""
    return INPUT_PREFIX + name if name in OUTPUT_COLUMNS else name


# ---- JSON Lines and text -------------------------------------------------------------------------

def _line_documents(chunk: Chunk, options: DatasetOptions) -> Documents:
    docs = Documents()
    jsonl = chunk.shard.format == "jsonl"
    passed: list[dict[str, object]] = []
    for number, line, size in _lines(chunk, options.max_document_bytes):
        doc_id = f"{chunk.shard.name}:{number}"
        if line is None:
            docs.add(doc_id, None, _too_long(size, options))
            passed.append({})
            continue
        if jsonl and not line.strip():
            continue  # a blank line between objects: no document
        try:
            text = line.decode("utf-8", options.errors)
        except UnicodeDecodeError as err:
            docs.add(doc_id, None, f"invalid UTF-8 at byte {err.start}")
            passed.append({})
            continue
        if not jsonl:
            docs.add(doc_id, text.removesuffix("\r"))
            continue
        obj, error = _json_object(text)
        fields: dict[str, object] = {}
        if obj is not None:
            doc_id, text, error = _object_document(obj, doc_id, options)
            if options.keep_fields:
                fields = {passthrough_name(k): v for k, v in obj.items()
                          if k not in (options.text_field, options.id_field)}
        docs.add(doc_id, None if error else text, error)
        passed.append(fields)
    if jsonl and options.keep_fields:
        docs.fields = _json_columns(passed)
    return docs


def _lines(chunk: Chunk, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, the line without its newline, its length) for every line of the chunk; the
    line is None when longer than `limit` (it is then skipped, not held)."""
    fs, path = open_location(chunk.shard.input)
    number, line, size, over = chunk.first_line, bytearray(), 0, False
    with fs.open_input_file(path) as f:
        f.seek(chunk.start)
        left = chunk.stop - chunk.start
        while left > 0 and (block := f.read(min(READ_BYTES, left))):
            left -= len(block)
            pos = 0
            while True:
                nl = block.find(b"\n", pos)
                end = len(block) if nl < 0 else nl
                size += end - pos
                if not over:
                    if size > limit:
                        over, line = True, bytearray()
                    else:
                        line += block[pos:end]
                if nl < 0:
                    break
                yield number, None if over else bytes(line), size
                number, line, size, over, pos = number + 1, bytearray(), 0, False, nl + 1
    if size or over:  # a last line without a newline
        yield number, None if over else bytes(line), size


def _too_long(size: int, options: DatasetOptions) -> str:
    return (f"document of {size:,} bytes, over the limit of {options.max_document_bytes:,} "
            f"(--max-document-bytes)")


def _json_object(text: str) -> tuple[dict | None, str | None]:
    """The JSON object on a line, or None and why not."""
    try:
        value = json.loads(text)
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg}: character {err.pos})"
    except ValueError as err:  # e.g. an integer too long to convert
        return None, f"not valid JSON ({first_line(err)})"
    if not isinstance(value, dict):
        return None, f"not a JSON object ({_kind(value)})"
    return value, None


def _object_document(obj: dict, default_id: str, options: DatasetOptions
                     ) -> tuple[str, str | None, str | None]:
    """(id, text, error) of a JSON object."""
    doc_id = _id_text(obj.get(options.id_field), default_id)
    if options.text_field not in obj:
        return doc_id, None, f"no {options.text_field!r} field"
    text = obj[options.text_field]
    if not isinstance(text, str):
        return doc_id, None, f"{options.text_field!r} is {_kind(text)}, not a string"
    return doc_id, text, None  # no longer than its line, which is within the limit


def _id_text(value: object, default: str) -> str:
    """A document's id as text: a string as it is, anything else as its JSON, none: `default`."""
    if value is None:
        return default
    if isinstance(value, str):  # JSON can escape a lone surrogate, which UTF-8 cannot hold
        return value.encode("utf-8", "replace").decode("utf-8")
    return json.dumps(value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _json_columns(rows: list[dict[str, object]]) -> list[tuple[pa.Field, pa.Array]]:
    """One string column per field (in order of first appearance) holding each value's JSON
    text, null where a document lacks the field (or it is null)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = []
    for name in names:
        values = [None if row.get(name) is None else json.dumps(row[name]) for row in rows]
        columns.append((pa.field(name, pa.string(), metadata={JSON_TEXT: b"1"}),
                        pa.array(values, pa.string())))
    return columns


# ---- Parquet -------------------------------------------------------------------------------------

def _parquet_documents(chunk: Chunk, options: DatasetOptions) -> Documents:
    shard = chunk.shard
    fs, path = open_location(shard.input)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        text, id_field = options.text_field, options.id_field
        wanted = [n for n in schema.names
                  if n in (text, id_field) or (options.keep_fields and n not in (text, id_field))]
        table = _read_rows(parquet, wanted, chunk.start, chunk.stop)
    count = chunk.stop - chunk.start
    docs = Documents()
    ids = (_column_ids(table.column(id_field)) if id_field in table.column_names
           else [None] * count)
    texts, errors = _column_texts(table, options, count)
    for row, (doc_id, doc_text, error) in enumerate(zip(ids, texts, errors)):
        docs.add(f"{shard.name}:{chunk.start + row}" if doc_id is None else doc_id,
                 doc_text, error)
    if options.keep_fields:
        docs.fields = [(pa.field(passthrough_name(f.name), f.type), table.column(f.name)
                        .combine_chunks())
                       for f in table.schema if f.name not in (text, id_field)]
    return docs


def _read_rows(parquet: pq.ParquetFile, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows `start` to `stop` of the named columns, reading only the row groups that hold them."""
    schema = pa.schema([parquet.schema_arrow.field(n) for n in columns])
    groups, first, offset = [], 0, None
    for g in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(g).num_rows
        if first < stop and first + rows > start:
            groups.append(g)
            offset = first if offset is None else offset
        first += rows
    batches = []
    if groups and stop > start:
        for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
            lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
            if hi > lo:
                batches.append(batch.slice(lo, hi - lo))
            offset += batch.num_rows
            if offset >= stop:
                break
    return pa.Table.from_batches(batches, schema=schema)


def _is_text_type(kind: pa.DataType) -> bool:
    """Strings or bytes (decoded as UTF-8), in any of Arrow's layouts."""
    checks = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary",
              "is_binary_view")
    return any(getattr(pa.types, check, lambda _: False)(kind) for check in checks)


def _column_ids(column: pa.ChunkedArray) -> list[str | None]:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    return [None if v is None else _id_text(v, "") for v in _plain(column.to_pylist())]


def _plain(values: list) -> list:
    """Values JSON can write (dates and the like as their text)."""
    return [v if v is None or isinstance(v, (str, int, float, bool, list, dict)) else str(v)
            for v in values]


def _column_texts(table: pa.Table, options: DatasetOptions, count: int
                  ) -> tuple[list[str | None], list[str | None]]:
    """Each row's text or why there is none."""
    name = options.text_field
    if name not in table.column_names:
        return [None] * count, [f"no {name!r} column"] * count
    column = table.column(name)
    if pa.types.is_dictionary(column.type):  # e.g. a pandas category
        column = column.cast(column.type.value_type)
    if not _is_text_type(column.type):
        return [None] * count, [f"{name!r} is a {column.type} column, not text"] * count
    texts: list[str | None] = []
    errors: list[str | None] = []
    for value in column.cast(pa.large_binary()).to_pylist():
        text, error = None, None
        if value is None:
            error = f"{name!r} is null"
        elif len(value) > options.max_document_bytes:
            error = _too_long(len(value), options)
        else:
            try:
                text = value.decode("utf-8", options.errors)
            except UnicodeDecodeError as err:
                error = f"invalid UTF-8 at byte {err.start}"
        texts.append(text)
        errors.append(error)
    return texts, errors
