"""Score a chunk: its documents (serve/dataset/documents.py) through one Scorer, into one Arrow
table with a row per document, in document order.

Columns: `id`; `num_tokens`, `num_oov`, `log_likelihood`, `perplexity` (a TextScore's fields,
exactly what `Scorer.score` gives for the text, null when not finite); `error` (null, or one line
saying why the document has no score); `cache` (the continuous cache's settings, only when it is
on: as `serve/score.py --per-line` records them); then the passed-through fields. Documents are
scored many to a `Scorer.score` call (its RowBatch keeps `batch_size` rows busy); if a call fails,
its documents are scored one by one, so only the one that fails gets an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyarrow as pa

from keraslm.errors import first_line
from keraslm.scores import TextScore
from keraslm.text import pipeline_for_format
from serve.dataset.documents import Documents, read_documents
from serve.dataset.plan import Chunk, DatasetOptions
from serve.scorer import Scorer

CALL_DOCUMENTS = 1024  # documents per Scorer.score call, at most
CALL_CHARS = 4 << 20  # characters of text per Scorer.score call, at most (unless one has more)

CACHE_TYPE = pa.struct([("size", pa.int64()), ("theta", pa.float64()),
                        ("lambda", pa.float64())])


def output_schema(options: DatasetOptions) -> pa.Schema:
    """The columns every output has (before the passed-through fields)."""
    columns = [("id", pa.string()), ("num_tokens", pa.int64()), ("num_oov", pa.int64()),
               ("log_likelihood", pa.float64()), ("perplexity", pa.float64()),
               ("error", pa.string())]
    if options.cache is not None:
        columns.append(("cache", CACHE_TYPE))
    return pa.schema(columns)


def open_scorer(bundle_path: str | os.PathLike, options: DatasetOptions,
                threads: int | None = None) -> Scorer:
    """The Scorer a worker scores with: the bundle, the options' text format, cache, batch size
    and device, and `threads` onnxruntime threads (None: all cores)."""
    pipeline = pipeline_for_format(options.text_format) if options.text_format else None
    return Scorer(bundle_path, device=options.device, threads=threads,
                  batch_size=options.batch_size, pipeline=pipeline, cache=options.cache)


def score_chunk(scorer: Scorer, chunk: Chunk, options: DatasetOptions) -> pa.Table:
    """The output rows of `chunk`'s documents (see the module docstring). A document that cannot
    be read or scored has an error and null numbers; a shard that cannot be read at all is a
    UserError naming it."""
    docs = read_documents(chunk, options)
    scores = score_texts(scorer, docs.texts, docs.errors)
    return _table(docs, scores, options)


def score_texts(scorer: Scorer, texts: Sequence[str | None], errors: list[str | None]
                ) -> list[TextScore | None]:
    """`scorer.score` of every text that is not None, many to a call; a text whose scoring fails
    gets its reason in `errors` (changed in place) and None."""
    scores: list[TextScore | None] = [None] * len(texts)
    group: list[int] = []
    chars = 0
    for i, text in enumerate(texts):
        if text is None:
            continue
        group.append(i)
        chars += len(text)
        if len(group) >= CALL_DOCUMENTS or chars >= CALL_CHARS:
            _score_group(scorer, texts, group, scores, errors)
            group, chars = [], 0
    _score_group(scorer, texts, group, scores, errors)
    return scores


def _score_group(scorer: Scorer, texts: Sequence[str | None], group: list[int],
                 scores: list[TextScore | None], errors: list[str | None]) -> None:
    if not group:
        return
    try:
        results = scorer.score([texts[i] for i in group])
    except Exception:  # noqa: BLE001 - find the document that fails: score them one by one
        for i in group:
            try:
                scores[i] = scorer.score([texts[i]])[0]
            except Exception as err:  # noqa: BLE001 - recorded: one document never drops a shard
                errors[i] = f"cannot score: {first_line(err)}"
        return
    for i, result in zip(group, results):
        scores[i] = result


def _table(docs: Documents, scores: Sequence[TextScore | None], options: DatasetOptions
           ) -> pa.Table:
    schema = output_schema(options)
    numbers = [s.to_dict() if s is not None else {} for s in scores]
    columns = {"id": docs.ids, "error": docs.errors}
    for name in ("num_tokens", "num_oov", "log_likelihood", "perplexity"):
        columns[name] = [d.get(name) for d in numbers]
    arrays = [pa.array(columns[f.name], f.type) for f in schema if f.name != "cache"]
    fields = [f for f in schema if f.name != "cache"]
    if options.cache is not None:
        arrays.append(pa.array([options.cache.to_dict()] * len(docs.ids), CACHE_TYPE))
        fields.append(schema.field("cache"))
    for field, array in docs.fields:
        fields.append(field)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
