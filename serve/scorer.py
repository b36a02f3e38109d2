"""Score text with a bundle on onnxruntime: per text, or a whole corpus as carried BPTT streams.

Two ways to score, for two questions:

- `Scorer.score(texts)`: how likely is each text on its own? Every text starts from a zero state
  with `<eos>` as its context and is scored token by token (its own `<eos>` included). Many texts
  run together as the rows of one batch, padded at the end and masked, which gives the same
  numbers as scoring each alone.
- `Scorer.score_file(path)`: the perplexity of a corpus, exactly as training and
  `keraslm.evaluate` measure it: the token stream is cut into `batch_size` contiguous columns
  (the layout of `keraslm.batching` with `last_batch="keep"`), each column carries its LSTM state
  from one `bptt` chunk to the next, and every token with a predecessor in its column is a target
  once. Memory does not grow with the corpus: pass 1 streams the file to count its tokens and
  remember a bounded set of restart points; pass 2 reads every column through its own reader,
  started at the restart point nearest its first token. With one sample per line a reader seeks
  to a line; with punkt sentences it re-runs punkt from the top (punkt places a sentence start by
  the text before it), skipping whole sentences untokenized: that costs about batch_size / 2
  extra punkt passes over the file.

Log-likelihoods are natural logs. This module never imports TensorFlow.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from keraslm.errors import UserError
from keraslm.text import TextPipeline
from serve.bundle import MODEL_FILE, Bundle, load_bundle

DEVICES = ("auto", "cpu", "cuda")
PAD_INPUT, PAD_TARGET = 0, -1  # as keraslm.batching
MAX_RESTART_POINTS = 1024
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class TextScore:
    """One text scored on its own: `<eos>` as context, then every token of the text."""

    num_tokens: int        # tokens scored (the text's own bos/eos included)
    num_oov: int           # of those, not in the vocabulary (scored as <unk>)
    log_likelihood: float  # natural log, summed over the tokens

    @property
    def perplexity(self) -> float:
        return _perplexity(-self.log_likelihood, self.num_tokens)

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": _finite_or_none(self.perplexity)}


@dataclass(frozen=True)
class CorpusScore:
    """A corpus scored as `batch_size` carried streams (the layout of keraslm.evaluate)."""

    source: str
    bundle: str
    pipeline: str          # TextPipeline.describe() of the pipeline used
    provider: str          # onnxruntime execution provider
    batch_size: int
    bptt: int
    num_stream_tokens: int  # tokens in the text
    num_tokens: int        # targets scored: every stream token but the first of each column
    num_oov: int           # stream tokens not in the vocabulary (as keraslm.evaluate counts)
    num_unk: int           # targets that are <unk> (out-of-vocabulary or a literal <unk>)
    nll_sum: float         # natural log
    nll_sum_unk: float     # the part of nll_sum from <unk> targets
    seconds: float

    @property
    def oov_rate(self) -> float:
        return self.num_oov / max(self.num_stream_tokens, 1)

    @property
    def avg_nll(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean NLL over all targets, <unk> included)."""
        return _perplexity(self.nll_sum, self.num_tokens)

    @property
    def perplexity_excl_unk(self) -> float:
        """exp(mean NLL over the targets that are not <unk>): KenLM's "excluding OOVs"."""
        return _perplexity(self.nll_sum - self.nll_sum_unk, self.num_tokens - self.num_unk)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        derived = {name: _finite_or_none(getattr(self, name)) for name in (
            "oov_rate", "avg_nll", "perplexity", "perplexity_excl_unk", "tokens_per_second")}
        return {**asdict(self), **derived}


