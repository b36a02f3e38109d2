"""The continuous cache (Grave et al., ICLR 2017): a trained LM scores lower with no retraining.

Each target w at position t, whose hidden state is h_t (the last LSTM layer's output, the
decoder's input), gets the model's probability mixed with a distribution over the words that
followed the last `size` positions i of the same stream, weighted by the similarity of their
hidden states:

    p(w) = (1 - λ) p_model(w) + λ p_cache(w)
    p_cache(w) = Σ_{i in window, w_{i+1} = w} exp(θ h_t·h_i) / Σ_{i in window} exp(θ h_t·h_i)

p_cache(w) is 0 when the window is empty or no position in it was followed by w; the mixed
probability is then (1 - λ) p_model(w). Only the target's probability is needed, so the model's
log-probability of the target (what the graph returns) is enough: the mixing is done in log
space, logaddexp(log(1 - λ) + log p_model, log λ + log p_cache), which with λ = 0 returns the
model's log-probability bit for bit, and with λ = 1 gives -inf wherever the cache has no
occurrence of the target (an honest infinite perplexity).

The cache is per stream: `StreamCache` is a ring buffer of (hidden state, next word) pairs for each
row of a batch, carried from one chunk to the next exactly like the LSTM state and dropped where
that state is dropped. Padding positions never enter it. Positions are mixed a piece at a time,
a stream at a time: one [piece x (piece - 1 + size)] similarity matmul against the run of keys
the piece's windows cover, each position's window a band of it (a strided view: no mask), and a
sum of exponentials over it; nothing loops over tokens. Streams are mixed on as many threads as
there are cores (the network and the cache take turns on them). A corpus's chunks are grouped
into pieces of up to MAX_PIECE positions (`plan`), which amortizes NumPy's per-call cost and
feeds the matmul more rows; the numbers do not depend on the grouping beyond float32 round-off.

One difference from GluonNLP's `CacheCell` (`cache_language_model.py`): GluonNLP turns the cache on
only once a stream has seen `size` positions; here a partly filled window is used from the
second position on.

Tuning: `Recording` keeps what one run of the network over a text leaves for the cache (hidden
states, targets, the model's log-probabilities, per chunk), and `tune` searches θ and λ on it in
numpy without running the network again. This module imports numpy only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from keraslm.contract import PAD_TARGET
from keraslm.errors import UserError
from keraslm.scores import perplexity

MAX_CACHE_BYTES = 4 << 30  # refuse a cache (ring buffers and one piece's work) bigger than this
MAX_PIECE = 256  # positions of a stream mixed at once, at most
PIECE_WORK = 3072  # ... and at most about this many over all streams (the ring has room for a piece)
# Streams are mixed on this many threads (NumPy releases the GIL in the matmuls and elementwise
# loops that do most of the work), as many as the cores onnxruntime's network runs on: the
# network and the cache take turns, so the cores would otherwise idle while the cache works.
_WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)
_POOL: list[ThreadPoolExecutor] = []
# A row of exponents whose largest is in this range is exponentiated as it is: its sum is a
# normal float32 far from overflow, and terms small enough to go subnormal (below -87) are
# below 1e-29 of it. Other rows are shifted by their largest first.
_SAFE_LOW, _SAFE_HIGH = np.float32(-20.0), np.float32(60.0)


@dataclass(frozen=True)
class CacheSettings:
    """The continuous cache's window (`size` positions), flatness `theta` and weight `lam`."""

    size: int
    theta: float
    lam: float

    def __post_init__(self) -> None:
        if not (isinstance(self.size, (int, np.integer)) and not isinstance(self.size, bool)
                and self.size >= 1):
            raise UserError(f"cache-size must be a positive integer, got {self.size!r}")
        if not (_is_number(self.theta) and self.theta >= 0):
            raise UserError(f"cache-theta must be a finite number >= 0, got {self.theta!r}")
        if not (_is_number(self.lam) and 0 <= self.lam <= 1):
            raise UserError(f"cache-lambda must be a number in [0, 1], got {self.lam!r}")

    def to_dict(self) -> dict:
        return {"size": int(self.size), "theta": float(self.theta), "lambda": float(self.lam)}

    def describe(self) -> str:
        return f"window {self.size}, theta {self.theta:g}, lambda {self.lam:g}"

    def flags(self) -> str:
        """The score.py flags that select these settings."""
        return f"--cache-size {self.size} --cache-theta {self.theta:g} --cache-lambda {self.lam:g}"


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and math.isfinite(x))


