"""Score text with a bundle on onnxruntime: per text, or a whole corpus as carried BPTT streams.

Two ways to score, for two questions:

- `Scorer.score(texts)`: how likely is each text on its own? Every text starts from a zero state
  with `<eos>` as its context and is scored token by token (its own `<eos>` included). Many texts
  run together as the rows of one RowBatch (serve/row_batch.py, which the HTTP service uses
  too), each with its own state, padded and masked: the same numbers as scoring each alone.
- `Scorer.score_file(path)`: the perplexity of a corpus, exactly as training and
  `keraslm.evaluate` measure it: the token stream is cut into `batch_size` contiguous columns
  (the layout of `keraslm.batching` with `last_batch="keep"`), each column carries its LSTM state
  from one `bptt` chunk to the next, and every token with a predecessor in its column is a target
  once. The text is read and tokenized once: pass 1 writes its token ids (int32, 4 bytes a
  token) to an anonymous temporary file, and pass 2 reads every column's next ids from there, a
  block of chunks at a time. Memory stays bounded whatever the size of the corpus or the length
  of its lines (TextPipeline.iter_parts tokenizes a long line in pieces).

The continuous cache (serve/cache.py, `Scorer(cache=CacheSettings(...))`) mixes every target's
probability with a distribution over the words that followed the last positions of its own
stream: in `score_file` each column carries its cache from chunk to chunk like its LSTM state; in
`score_rows` (and so `score`, `score_samples`, --per-line) every row starts with an empty cache.
It needs the bundle's `hidden` output (bundles exported before it cannot use it).

Files are read as bytes, a chunk at a time; a NUL byte (no text has one: /dev/zero, a binary
file) stops the reading with a one-line UserError naming the file, the byte and the line.
Log-likelihoods are natural logs. This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np

from keraslm.contract import OUTPUT_HIDDEN, PAD_INPUT, PAD_TARGET
from keraslm.errors import UserError
from keraslm.files import open_binary
from keraslm.scores import CorpusScore, TextScore
from keraslm.text import TextPipeline
from serve.bundle import Bundle, load_bundle
from serve.cache import (
    CacheSettings,
    ContinuousCache,
    Recording,
    TuneResult,
    check_memory,
    plan,
    tune,
)
from serve.row_batch import RowBatch
from serve.session import DEVICES, State, choose_providers

__all__ = ["DEVICES", "CorpusScore", "Scorer", "TextBytes", "TextScore", "choose_providers"]

ENCODE_TOKENS = 1 << 16  # pass 1 encodes and writes this many tokens at a time
BLOCK_IDS = 1 << 20  # pass 2 reads about this many ids (over all columns) at a time
GROUP_TOKENS = 1 << 20  # score_samples scores at most this many tokens together (unless one
                        # sample has more)
_ID = np.dtype(np.int32)


class Scorer:
    """An onnxruntime session over a bundle, with its vocabulary and text pipeline.

    `pipeline` overrides the bundle's own (e.g. to read raw text with a model trained on
    WikiText); `batch_size` and `bptt` are the defaults of both scoring methods. `cache` turns
    the continuous cache on for every method (it can be changed later: `scorer.cache = ...`).
    `spin=False` keeps onnxruntime's idle threads from ever spinning, for a process that needs
    the cores between calls too (the HTTP service). By default they spin, except that with a
    `cache` given here and `batch_size` above 1 they stop spinning when a call ends, so the
    cache's threads get the cores (measured at window 2000 on 2 cores: 16.5 % -> 13.8 % slower
    than without the cache at batch 20; at batch 1 spinning was better, 7.5 % against 15.1 %).
    """

    def __init__(self, bundle_path: str | os.PathLike, *, device: str = "auto",
                 threads: int | None = None, batch_size: int = 20, bptt: int = 35,
                 pipeline: TextPipeline | None = None,
                 cache: CacheSettings | None = None, spin: bool | None = None) -> None:
        _check_positive(batch_size=batch_size, bptt=bptt)
        if threads is not None:
            _check_positive(threads=threads)
        if spin is None:
            # with the cache, threads spin within a call and sleep after it, so the cache's
            # threads mix while the network runs (at batch 1 calls are short: spinning pays)
            mode = "stop" if cache is not None and batch_size > 1 else "on"
        else:
            mode = "on" if spin else "off"
        self.bundle: Bundle = load_bundle(bundle_path, providers=choose_providers(device),
                                          threads=threads, spin=mode)
        self.session = self.bundle.session
        self.pipeline = pipeline or self.bundle.pipeline
        self.vocab = self.bundle.vocab
        self.batch_size = batch_size
        self.bptt = bptt
        self.context_id = self.vocab.token_to_id(self.pipeline.eos or "<eos>")
        self.cache = cache

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph."""
        return self.session.providers[0]

    @property
    def cache(self) -> CacheSettings | None:
        """The continuous cache's settings, or None (off)."""
        return self._cache

    @cache.setter
    def cache(self, settings: CacheSettings | None) -> None:
        if settings is not None:
            if not isinstance(settings, CacheSettings):
                raise TypeError(f"cache must be CacheSettings or None, got {settings!r}")
            self._require_hidden()
        self._cache = settings

    def _require_hidden(self) -> None:
        self.bundle.require_output(OUTPUT_HIDDEN, "the continuous cache")

    def _new_cache(self, batch: int, piece: int) -> ContinuousCache | None:
        if self._cache is None:
            return None
        check_memory(batch, self._cache.size, self.bundle.hidden_size, piece)
        return ContinuousCache(self._cache, batch, self.bundle.hidden_size, piece)

    # --- one network step ----------------------------------------------------------------------

    def zero_state(self, batch: int) -> State:
        return self.session.zero_state(batch)

    def step(self, tokens: np.ndarray, targets: np.ndarray, state: State
             ) -> tuple[np.ndarray, State]:
        """Log-probabilities of `targets` [batch, time] (0 at padding) and the state after."""
        return self.session.step(tokens, targets, state)

    def step_hidden(self, tokens: np.ndarray, targets: np.ndarray, state: State
                    ) -> tuple[np.ndarray, State, np.ndarray]:
        """`step`, and the last LSTM layer's output [batch, time, units] (the cache's keys)."""
        self._require_hidden()
        return self.session.step_hidden(tokens, targets, state)

    # --- texts, each on its own ----------------------------------------------------------------

    def score(self, texts: Sequence[str]) -> list[TextScore]:
        """Score each text on its own (tokenized by the pipeline); results in input order."""
        return self.score_tokens([list(itertools.chain.from_iterable(self.pipeline.process(t)))
                                  for t in texts])

    def score_tokens(self, token_lists: Sequence[Sequence[str]]) -> list[TextScore]:
        """Score each token list on its own, from a zero state with `<eos>` as context.

        Lists share batches of at most `batch_size` rows (see `score_rows`).
        """
        return self._score_encoded([self.vocab.encode(tokens, return_oov=True)
                                    for tokens in token_lists])

    def score_rows(self, rows: Sequence[np.ndarray], max_rows: int) -> list[np.ndarray]:
        """Per-token log-probabilities (float32) of every id row, each row scored on its own.

        Each row starts from a zero state with `<eos>` as its context (and an empty continuous
        cache, when it is on). The rows go through one RowBatch of at most `max_rows` rows,
        longest first; a row that ends leaves it and the next takes its place (serve/row_batch.py
        chooses each call's width). Only one call's inputs are built at a time: memory is the
        rows and their results. Results are in input order; an empty row gets an empty array.
        """
        out = [np.zeros(row.size, np.float32) for row in rows]
        waiting = sorted((i for i, row in enumerate(rows) if row.size),
                         key=lambda i: -rows[i].size)
        if not waiting:
            return out
        batch = RowBatch(self, min(max_rows, len(waiting)))
        waiting.reverse()  # the longest at the end: pop() takes it first
        while waiting or batch.rows:
            while waiting and batch.free:
                i = waiting.pop()
                batch.add(i, rows[i])
            for row in batch.step():
                out[row.key] = row.logprobs
        return out

    def _score_encoded(self, encoded: Sequence[tuple[np.ndarray, int]]) -> list[TextScore]:
        """TextScores of (ids, OOV count) pairs, `batch_size` rows to a batch."""
        logprobs = self.score_rows([ids for ids, _ in encoded], self.batch_size)
        return [TextScore(int(ids.size), int(oov), float(lp.sum(dtype=np.float64)))
                for (ids, oov), lp in zip(encoded, logprobs)]

    def score_samples(self, path: str | os.PathLike, errors: str = "strict", group: int = 512,
                      name: str | None = None) -> Iterator[TextScore]:
        """Stream a file's samples (lines, or sentences for raw text), each scored on its own.

        Samples are scored `group` at a time, fewer when they hold over GROUP_TOKENS tokens
        together. A long line is tokenized in pieces and encoded piece by piece: memory holds
        its ids and log-probabilities (8 bytes a token), never its tokens as strings. `name`
        stands for the file in messages (e.g. "<stdin>" for a temporary copy).
        """
        with _open_text(path, name) as source:
            batch: list[tuple[np.ndarray, int]] = []
            size = 0  # tokens in the batch
            for ids, oov in self._encoded_samples(source, errors):
                batch.append((ids, oov))
                size += ids.size
                if len(batch) >= group or size >= GROUP_TOKENS:
                    yield from self._score_encoded(batch)
                    batch, size = [], 0
            yield from self._score_encoded(batch)

    def _encoded_samples(self, source: TextBytes, errors: str
                         ) -> Iterator[tuple[np.ndarray, int]]:
        """Each sample's ids and OOV count, encoded part by part."""
        parts, oov = [], 0
        for tokens, last in self.pipeline.iter_parts(source, errors):
            ids, n = self.vocab.encode(tokens, return_oov=True)
            parts.append(ids)
            oov += n
            if last:
                yield (parts[0] if len(parts) == 1 else np.concatenate(parts)), oov
                parts, oov = [], 0

    # --- a corpus as carried streams ------------------------------------------------------------

    def score_file(self, path: str | os.PathLike, batch_size: int | None = None,
                   bptt: int | None = None, errors: str = "strict",
                   name: str | None = None) -> CorpusScore:
        """Perplexity of a corpus file in the column layout of keraslm.evaluate (see module doc).

        A stream of at most `batch_size` tokens (too short for keraslm.evaluate) is scored as one
        stream (the result records the batch size used). `name` stands for the file in messages
        and in the result.
        """
        name = str(path) if name is None else name
        bptt = self.bptt if bptt is None else bptt
        started = time.perf_counter()
        with self._columns(path, batch_size, bptt, errors, name) as (columns, num_oov):
            sums = self._score_columns(columns, bptt)
        return CorpusScore(
            source=name, model=str(self.bundle.path), pipeline=self.pipeline.describe(),
            runtime=self.provider, batch_size=columns.count, bptt=bptt,
            num_stream_tokens=columns.total, num_oov=num_oov,
            seconds=time.perf_counter() - started,
            cache=None if self._cache is None else self._cache.to_dict(), **sums)

    def record_file(self, path: str | os.PathLike, batch_size: int | None = None,
                    bptt: int | None = None, errors: str = "strict",
                    name: str | None = None) -> Recording:
        """Run the network once over a corpus in `score_file`'s layout and keep what the
        continuous cache needs (serve.cache.Recording: about 4 bytes a token per unit of the
        last LSTM layer), so that cache settings can be tried on it without running the
        network again."""
        self._require_hidden()
        name = str(path) if name is None else name
        bptt = self.bptt if bptt is None else bptt
        with self._columns(path, batch_size, bptt, errors, name) as (columns, _):
            recording = Recording(name, columns.count, bptt)
            for hidden, targets, logprobs in self._network(columns, bptt, hidden=True):
                recording.chunks.append((hidden, targets.copy(), logprobs))
        return recording

    def tune_cache(self, path: str | os.PathLike, size: int, batch_size: int | None = None,
                   bptt: int | None = None, errors: str = "strict",
                   name: str | None = None) -> TuneResult:
        """The cache's θ and λ for a window of `size`, tuned on a corpus (serve.cache.tune) in
        `score_file`'s layout. Tune on validation text; report on other text."""
        return tune(self.record_file(path, batch_size, bptt, errors, name), size)

    @contextlib.contextmanager
    def _columns(self, path: str | os.PathLike, batch_size: int | None, bptt: int, errors: str,
                 name: str) -> Iterator[tuple[_Columns, int]]:
        """Pass 1 over a corpus: its id columns (one when the text is shorter than the batch)
        and its OOV count."""
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_positive(batch_size=batch_size, bptt=bptt)
        with _temporary_ids() as ids:
            total, num_oov = self._write_ids(path, ids, errors, name)
            if total == 0:
                raise UserError(f"{name}: no tokens to score (empty file?)")
            if total == 1:
                raise UserError(f"{name}: a single token, nothing to predict it from")
            yield _Columns(ids, total, 1 if total <= batch_size else batch_size), num_oov

    def _write_ids(self, path: str | os.PathLike, out: IO[bytes], errors: str, name: str
                   ) -> tuple[int, int]:
        """Pass 1: tokenize the file and write its ids to `out`; (tokens, OOV tokens)."""
        total = num_oov = 0
        with _open_text(path, name) as source:
            tokens = self.pipeline.iter_tokens(source, errors)
            while True:
                ids, oov = self.vocab.encode(itertools.islice(tokens, ENCODE_TOKENS),
                                             return_oov=True)
                if not ids.size:
                    return total, num_oov
                out.write(ids.tobytes())
                total += ids.size
                num_oov += oov

    def _column_chunks(self, columns: _Columns, bptt: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pass 2's (tokens, targets) chunks, `bptt` steps of every column at a time."""
        num_batches = -(-(columns.length - 1) // bptt)
        per_block = max(1, BLOCK_IDS // (bptt * columns.count))  # chunks read at a time
        for first in range(0, num_batches, per_block):
            chunks = min(per_block, num_batches - first)
            block = columns.read(first * bptt, chunks * bptt + 1)
            for at in range(0, chunks * bptt, bptt):
                targets = block[:, at + 1:at + 1 + bptt]
                width = max(1, int(np.count_nonzero(targets != PAD_TARGET, axis=1).max()))
                targets = np.ascontiguousarray(targets[:, :width])
                tokens = np.where(targets == PAD_TARGET, PAD_INPUT, block[:, at:at + width])
                yield tokens, targets

    def _network(self, columns: _Columns, bptt: int, hidden: bool = False) -> Iterator[tuple]:
        """Pass 2's network, chunk by chunk with the state carried: (targets, logprobs), or
        (hidden, targets, logprobs) with `hidden`."""
        state = self.zero_state(columns.count)
        for tokens, targets in self._column_chunks(columns, bptt):
            if hidden:
                logprobs, state, last_layer = self.step_hidden(tokens, targets, state)
                yield last_layer, targets, logprobs
            else:
                logprobs, state = self.step(tokens, targets, state)
                yield targets, logprobs

    def _score_columns(self, columns: _Columns, bptt: int) -> dict[str, int | float]:
        """Pass 2: the NLL sums (CorpusScore fields) of the columns, chunk by chunk."""
        unk_id = self.vocab.unk_id
        num_unk = 0
        nll_sum = nll_unk = 0.0
        group, piece = plan(columns.count, bptt)
        cache = self._new_cache(columns.count, piece)
        if cache is None:
            scored = self._network(columns, bptt)
        else:  # the cache mixes `group` chunks at a time; each chunk is still summed on its own
            scored = cache.mix_chunks(self._network(columns, bptt, hidden=True), group)
        for targets, logprobs in scored:
            nll_sum -= float(logprobs.sum(dtype=np.float64))
            if unk_id is not None:
                is_unk = targets == unk_id
                num_unk += int(is_unk.sum())
                nll_unk -= float(logprobs[is_unk].sum(dtype=np.float64))
        return {"num_tokens": columns.total - columns.nonempty, "num_unk": num_unk,
                "nll_sum": nll_sum, "nll_sum_unk": nll_unk}


# --- the id stream of pass 1, read as columns ----------------------------------------------------

@contextlib.contextmanager
def _temporary_ids() -> Iterator[IO[bytes]]:
    """An anonymous temporary file for a corpus's ids; its failures (a full disk) are UserError."""
    try:
        with tempfile.TemporaryFile(prefix="keraslm-ids-") as f:
            yield f
    except OSError as err:
        raise UserError(f"the temporary file of token ids in {tempfile.gettempdir()} failed: "
                        f"{err.strerror or err}") from None


class _Columns:
    """`count` columns of `length` ids over a stream of `total` int32 ids in a file (the last
    columns shorter, or empty, as keraslm.batching lays them out)."""

    def __init__(self, f: IO[bytes], total: int, count: int) -> None:
        self.f, self.total, self.count = f, total, count
        self.length = -(-total // count)
        self.nonempty = -(-total // self.length)

    def read(self, start: int, width: int) -> np.ndarray:
        """Positions `start .. start+width` of every column, PAD_TARGET past a column's end."""
        block = np.full((self.count, width), PAD_TARGET, np.int32)
        for j in range(self.nonempty):
            first = j * self.length + start
            n = min(width, (j + 1) * self.length - first, self.total - first)
            if n > 0:
                self.f.seek(first * _ID.itemsize)
                if self.f.readinto(memoryview(block[j, :n]).cast("B")) != n * _ID.itemsize:
                    raise OSError("the temporary ids file is shorter than written")
        return block


# --- reading -----------------------------------------------------------------------------------

class TextBytes:
    """A binary stream for TextPipeline, read in chunks, refusing input that is not text.

    A NUL byte (which no text has) raises a one-line UserError naming the file, the byte and
    the line; so does a read error.
    """

    def __init__(self, f: IO[bytes], name: str) -> None:
        self.name = name  # TextPipeline names the file in its UTF-8 errors
        self._f = f
        self._offset = self._newlines = 0

    def read(self, size: int) -> bytes:
        """Up to `size` bytes (fewer at the end of the stream)."""
        try:
            data = self._f.read(size)
        except OSError as err:
            raise UserError(f"cannot read {self.name}: {err.strerror or err}") from None
        if (nul := data.find(0)) >= 0:
            raise UserError(f"{self.name}: binary file (NUL byte at byte {self._offset + nul}, "
                            f"line {self._newlines + data.count(10, 0, nul) + 1}); expected "
                            f"UTF-8 text")
        self._offset += len(data)
        self._newlines += data.count(10)
        return data


@contextlib.contextmanager
def _open_text(path: str | os.PathLike, name: str | None = None) -> Iterator[TextBytes]:
    """Open `path` for TextPipeline, with missing/unreadable as UserError."""
    name = str(path) if name is None else name
    with open_binary(path, name) as f:  # the body's OSErrors are not opening errors
        yield TextBytes(f, name)


# --- helpers -----------------------------------------------------------------------------------

def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