def choose_providers(device: str) -> list[str]:
    """onnxruntime providers for `device`; asks what is installed first, so no GPU means no noise."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device != "cpu":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise UserError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                            "(install onnxruntime-gpu, e.g. `pip install keraslm[gpu]`)")
    return ["CPUExecutionProvider"]


class Scorer:
    """An onnxruntime session over a bundle, with its vocabulary and text pipeline.

    `pipeline` overrides the bundle's own (e.g. to read raw text with a model trained on
    WikiText); `batch_size` and `bptt` are the defaults of both scoring methods.
    """

    def __init__(self, bundle_path: str | os.PathLike, *, device: str = "auto",
                 threads: int | None = None, batch_size: int = 20, bptt: int = 35,
                 pipeline: TextPipeline | None = None) -> None:
        _check_positive(batch_size=batch_size, bptt=bptt)
        if threads is not None:
            _check_positive(threads=threads)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.bundle: Bundle = load_bundle(bundle_path, providers=choose_providers(device),
                                          options=options)
        self.pipeline = pipeline or self.bundle.pipeline
        self.vocab = self.bundle.vocab
        self.batch_size = batch_size
        self.bptt = bptt
        self.context_id = self.vocab.token_to_id(self.pipeline.eos or "<eos>")
        self._state_names = self.bundle.state_names
        self._outputs = ["logprobs", *(f"{s}_out" for s in self._state_names)]

    @property
    def provider(self) -> str:
        return self.bundle.providers[0]

    # --- one network step ----------------------------------------------------------------------

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.bundle.nhid), np.float32) for _ in self._state_names]

    def step(self, tokens: np.ndarray, targets: np.ndarray, state: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Log-probabilities of `targets` [batch, time] (0 at padding) and the state after."""
        feed = {"tokens": tokens, "targets": targets, **dict(zip(self._state_names, state))}
        try:
            logprobs, *new_state = self.bundle.session.run(self._outputs, feed)
        except _ORT_ERRORS as err:  # e.g. a token id the graph has no row for
            raise UserError(f"{self.bundle.path / MODEL_FILE}: onnxruntime failed "
                            f"({_first_line(err)})") from None
        return logprobs, new_state

    # --- texts, each on its own ----------------------------------------------------------------

    def score(self, texts: Sequence[str]) -> list[TextScore]:
        """Score each text on its own (tokenized by the pipeline); results in input order."""
        return self.score_tokens([list(itertools.chain.from_iterable(self.pipeline.process(t)))
                                  for t in texts])

    def score_tokens(self, token_lists: Sequence[Sequence[str]]) -> list[TextScore]:
        """Score each token list on its own, from a zero state with `<eos>` as context.

        Lists of similar length share a batch (longest first); rows are padded at the end, so
        padding never influences a real position.
        """
        encoded = [self.vocab.encode(tokens, return_oov=True) for tokens in token_lists]
        order = sorted(range(len(encoded)), key=lambda i: -encoded[i][0].size)
        results: list[TextScore | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            group = order[start:start + self.batch_size]
            sums = self._score_rows([encoded[i][0] for i in group])
            for i, ll in zip(group, sums):
                ids, oov = encoded[i]
                results[i] = TextScore(int(ids.size), int(oov), float(ll))
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        """Summed log-probabilities of each id row, scored from scratch in one padded batch."""
        width = max(row.size for row in rows)
        tokens = np.full((len(rows), max(width, 1)), PAD_INPUT, np.int32)
        targets = np.full_like(tokens, PAD_TARGET)
        for r, ids in enumerate(rows):
            if ids.size:
                tokens[r, 0] = self.context_id
                tokens[r, 1:ids.size] = ids[:-1]
                targets[r, :ids.size] = ids
        sums = np.zeros(len(rows), np.float64)
        state = self.zero_state(len(rows))
        for t in range(0, width, self.bptt):
            logprobs, state = self.step(tokens[:, t:t + self.bptt], targets[:, t:t + self.bptt],
                                        state)
            sums += logprobs.sum(axis=1, dtype=np.float64)
        return sums

    def score_samples(self, path: str | os.PathLike, errors: str = "strict", group: int = 512,
                      name: str | None = None) -> Iterator[TextScore]:
        """Stream a file's samples (lines, or sentences for raw text), each scored on its own.

        `name` stands for the file in messages (e.g. "<stdin>" for a temporary copy).
        """
        with _open_text(path, name=name) as lines:
            samples = self.pipeline.iter_processed(lines, errors)
            while chunk := list(itertools.islice(samples, group)):
                yield from self.score_tokens(chunk)

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
        batch_size = self.batch_size if batch_size is None else batch_size
        bptt = self.bptt if bptt is None else bptt
        _check_positive(batch_size=batch_size, bptt=bptt)
        started = time.perf_counter()
        total, restarts = self._count(path, errors, name)
        if total == 0:
            raise UserError(f"{name}: no tokens to score (empty file?)")
        if total == 1:
            raise UserError(f"{name}: a single token, nothing to predict it from")
        if total <= batch_size:
            batch_size = 1
        column_length = -(-total // batch_size)
        num_batches = -(-(column_length - 1) // bptt)
        nonempty_columns = -(-total // column_length)
        unk_id = self.vocab.unk_id
        num_oov = num_unk = 0
        nll_sum = nll_unk = 0.0
        read = 0
        with contextlib.ExitStack() as stack:
            columns = []
            for j in range(batch_size):
                first = j * column_length
                length = max(0, min(column_length, total - first))
                columns.append(self._column(stack, path, restarts, first, length, errors, name))
            prev = np.zeros(batch_size, np.int32)
            for j, column in enumerate(columns):
                ids, oov = self.vocab.encode(itertools.islice(column, 1), return_oov=True)
                prev[j] = ids[0] if ids.size else PAD_INPUT
                num_oov += oov
                read += ids.size
            state = self.zero_state(batch_size)
            for _ in range(num_batches):
                tokens = np.full((batch_size, bptt), PAD_INPUT, np.int32)
                targets = np.full_like(tokens, PAD_TARGET)
                width = 1
                for j, column in enumerate(columns):
                    ids, oov = self.vocab.encode(itertools.islice(column, bptt), return_oov=True)
                    if ids.size:
                        tokens[j, 0] = prev[j]
                        tokens[j, 1:ids.size] = ids[:-1]
                        targets[j, :ids.size] = ids
                        prev[j] = ids[-1]
                        width = max(width, ids.size)
                        num_oov += oov
                        read += ids.size
                logprobs, state = self.step(tokens[:, :width], targets[:, :width], state)
                nll_sum -= float(logprobs.sum(dtype=np.float64))
                if unk_id is not None:
                    is_unk = targets[:, :width] == unk_id
                    num_unk += int(is_unk.sum())
                    nll_unk -= float(logprobs[is_unk].sum(dtype=np.float64))
        if read != total:
            raise UserError(f"{name}: changed while being scored ({total} tokens, then {read})")
        return CorpusScore(
            source=name, bundle=str(self.bundle.path), pipeline=self.pipeline.describe(),
            provider=self.provider, batch_size=batch_size, bptt=bptt, num_stream_tokens=total,
            num_tokens=total - nonempty_columns, num_oov=int(num_oov),
            num_unk=num_unk, nll_sum=nll_sum, nll_sum_unk=nll_unk,
            seconds=time.perf_counter() - started)

    def _count(self, path: str | os.PathLike, errors: str, name: str
               ) -> tuple[int, _RestartPoints]:
        """Pass 1: the number of tokens, and restart points spread over the stream.

        With one sample per line a restart point is a line's byte offset; with sentences (punkt
        needs the text before a sentence to place its start) it is a sample count from the top.
        """
        restarts = _RestartPoints()
        total = 0
        by_line = self.pipeline.split == "lines"

        def at_line(offset: int, raw: bytes) -> None:
            if offset == 0 or not raw.startswith(_BOM):  # text.py strips a BOM on line 1 only
                restarts.add(_RestartPoint(offset, 0, total))

        with _open_text(path, name=name, on_line=at_line if by_line else None) as lines:
            for n, tokens in enumerate(self.pipeline.iter_processed(lines, errors)):
                if not by_line:
                    restarts.add(_RestartPoint(0, n, total))
                total += len(tokens)
        return total, restarts

    def _column(self, stack: contextlib.ExitStack, path: str | os.PathLike,
                restarts: _RestartPoints, first: int, length: int, errors: str, name: str
                ) -> Iterator[str]:
        """Tokens `first .. first+length` of the stream, read from the nearest restart point."""
        if length == 0:
            return iter(())
        point = restarts.before(first)
        lines = stack.enter_context(_open_text(path, name=name, offset=point.offset))
        kept = (s for s in self.pipeline.iter_samples(lines, errors)
                if s or not self.pipeline.skip_empty)  # counted as pass 1 counts them
        samples = itertools.islice(kept, point.samples, None)
        tokens = itertools.chain.from_iterable(map(self._sample_tokens, samples))
        skip = first - point.tokens
        return itertools.islice(tokens, skip, skip + length)

    def _sample_tokens(self, sample: str) -> list[str]:
        """A sample's tokens with bos/eos, as TextPipeline.iter_processed makes them."""
        p = self.pipeline
        return [*([p.bos] if p.bos else []), *p.tokenize(sample), *([p.eos] if p.eos else [])]


# --- restart points ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _RestartPoint:
    """Reading from byte `offset` and dropping `samples` samples reaches stream token `tokens`."""

    offset: int
    samples: int
    tokens: int


class _RestartPoints:
    """At most MAX_RESTART_POINTS evenly thinned restart points (every `stride`-th candidate)."""

    def __init__(self) -> None:
        self.points: list[_RestartPoint] = []
        self._tokens: list[int] = []
        self._stride = 1
        self._seen = 0

    def add(self, point: _RestartPoint) -> None:
        if self._seen % self._stride == 0:
            self.points.append(point)
            self._tokens.append(point.tokens)
            if len(self.points) > MAX_RESTART_POINTS:
                self.points, self._tokens = self.points[::2], self._tokens[::2]
                self._stride *= 2
        self._seen += 1

    def before(self, token: int) -> _RestartPoint:
        """The last restart point at or before stream position `token`."""
        return self.points[bisect.bisect_right(self._tokens, token) - 1]


# --- reading -----------------------------------------------------------------------------------

class _Lines:
    """A binary file's lines (for TextPipeline to decode), rejecting binary files (NUL bytes)."""

    def __init__(self, f: IO[bytes], name: str, offset: int = 0,
                 on_line: Callable[[int, bytes], None] | None = None) -> None:
        self.name = name  # TextPipeline names the file in its UTF-8 errors
        self._f, self._start, self._offset, self._on_line = f, offset, offset, on_line

    def __iter__(self) -> Iterator[bytes]:
        for number, raw in enumerate(self._f, start=1):
            if b"\0" in raw:
                where = f"byte {self._offset + raw.index(0)}"
                if self._start == 0:  # line numbers are known only when reading from the top
                    where += f", line {number}"
                raise UserError(f"{self.name}: binary file (NUL byte at {where}); "
                                f"expected UTF-8 text")
            if self._on_line is not None:
                self._on_line(self._offset, raw)
            yield raw
            self._offset += len(raw)


@contextlib.contextmanager
def _open_text(path: str | os.PathLike, *, name: str | None = None, offset: int = 0,
               on_line: Callable[[int, bytes], None] | None = None) -> Iterator[_Lines]:
    """Open `path` for TextPipeline at byte `offset`, with missing/unreadable as UserError."""
    name = str(path) if name is None else name
    try:
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            yield _Lines(f, name, offset, on_line)
    except FileNotFoundError:
        raise UserError(f"file not found: {name}") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, not a text file") from None
    except OSError as err:
        raise UserError(f"cannot read {name}: {err.strerror or err}") from None


# --- helpers -----------------------------------------------------------------------------------

_ORT_ERRORS = (_ort_state.Fail, _ort_state.InvalidArgument, _ort_state.RuntimeException)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _perplexity(nll_sum: float, count: int) -> float:
    if count <= 0:
        return math.nan
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN or infinity: report them as null."""
    return x if math.isfinite(x) else None


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