def plan(batch: int, bptt: int) -> tuple[int, int]:
    """(chunks mixed together, piece) for `batch` streams scored `bptt` positions at a time:
    whole chunks up to about min(MAX_PIECE, PIECE_WORK / batch) positions a stream, and a
    longer chunk cut into pieces of that size."""
    target = max(8, min(MAX_PIECE, PIECE_WORK // batch))
    group = max(1, target // bptt)
    return group, min(group * bptt, target) if bptt <= target else target


def check_memory(batch: int, size: int, units: int, piece: int) -> None:
    """UserError when a cache for `batch` streams would need more than MAX_CACHE_BYTES."""
    need = batch * (size + piece) * (4 * units + 4) + _WORKERS * piece * (size + piece) * 8
    if need > MAX_CACHE_BYTES:
        raise UserError(f"a cache of {size} positions for {batch} streams of {units} units needs "
                        f"about {need / 2**30:.1f} GiB (limit {MAX_CACHE_BYTES / 2**30:.0f}): "
                        f"use a smaller --cache-size or --batch-size")


# --- mixing ------------------------------------------------------------------------------------

def mix(model_logprobs: np.ndarray, cache_logprobs: np.ndarray, lam: float,
        scored: np.ndarray) -> np.ndarray:
    """log((1 - λ) p_model + λ p_cache) as float32, 0 where not `scored` (padding).

    λ = 0 returns the model's log-probabilities exactly: logaddexp(x + 0, -inf) is x.
    """
    keep = math.log1p(-lam) if lam < 1 else -math.inf
    use = math.log(lam) if lam > 0 else -math.inf
    mixed = np.logaddexp(keep + model_logprobs.astype(np.float64), use + cache_logprobs)
    return np.where(scored, mixed, 0.0).astype(np.float32)


def _exp(exponents: np.ndarray, top: np.ndarray) -> None:
    """exp(exponents - shift) in place, row by row, where each row's shift is 0 when its
    largest exponent `top` is in [_SAFE_LOW, _SAFE_HIGH] (most rows: no pass to shift them),
    else `top`. The shift cancels in p_cache (a ratio of sums of one row's terms)."""
    unsafe = (top < _SAFE_LOW) | (top > _SAFE_HIGH)
    if unsafe.any():
        exponents -= np.where(unsafe, top, np.float32(0))[:, None]
    np.exp(exponents, out=exponents)


# --- the per-stream ring buffer ---------------------------------------------------------------

class StreamCache:
    """The last `size` (hidden state, next word) pairs of each of `batch` streams, and room for
    one more piece of at most `piece` positions.

    A piece is added first and its windows computed after, so that the keys of its own earlier
    positions are in place: what the piece overwrites is older than any of its windows reach.
    A stream's scored positions are numbered from 0 (its rank) and rank r lives in slot
    r mod slots, so the window of a position, the `size` ranks before it, is a run of slots
    (modulo the ring). Hidden states are stored transposed, [B, H, slots], so that a run of keys
    is one matrix operand.
    """

    def __init__(self, batch: int, size: int, units: int, piece: int,
                 capacity: int | None = None) -> None:
        self.size, self.piece = size, piece
        self.slots = size + piece
        capacity = max(batch, capacity or 0)
        self.keys = np.zeros((capacity, units, self.slots), np.float32)
        self.words = np.full((capacity, self.slots), PAD_TARGET, np.int32)
        self.count = np.zeros(capacity, np.int64)  # positions each stream has scored
        self.streams = np.arange(batch)  # the buffer row of each stream, in batch order
        self._ones = np.ones(size, np.float32)

    @property
    def batch(self) -> int:
        return self.streams.size

    def keep(self, streams: list[int] | np.ndarray) -> None:
        """Keep only `streams` (indices, in their new order): the others have ended."""
        self.streams = self.streams[np.asarray(streams, dtype=np.int64)]

    def add_streams(self, n: int) -> None:
        """Append `n` empty streams, in buffer rows no stream uses (growing it if need be)."""
        free = np.setdiff1d(np.arange(self.count.size), self.streams)
        if free.size < n:
            grow = max(n - free.size, self.count.size)
            self.keys = np.concatenate(
                [self.keys, np.zeros((grow, *self.keys.shape[1:]), np.float32)])
            self.words = np.concatenate([self.words, np.full((grow, self.slots), PAD_TARGET,
                                                             np.int32)])
            self.count = np.concatenate([self.count, np.zeros(grow, np.int64)])
            free = np.setdiff1d(np.arange(self.count.size), self.streams)
        new = free[:n]
        self.keys[new] = 0.0
        self.words[new] = PAD_TARGET
        self.count[new] = 0
        self.streams = np.concatenate([self.streams, new])

    def add(self, hidden: np.ndarray, targets: np.ndarray, thetas: Sequence[float]
            ) -> np.ndarray:
        """Add a piece's scored positions; log p_cache(target) of each for each θ.

        `hidden` [B, T, H] and `targets` [B, T] (padding < 0, never added), T <= piece. Returns
        [len(thetas), B, T] float64: -inf where the window is empty or lacks the target, and at
        padding.
        """
        if targets.shape[1] > self.piece:
            raise ValueError(f"a piece has at most {self.piece} positions, got {targets.shape[1]}")
        hidden = np.asarray(hidden, dtype=np.float32)
        scored = targets != PAD_TARGET
        start = self.count[self.streams]
        ranks = start[:, None] + np.cumsum(scored, axis=1) - scored
        rows, cols = np.nonzero(scored)
        slots = ranks[rows, cols] % self.slots
        self.keys[self.streams[rows], :, slots] = hidden[rows, cols]
        self.words[self.streams[rows], slots] = targets[rows, cols]
        self.count[self.streams] = start + scored.sum(axis=1)

        out = np.full((len(thetas), *targets.shape), -np.inf)
        split = -(-_WORKERS // self.batch)  # bands a stream's piece is cut into: 1 unless few
        bands = [(b, cols, int(ranks[b, cols[0]])) for b in range(self.batch)
                 for cols in np.array_split(np.flatnonzero(scored[b]), split) if cols.size]

        def run(band: tuple[int, np.ndarray, int]) -> None:
            b, cols, first = band
            out[:, b, cols] = self._band(int(self.streams[b]), first, hidden[b, cols],
                                         targets[b, cols], thetas)

        for _ in _map(run, bands):
            pass
        return out

    def _band(self, stream: int, first: int, hidden: np.ndarray, targets: np.ndarray,
              thetas: Sequence[float]) -> np.ndarray:
        """log p_cache [len(thetas), n] of n consecutive positions of the stream in buffer row
        `stream`, ranks `first` onwards, already in the buffer.

        Row t's window is the ranks first + t - w .. first + t - 1 (w: the widest window among
        the rows), so one [n, n - 1 + w] matmul against that run of keys holds every window
        as a band: row t's are columns t .. t + w - 1, read as a strided [n, w] view (no mask).
        Ranks below 0 (in a stream's first positions' windows) are empty: -inf.
        """
        n = targets.size
        width = min(self.size, first + n - 1)
        if width == 0:  # the stream's first position alone: an empty window
            return np.full((len(thetas), n), -np.inf)
        lowest, columns = first - width, n - 1 + width
        sims = self._similarities(stream, hidden, lowest, columns)
        words = self.words[stream].take(np.arange(lowest, lowest + columns), mode="wrap")
        if lowest < 0:  # (their slots are not written yet: zero keys, padding for words)
            sims[:, :-lowest] = -np.inf
        band = _band_view(sims, width)
        top = band.max(axis=1)
        top[~np.isfinite(top)] = 0.0  # an empty window: nothing to shift
        # The keys followed by the position's target, found as a sparse list.
        hit_rows, hit_cols = np.divmod(
            np.flatnonzero(_band_view(words, width) == targets[:, None]), width)
        counts = np.minimum(np.arange(first, first + n), self.size)  # keys in each window
        out = np.empty((len(thetas), n))
        for i, (logp, theta) in enumerate(zip(out, thetas)):
            if theta == 0:  # uniform over the window (exp(0 * -inf) would be NaN)
                total = counts.astype(np.float64)
                hits = np.bincount(hit_rows, minlength=n)
            else:
                scale = np.float32(theta)  # the last θ may overwrite the similarities
                weights = np.multiply(band, scale, out=band if i == len(thetas) - 1 else None)
                _exp(weights, scale * top)
                total = (weights @ self._ones[:width]).astype(np.float64)
                hits = np.bincount(hit_rows, weights[hit_rows, hit_cols], minlength=n)
            with np.errstate(divide="ignore", invalid="ignore"):
                np.subtract(np.log(hits), np.log(total), out=logp)
            logp[counts == 0] = -np.inf
        return out

    def _similarities(self, stream: int, hidden: np.ndarray, lowest: int, columns: int
                      ) -> np.ndarray:
        """hidden · the keys of ranks lowest .. lowest + columns - 1: [n, columns] float32 (the
        run of slots may wrap around the ring: then two matmuls)."""
        sims = np.empty((hidden.shape[0], columns), np.float32)
        keys = self.keys[stream]
        at = lowest % self.slots
        tail = min(columns, self.slots - at)
        np.matmul(hidden, keys[:, at:at + tail], out=sims[:, :tail])
        if tail < columns:
            np.matmul(hidden, keys[:, :columns - tail], out=sims[:, tail:])
        return sims


def _band_view(run: np.ndarray, width: int) -> np.ndarray:
    """The [n, width] view of a contiguous `run` whose row t starts t elements further than
    row t - 1's: of an [n, columns] matrix, its band; of a vector, its sliding windows."""
    rows, step = (run.shape[0], run.shape[1] + 1) if run.ndim == 2 else (run.size - width + 1, 1)
    return np.ndarray((rows, width), run.dtype, run, strides=(step * run.itemsize, run.itemsize))


def _map(function, items: list) -> Iterator:
    """map(function, items) on the cache's worker threads (NumPy releases the GIL in the
    matmuls and elementwise loops that do most of the work)."""
    if len(items) < 2 or _WORKERS < 2:
        return map(function, items)
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_WORKERS, thread_name_prefix="keraslm-cache"))
    return _POOL[0].map(function, items)


class ContinuousCache:
    """The cache of `batch` streams with its settings, mixing `piece` positions at a time."""

    def __init__(self, settings: CacheSettings, batch: int, units: int, piece: int,
                 capacity: int | None = None) -> None:
        self.settings = settings
        self.buffer = StreamCache(batch, settings.size, units, piece, capacity)

    def keep(self, streams: list[int] | np.ndarray) -> None:
        """Keep only `streams` (indices, in their new order)."""
        self.buffer.keep(streams)

    def add_streams(self, n: int) -> None:
        """Append `n` streams with an empty cache."""
        self.buffer.add_streams(n)

    def __call__(self, hidden: np.ndarray, targets: np.ndarray, logprobs: np.ndarray
                 ) -> np.ndarray:
        """The chunk's mixed log-probabilities (float32, 0 at padding); the cache then holds it."""
        mixed = np.empty(targets.shape, np.float32)
        for part in pieces(targets.shape[1], self.buffer.piece):
            (cache,) = self.buffer.add(hidden[:, part], targets[:, part], [self.settings.theta])
            mixed[:, part] = mix(logprobs[:, part], cache, self.settings.lam,
                                 targets[:, part] != PAD_TARGET)
        return mixed

    def mix_chunks(self, chunks: Iterable[Chunk], group: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(targets, mixed log-probabilities) of every (hidden, targets, logprobs) chunk, in
        order, mixing `group` chunks at a time (what `plan` chose).

        A group is mixed on a thread of its own while `chunks` computes the next one (the
        network's recurrence leaves cores idle that the cache can use); groups are still mixed
        one after the other, in order.
        """
        with ThreadPoolExecutor(1, thread_name_prefix="keraslm-cache-mix") as mixer:
            previous = None
            for together in grouped(chunks, group):
                current = together, mixer.submit(self._mix_group, together)
                if previous is not None:
                    yield from _split(*previous)
                previous = current
            if previous is not None:
                yield from _split(*previous)

    def _mix_group(self, together: list[Chunk]) -> np.ndarray:
        return self(*(np.concatenate(parts, axis=1) for parts in zip(*together)))


Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # hidden [B, T, H], targets, logprobs [B, T]


def _split(together: list[Chunk], mixed: Future) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(targets, mixed log-probabilities) of each chunk of a group, once it is mixed."""
    at, mixed = 0, mixed.result()
    for _, targets, _ in together:
        width = targets.shape[1]
        yield targets, np.ascontiguousarray(mixed[:, at:at + width])
        at += width


def grouped(chunks: Iterable[Chunk], group: int) -> Iterator[list[Chunk]]:
    """Consecutive runs of `group` chunks (the last one shorter)."""
    run: list[Chunk] = []
    for chunk in chunks:
        run.append(chunk)
        if len(run) == group:
            yield run
            run = []
    if run:
        yield run


def pieces(length: int, piece: int) -> list[slice]:
    """`length` positions as slices of at most `piece`."""
    return [slice(at, at + piece) for at in range(0, length, piece)]


# --- tuning on a recorded run -------------------------------------------------------------------

@dataclass
class Recording:
    """One run of the network over a text, chunk by chunk, as the cache sees it.

    `chunks` holds (hidden [B, T, H] float32, targets [B, T], model log-probabilities [B, T])
    in scoring order; replayed through a StreamCache in the scorer's pieces, they give exactly
    what scoring the text with the cache gives. Memory: about 4 bytes a token per unit of the
    last LSTM layer.
    """

    source: str
    batch_size: int
    bptt: int
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(int(np.count_nonzero(t != PAD_TARGET)) for _, t, _ in self.chunks)

    def pieces(self) -> Iterator[Chunk]:
        """The chunks as the scorer mixes them: grouped, then cut into pieces (`plan`)."""
        group, piece = plan(self.batch_size, self.bptt)
        for together in grouped(self.chunks, group):
            joined = [np.concatenate(parts, axis=1) for parts in zip(*together)]
            for part in pieces(joined[1].shape[1], piece):
                yield joined[0][:, part], joined[1][:, part], joined[2][:, part]

    def model_logprobs(self) -> np.ndarray:
        """The model's log-probability of every scored position, in replay order (float64)."""
        return np.concatenate([lp[t != PAD_TARGET] for _, t, lp in self.pieces()]
                              ).astype(np.float64)

    def cache_logprobs(self, size: int, thetas: Sequence[float]) -> np.ndarray:
        """log p_cache of every scored position for each θ: [len(thetas), positions] float64."""
        if not self.chunks:
            return np.zeros((len(thetas), 0))
        units = self.chunks[0][0].shape[-1]
        piece = plan(self.batch_size, self.bptt)[1]
        check_memory(self.batch_size, size, units, piece)
        buffer = StreamCache(self.batch_size, size, units, piece)
        out: list[list[np.ndarray]] = [[] for _ in thetas]
        for hidden, targets, _ in self.pieces():
            scored = targets != PAD_TARGET
            for row, cache in zip(out, buffer.add(hidden, targets, thetas)):
                row.append(cache[scored])
        return np.array([np.concatenate(row) for row in out])

    def nll(self, settings: CacheSettings) -> float:
        """The summed NLL of the text under `settings` (what the scorer reports for it)."""
        (cache,) = self.cache_logprobs(settings.size, [settings.theta])
        model = self.model_logprobs()
        return -float(mix(model, cache, settings.lam, np.ones(model.size, bool))
                      .sum(dtype=np.float64))


THETAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 1.25, 1.6, 2.0, 2.5, 3.2,
          4.0, 5.0)
REFINE = 6  # θ points tried between the best coarse θ's neighbours
EXTEND = 4  # times the coarse grid is extended upwards while its largest θ is the best


@dataclass(frozen=True)
class TuneResult:
    """The best (θ, λ) found for one window on one text, and what it was compared with."""

    source: str
    settings: CacheSettings
    perplexity: float          # on `source`, with `settings`
    perplexity_off: float      # on `source`, without the cache
    num_tokens: int
    grid: list[dict]           # every θ tried with its best λ and perplexity

    def to_dict(self) -> dict:
        return {"tuned_on": self.source, **self.settings.to_dict(),
                "perplexity": self.perplexity, "perplexity_off": self.perplexity_off,
                "num_tokens": self.num_tokens, "grid": self.grid}


def tune(recording: Recording, size: int, thetas: Sequence[float] = THETAS) -> TuneResult:
    """The θ and λ with the lowest perplexity on `recording` for a window of `size`.

    θ: the coarse grid `thetas` (extended upwards while its largest θ is the best), then REFINE
    points between the best one's neighbours; each set of θ costs one replay of the recording.
    λ: for each θ, the exact minimum of the NLL, which is convex in λ (a golden-section search
    on [0, 1]). Both are rounded to 4 significant digits and the reported perplexity is the one
    at the rounded values.
    """
    CacheSettings(size, 0.0, 0.0)  # validates size
    model = recording.model_logprobs()
    if model.size == 0:
        raise UserError(f"{recording.source}: nothing to tune the cache on (no targets)")
    tried: dict[float, tuple[float, float]] = {}

    def search(grid: Sequence[float]) -> None:
        grid = [t for t in dict.fromkeys(_round(t) for t in grid) if t not in tried]
        for theta, cache in zip(grid, recording.cache_logprobs(size, grid)):
            lam = _round(_best_lambda(model, cache))
            tried[theta] = (lam, _nll(model, cache, lam))

    def leader() -> float:
        return min(tried, key=lambda t: tried[t][1])

    search(sorted(thetas))
    for _ in range(EXTEND):  # the best θ is the largest tried: look further
        if leader() != max(tried) or leader() == 0:
            break
        search([leader() * 1.6, leader() * 2.5])
    ordered = sorted(tried)
    at = ordered.index(leader())
    low, high = ordered[max(at - 1, 0)], ordered[min(at + 1, len(ordered) - 1)]
    if high > low:
        search(np.linspace(low, high, REFINE + 2)[1:-1])
    best = leader()
    lam, nll = tried[best]
    grid = [{"theta": t, "lambda": tried[t][0], "perplexity": perplexity(tried[t][1], model.size)}
            for t in sorted(tried)]
    return TuneResult(recording.source, CacheSettings(size, best, lam), perplexity(nll, model.size),
                      perplexity(-float(model.sum()), model.size), int(model.size), grid)


def _nll(model: np.ndarray, cache: np.ndarray, lam: float) -> float:
    return -float(mix(model, cache, lam, np.ones(model.size, bool)).sum(dtype=np.float64))


def _best_lambda(model: np.ndarray, cache: np.ndarray, steps: int = 48) -> float:
    """argmin over [0, 1] of the NLL (convex in λ), by golden-section search, in float64."""
    def f(lam: float) -> float:
        with np.errstate(divide="ignore"):
            return -float(np.logaddexp(math.log1p(-lam) + model, math.log(lam) + cache).sum())

    ratio = (math.sqrt(5) - 1) / 2
    a, b = 0.0, 1.0 - 1e-9
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    best = (a + b) / 2
    return best if f(best) < -float(model.sum()) else 0.0


def _round(x: float) -> float:
    return float(f"{float(x):.4g}")
