"""The service behind the app: the model and its thread, tokenizing, batching, and the deadline.

Every score request carries one deadline, set when it arrived (`RequestContext`): reading the
body, tokenizing, waiting for a batch and scoring all count against it. Tokenizing runs on one
thread of its own, sample by sample, and stops as soon as a text passes the token limit, the
deadline passes or the client leaves; a request that gave up before its turn on that thread is
never tokenized, and one withdrawn from the queue is never scored: neither the tokenizer nor the
model works for nobody. Generation's prompt is tokenized the same way, under the same limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from keraslm.errors import UserError
from keraslm.scores import TextScore, finite_or_none
from serve.row_batch import RowBatch, calibrate
from serve.scorer import Scorer
from serve.web.access import Access
from serve.web.admission import Admission, Arrival, Ticket
from serve.web.batcher import Batcher, Job
from serve.web.metrics import Metrics
from serve.web.schemas import RETRY_AFTER, ScoreRequest, ServiceError, timeout_error
from serve.web.settings import Settings

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream for the server

INLINE_CHARS = 4096  # requests up to this much text are tokenized on the event loop (cheaper)
CALIBRATION_WORDS = 2000  # words per text timed at load time, for admission's first estimate
CALIBRATION_TEXTS = 4
GENERATION_THREADS = 4  # generations that sample at once, their model calls queued by turns


@dataclass
class RequestContext:
    """A model request whose body is in: its deadline (loop clock), its arrival and body size,
    and once `admit()`ted its ticket. The endpoint admits it after the checks that need no work
    (fields, limits, `check_token_bound`), so a request that could never be answered gets its
    4xx, not a 503 inviting it to retry."""

    deadline: float
    arrival: Arrival
    size: int
    ticket: Ticket | None = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def admit(self) -> Ticket:
        """Admit the request now; ServiceError 503 if the service cannot take it in time."""
        self.ticket = self.arrival.admit(self.size)
        return self.ticket

    def close(self) -> None:
        """Answered or abandoned: its place (and its bytes, if admitted) are free again."""
        self.arrival.close()
        if self.ticket is not None:
            self.ticket.close()


@dataclass
class _Encoded:
    ids: np.ndarray
    oov: int
    tokens: list[str] | None  # kept only for per_token answers


class Abandoned(Exception):
    """Tokenizing stopped: the deadline passed or the client left."""


class Service:
    """The model, its thread, the tokenizer thread, the batcher, admission and the metrics."""

    def __init__(self, settings: Settings, on_fatal: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.scorer: Scorer | None = None
        self.load_error: str | None = None
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.generation_threads = ThreadPoolExecutor(max_workers=GENERATION_THREADS,
                                                     thread_name_prefix="generate")
        self.batcher = Batcher(self.model_thread, max_batch=settings.max_batch,
                               max_wait=settings.max_wait_ms / 1000, coming=self._coming,
                               on_call=self._on_call, on_abandoned=self._on_abandoned)
        self.admission = Admission(settings.queue_size, settings.timeout,
                                   running=lambda: self.batcher.running)
        self.access = Access(settings)
        self._load_task: asyncio.Task | None = None
        self.stopping = asyncio.Event()  # set when the server starts to shut down
        self.closed = False  # set once the server has drained: work still running stops
        m = self.metrics = Metrics()
        m.gauge("keraslm_queue_depth", "requests waiting for the batch", lambda: self.batcher.depth)
        m.gauge("keraslm_batch_running_requests", "requests with texts in the batch",
                lambda: self.batcher.running)
        m.gauge("keraslm_requests_in_progress", "requests admitted and not yet answered",
                lambda: self.admission.in_flight)
        m.gauge("keraslm_requests_receiving", "requests whose body is still arriving",
                lambda: self.admission.receiving)
        m.gauge("keraslm_ready", "1 once the model is loaded", lambda: self.scorer is not None)

    @property
    def bundle_name(self) -> str:
        return self.settings.bundle.name

    def _coming(self) -> int:
        """Admitted requests still being parsed or tokenized."""
        return self.admission.waiting - self.batcher.depth

    # --- life cycle ---

    async def start(self) -> None:
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="load")

    async def stop(self) -> None:
        """After the server has drained: stop the batcher and any work still running (a
        generation stops at its next step), and wait for the threads without blocking the
        event loop."""
        self.closed = True
        await self.batcher.stop()
        if self._load_task is not None:
            await asyncio.wait([self._load_task])
        loop = asyncio.get_running_loop()
        for pool in (self.generation_threads, self.tokenizer_thread, self.model_thread):
            await loop.run_in_executor(None, lambda p=pool: p.shutdown(wait=True,
                                                                        cancel_futures=True))

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            batch = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, self._open)
        except Exception as err:  # a bundle problem, or anything onnxruntime raises
            self.load_error = str(err) if isinstance(err, UserError) else (
                f"cannot load {self.settings.bundle}: {type(err).__name__}: {err}")
            log.debug("loading failed", exc_info=True)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.batcher.use(batch)
        self.scorer = batch.scorer
        log.info("keraslm: bundle %s ready on %s in %.1f s", self.settings.bundle,
                 self.scorer.provider, time.perf_counter() - started)

    def _open(self) -> RowBatch:
        """Open the bundle on the model thread, run one batch (onnxruntime's first is slow),
        time a calibration text end to end for admission control's first estimate, and measure
        a call's fixed cost for the batch's choice of widths.

        onnxruntime's threads do not spin while waiting for work: the event loop and the
        tokenizer share the cores with them (measured 16 % more tokens/s at concurrency 32 on
        2 cores)."""
        s = self.settings
        scorer = Scorer(s.bundle, device=s.device, threads=s.threads, spin=False)
        ids = np.arange(scorer.bptt + 1, dtype=np.int32) % len(scorer.vocab)
        scorer.score_rows([ids, ids[:1]], s.max_batch)
        text = _calibration_text(scorer)
        started = time.perf_counter()
        encoded = _encode(scorer, [text] * CALIBRATION_TEXTS, 2 * CALIBRATION_WORDS,
                          lambda: False, per_token=False)
        scorer.score_rows([e.ids for e in encoded], s.max_batch)
        self.admission.record(len(text.encode()) * CALIBRATION_TEXTS,
                              time.perf_counter() - started)
        return RowBatch(scorer, s.max_batch, calibrate(scorer, s.max_batch))

    # --- scoring ---

    def _on_call(self, requests: int, texts: int, seconds: float) -> None:
        m = self.metrics
        m.batch_requests.observe(requests)
        m.batch_texts.observe(texts)
        m.batch_seconds.observe(seconds)

    def _on_abandoned(self, texts: int) -> None:
        self.metrics.texts_abandoned.inc(texts)

    def check_ready(self) -> Scorer:
        """The scorer, or ServiceError 503 while loading (or after loading failed)."""
        if self.scorer is not None:
            return self.scorer
        if self.load_error is not None:
            raise ServiceError(503, "not_ready", f"the model failed to load: {self.load_error}")
        raise ServiceError(503, "loading", "the model is still loading; retry shortly",
                           retry_after=RETRY_AFTER)

    async def score(self, body: ScoreRequest, ctx: RequestContext) -> dict:
        """The answer to one POST /v1/score (ServiceError for anything but 200)."""
        scorer = self.check_ready()
        s = self.settings
        if len(body.texts) > s.max_texts:
            raise ServiceError(413, "too_many_texts", f"{len(body.texts)} texts in one request; "
                               f"the limit is {s.max_texts} (max_texts)", limit="max_texts",
                               max=s.max_texts)
        _check_unicode(body.texts)
        for i, text in enumerate(body.texts):
            check_token_bound(scorer, text, s.max_tokens_per_text, f"texts[{i}]")
        ctx.admit()
        began, started = self.admission.clock(), time.perf_counter()
        try:
            encoded = await self.tokenize(scorer, body.texts, ctx, body.per_token)
        except ServiceError as err:
            if err.status in (413, 422):  # refused, but the tokenizer's time was spent
                self.admission.record(ctx.ticket.size, time.perf_counter() - started, began)
            raise
        tokenize_seconds = time.perf_counter() - started
        rows = [e.ids for e in encoded if e.ids.size]
        logprobs: list[np.ndarray] = []
        model_seconds = 0.0
        if rows:
            job = self.batcher.submit(rows, ctx.deadline)
            logprobs = await self._wait(job, ctx)
            model_seconds = job.model_seconds
        self.admission.record(ctx.ticket.size, tokenize_seconds + model_seconds, began)
        results, it = [], iter(logprobs)
        for e in encoded:
            lp = next(it) if e.ids.size else np.zeros(0, np.float32)
            results.append(_text_result(e, lp, scorer))
            self.metrics.tokens.inc(e.ids.size)
        self.metrics.texts.inc(len(encoded))
        return {"bundle": self.bundle_name, "results": results}

    async def tokenize(self, scorer: Scorer, texts: list[str], ctx: RequestContext,
                       per_token: bool = False, open_end: bool = False) -> list[_Encoded]:
        """Tokenize on the loop (small requests) or the tokenizer thread, within the deadline
        (504) and the token limit (413); 499 if the client leaves first. Work still queued for
        the thread when the request gives up never starts; work started stops at the next
        sample."""
        limit = self.settings.max_tokens_per_text
        loop = asyncio.get_running_loop()
        if sum(map(len, texts)) <= INLINE_CHARS:
            return _encode(scorer, texts, limit, lambda: False, per_token, open_end)
        stop = threading.Event()
        work = loop.run_in_executor(self.tokenizer_thread, _encode, scorer, texts, limit,
                                    stop.is_set, per_token, open_end)
        try:
            return await self.until(work, ctx)
        finally:
            stop.set()  # a no-op once done; otherwise the thread stops at the next sample
            work.cancel()  # not started yet: it never will
            work.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _wait(self, job: Job, ctx: RequestContext) -> list[np.ndarray]:
        """The job's log-probabilities; withdrawn from the queue if the request gives up."""
        try:
            return await self.until(job.future, ctx)
        except asyncio.TimeoutError:  # expired in the queue, or while in the batch
            raise timeout_error(self.settings.timeout) from None
        except UserError as err:
            raise ServiceError(500, "scoring_failed", str(err)) from None
        finally:
            if not job.future.done():
                self.batcher.withdraw(job)

    async def until(self, future: asyncio.Future, ctx: RequestContext):
        """`future`'s result, or 504 at the deadline, or 499 if the client left first."""
        loop = asyncio.get_running_loop()
        left = asyncio.ensure_future(ctx.disconnected.wait())
        try:
            done, _ = await asyncio.wait({future, left}, timeout=max(ctx.deadline - loop.time(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if future in done:
            return future.result()
        if left in done:
            raise ServiceError(499, "client_closed_request", "the client closed the connection")
        raise timeout_error(self.settings.timeout)


def _check_unicode(texts: list[str]) -> None:
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ServiceError(422, "invalid_text", f"texts[{i}] is not valid Unicode (a lone "
                               f"surrogate at character {err.start})") from None


def check_token_bound(scorer: Scorer, text: str, limit: int, what: str,
                      open_end: bool = False) -> None:
    """413 if `text` is sure to pass `limit` tokens, by a count that needs no tokenizing: every
    whitespace-separated word is at least one token (a token never spans whitespace), and in a
    pipeline of lines every line ends in `eos` (400,000 line breaks are 400,000 tokens)."""
    pipeline = scorer.pipeline
    fewest = len(text.split())
    if pipeline.eos and not pipeline.skip_empty:
        fewest += len(text.splitlines()) if pipeline.split == "lines" else int(bool(text))
    if fewest - int(open_end) > limit:
        raise _too_many_tokens(what, limit)


def _encode(scorer: Scorer, texts: list[str], limit: int, stopped: Callable[[], bool],
            per_token: bool, open_end: bool = False) -> list[_Encoded]:
    """Tokens and ids of each text, as Scorer.score tokenizes; 413 as soon as a text passes
    `limit` tokens, 422 for text the pipeline cannot take, Abandoned once `stopped()`.

    `open_end`: a prompt's tokens, as serve.generate.prompt_tokens gives them (the last
    sentence left open, without its `eos`, unless the text ends with a line break)."""
    pipeline = scorer.pipeline
    slack = int(open_end)  # the last eos, perhaps dropped at the end
    out = []
    for i, text in enumerate(texts):
        if stopped():
            raise Abandoned
        tokens: list[str] = []
        try:
            for sample in pipeline.samples(text):
                if stopped():
                    raise Abandoned
                if sample or not pipeline.skip_empty:
                    tokens.extend(pipeline.sample_tokens(sample))
                if len(tokens) > limit + slack:
                    raise _too_many_tokens(f"texts[{i}]", limit)
            if open_end and tokens and tokens[-1] == pipeline.eos and not text.endswith(
                    ("\n", "\r")):
                tokens.pop()
            if len(tokens) > limit:
                raise _too_many_tokens(f"texts[{i}]", limit)
            ids, oov = scorer.vocab.encode(tokens, return_oov=True)
        except (UserError, TimeoutError) as err:  # no <unk> for an unknown word; punkt's limit
            raise ServiceError(422, "unscorable_text", f"texts[{i}]: {err}") from None
        out.append(_Encoded(ids, oov, tokens if per_token else None))
    return out


def _too_many_tokens(what: str, limit: int) -> ServiceError:
    return ServiceError(413, "too_many_tokens", f"{what} has more than {limit} tokens; the "
                        f"limit is {limit} (max_tokens_per_text)", limit="max_tokens_per_text",
                        max=limit)


def _calibration_text(scorer: Scorer) -> str:
    """Vocabulary words in sentences: a text the pipeline tokenizes about as fast as real text."""
    words = [w for w in scorer.vocab.tokens[:1000] if w.isalpha()] or ["the"]
    chosen = [words[(i * 7919) % len(words)] for i in range(CALIBRATION_WORDS)]
    return " . ".join(" ".join(chosen[i:i + 12]) for i in range(0, CALIBRATION_WORDS, 12)) + " ."


def _text_result(e: _Encoded, logprobs: np.ndarray, scorer: Scorer) -> dict:
    """One text's answer; the numbers are TextScore's, as score.py --per-line writes them."""
    result = TextScore(int(e.ids.size), int(e.oov),
                       float(logprobs.sum(dtype=np.float64))).to_dict()
    # the names before 0.2, kept for one release (README: "HTTP API")
    result.update(tokens=result["num_tokens"], oov=result["num_oov"])
    if e.tokens is not None:
        vocab = scorer.vocab
        result["per_token"] = [{"token": t, "logprob": finite_or_none(float(x)),
                                "oov": t not in vocab}
                               for t, x in zip(e.tokens, logprobs.tolist())]
    return result
