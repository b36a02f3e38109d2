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
that state is dropped. Padding positions never enter it. Positions are mixed a piece at a time:
one [piece x (size + piece)] similarity matmul per stream, a mask for each position's window, and
a log-sum-exp over it; nothing loops over tokens. A corpus's chunks are grouped into pieces of up
to MAX_PIECE positions (`plan`), which amortizes NumPy's per-call cost and feeds the matmul more
rows (measured at batch 1, bptt 35, window 2000: 64 µs a token in pieces of 35, 38 in pieces of
245); the numbers do not depend on the grouping beyond float32 round-off.

One difference from GluonNLP's `CacheCell` (`cache_language_model.py`): GluonNLP turns the cache on
only once a stream has seen `size` positions; here a partly filled window is used from the
second position on.

Tuning: `Recording` keeps what one run of the network over a text leaves for the cache (hidden
states, targets, the model's log-probabilities, per chunk), and `tune` searches θ and λ on it in
numpy without running the network again. This module imports numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from keraslm.errors import UserError
from serve.contract import PAD_TARGET

MAX_CACHE_BYTES = 4 << 30  # refuse a cache (ring buffers and one piece's work) bigger than this
MAX_PIECE = 256  # positions of a stream mixed at once, at most
PIECE_WORK = 3072  # ... and at most about this many over all streams (its arrays: [B, piece, slots])
_EMPTY = np.iinfo(np.int64).min // 2  # the rank of an empty slot: in no window
# Exponents are clamped here before exp: below it float32 goes subnormal, which is several times
# slower to compute, and exp(-80) = 1.8e-35 is far below a window's total (>= 1: its largest
# term is exp(0)), so the totals do not change; outside the window -inf becomes this too.
_EXP_FLOOR = np.float32(-80.0)


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


def check_memory(batch: int, size: int, nhid: int, piece: int) -> None:
    """UserError when a cache for `batch` streams would need more than MAX_CACHE_BYTES."""
    need = batch * (size + piece) * (4 * nhid + 4 + 8 + 6 * 4 * piece)
    if need > MAX_CACHE_BYTES:
        raise UserError(f"a cache of {size} positions for {batch} streams of {nhid} units needs "
                        f"about {need / 2**30:.1f} GiB (limit {MAX_CACHE_BYTES / 2**30:.0f}): "
                        f"use a smaller --cache-size or --batch-size")


# --- one chunk's windows -----------------------------------------------------------------------

class Window:
    """Every position's similarities to the keys in its window, for one piece of every stream.

    `shifted` [B, T, slots] holds h_t·h_i minus its row's maximum inside the window (-inf outside);
    `hit_rows` and `hit_values` list every key in a window whose next word is that position's
    target: its row (b * T + t) and its `shifted` value (few: a sparse list, not a mask). The
    similarities do not depend on θ, so one Window gives log p_cache for any θ (tuning asks for
    many).
    """

    def __init__(self, shifted: np.ndarray, counts: np.ndarray, hit_rows: np.ndarray,
                 hit_values: np.ndarray) -> None:
        self.shifted, self.counts = shifted, counts  # counts [B, T]: keys in each window
        self.hit_rows, self.hit_values = hit_rows, hit_values  # into the flattened [B * T]

    def log_probs(self, theta: float, overwrite: bool = False) -> np.ndarray:
        """log p_cache(target) [B, T] (float64): -inf where the window is empty or lacks it.

        `overwrite` lets the exponentials be computed in place (the Window is then spent).
        """
        rows, scale = self.counts.size, np.float32(theta)
        if scale == 0:  # uniform over the window (exp(0 * -inf) would be NaN)
            total = self.counts.astype(np.float64)
            hits = np.bincount(self.hit_rows, minlength=rows)
        else:
            weights = self.shifted if overwrite else np.empty_like(self.shifted)
            np.multiply(self.shifted, scale, out=weights)
            np.maximum(weights, _EXP_FLOOR, out=weights)
            np.exp(weights, out=weights)  # ~0 outside the window
            total = weights.sum(axis=-1).astype(np.float64)
            # the same float32 terms as in `total`
            hits = np.bincount(self.hit_rows, np.exp(scale * self.hit_values), minlength=rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(hits.reshape(total.shape)) - np.log(total)
        return np.where(self.counts > 0, logp, -np.inf)


def mix(model_logprobs: np.ndarray, cache_logprobs: np.ndarray, lam: float,
        scored: np.ndarray) -> np.ndarray:
    """log((1 - λ) p_model + λ p_cache) as float32, 0 where not `scored` (padding).

    λ = 0 returns the model's log-probabilities exactly: logaddexp(x + 0, -inf) is x.
    """
    keep = math.log1p(-lam) if lam < 1 else -math.inf
    use = math.log(lam) if lam > 0 else -math.inf
    mixed = np.logaddexp(keep + model_logprobs.astype(np.float64), use + cache_logprobs)
    return np.where(scored, mixed, 0.0).astype(np.float32)


# --- the per-stream ring buffer ---------------------------------------------------------------

class StreamCache:
    """The last `size` (hidden state, next word) pairs of each of `batch` streams, and room for
    one more piece of at most `piece` positions.

    A piece is added first and its windows computed after, so that one matmul against the whole
    buffer gives every similarity: what the piece overwrites is older than any of its windows
    reach. Slot order does not matter (the math is a sum over the window); each slot records the
    rank of its position in its stream (0 for the stream's first scored position), and a key
    lies in position t's window when 1 <= rank(t) - rank(key) <= size. Hidden states are stored
    transposed, [B, H, slots], so the matmul runs on contiguous operands.
    """

    def __init__(self, batch: int, size: int, nhid: int, piece: int) -> None:
        self.size, self.piece = size, piece
        self.slots = size + piece
        self.keys = np.zeros((batch, nhid, self.slots), np.float32)
        self.words = np.full((batch, self.slots), PAD_TARGET, np.int32)
        self.ranks = np.full((batch, self.slots), _EMPTY, np.int64)
        self.count = np.zeros(batch, np.int64)  # positions each stream has scored

    @property
    def batch(self) -> int:
        return self.count.size

    def keep(self, rows: int) -> None:
        """Keep the first `rows` streams (the others have ended)."""
        self.keys, self.words = self.keys[:rows], self.words[:rows]
        self.ranks, self.count = self.ranks[:rows], self.count[:rows]

    def add(self, hidden: np.ndarray, targets: np.ndarray) -> Window:
        """Add a piece's scored positions and return the piece's windows.

        `hidden` [B, T, H] and `targets` [B, T] (padding < 0, never added), T <= piece.
        """
        if targets.shape[1] > self.piece:
            raise ValueError(f"a piece has at most {self.piece} positions, got {targets.shape[1]}")
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        scored = targets != PAD_TARGET
        start = self.count
        before = np.cumsum(scored, axis=1) - scored  # [B, T]: scored positions before t here
        ranks = start[:, None] + before
        rows, cols = np.nonzero(scored)
        slots = ranks[rows, cols] % self.slots
        self.keys[rows, :, slots] = hidden[rows, cols]
        self.words[rows, slots] = targets[rows, cols]
        self.ranks[rows, slots] = ranks[rows, cols]
        self.count = start + scored.sum(axis=1)
        # Until the ring first wraps, rank r sits in slot r: only the first `used` slots hold
        # anything (a short text, or a stream's first `size` positions, costs what it holds).
        used = min(self.slots, max(int(self.count.max()), 1))
        keys, words = self.keys[:, :, :used], self.words[:, :used]

        sims = np.matmul(hidden, keys)  # [B, T, used]
        # The window of position t: the keys whose rank is 1 to `size` below t's. With ranks
        # relative to the piece's start (they fit in int32: the buffer holds the last `slots`),
        # age - 1 outside [0, size) -- as unsigned, negative is huge -- means outside: keys at or
        # after t, too old, or empty. Streams that have scored the same positions (every column
        # of a corpus, every row of a batch of texts, until it ends) share one [T, slots] mask.
        held = self.ranks[:, :used]
        relative = np.where(held == _EMPTY, np.iinfo(np.int32).max,
                            held - start[:, None]).astype(np.int32)
        last = (before - 1).astype(np.int32)
        if (relative == relative[0]).all() and ((before == before[0]) | ~scored).all():
            relative, last = relative[:1], last[:1]  # lockstep: one mask for every stream
        age = last[:, :, None] - relative[:, None, :]
        outside = age.view(np.uint32) >= self.size
        np.copyto(sims, np.float32(-np.inf), where=outside)
        top = sims.max(axis=-1, keepdims=True)
        top[~np.isfinite(top)] = 0.0  # an empty window: nothing to shift
        sims -= top
        counts = np.minimum(start[:, None] + before, self.size)  # keys in each window
        # The keys followed by the position's target, found as a sparse list.
        flat = np.flatnonzero(words[:, None, :] == targets[:, :, None])
        row, k = np.divmod(flat, used)  # row: b * T + t
        mask_row = row if outside.shape[0] > 1 else row % targets.shape[1]
        inside = ~outside.reshape(-1, used)[mask_row, k]
        row, k = row[inside], k[inside]
        return Window(sims, counts, row, sims.reshape(-1, used)[row, k])


class ContinuousCache:
    """The cache of `batch` streams with its settings, mixing `piece` positions at a time."""

    def __init__(self, settings: CacheSettings, batch: int, nhid: int, piece: int) -> None:
        self.settings = settings
        self.buffer = StreamCache(batch, settings.size, nhid, piece)

    def keep(self, rows: int) -> None:
        self.buffer.keep(rows)

    def __call__(self, hidden: np.ndarray, targets: np.ndarray, logprobs: np.ndarray
                 ) -> np.ndarray:
        """The chunk's mixed log-probabilities (float32, 0 at padding); the cache then holds it."""
        mixed = np.empty(targets.shape, np.float32)
        for part in pieces(targets.shape[1], self.buffer.piece):
            window = self.buffer.add(hidden[:, part], targets[:, part])
            mixed[:, part] = mix(logprobs[:, part], window.log_probs(self.settings.theta, True),
                                 self.settings.lam, targets[:, part] != PAD_TARGET)
        return mixed

    def mix_chunks(self, chunks: Iterable[Chunk], group: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(targets, mixed log-probabilities) of every (hidden, targets, logprobs) chunk, in
        order, mixing `group` chunks at a time (what `plan` chose)."""
        for together in grouped(chunks, group):
            mixed = self(*(np.concatenate(parts, axis=1) for parts in zip(*together)))
            at = 0
            for _, targets, _ in together:
                width = targets.shape[1]
                yield targets, np.ascontiguousarray(mixed[:, at:at + width])
                at += width


Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # hidden [B, T, H], targets, logprobs [B, T]


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
    what scoring the text with the cache gives. Memory: about 4 * nhid bytes a token.
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
        nhid = self.chunks[0][0].shape[-1]
        piece = plan(self.batch_size, self.bptt)[1]
        check_memory(self.batch_size, size, nhid, piece)
        buffer = StreamCache(self.batch_size, size, nhid, piece)
        out: list[list[np.ndarray]] = [[] for _ in thetas]
        for hidden, targets, _ in self.pieces():
            window, scored = buffer.add(hidden, targets), targets != PAD_TARGET
            for row, theta in zip(out, thetas):
                row.append(window.log_probs(theta)[scored])
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
    grid = [{"theta": t, "lambda": tried[t][0], "perplexity": _ppl(tried[t][1], model.size)}
            for t in sorted(tried)]
    return TuneResult(recording.source, CacheSettings(size, best, lam), _ppl(nll, model.size),
                      _ppl(-float(model.sum()), model.size), int(model.size), grid)


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


def _ppl(nll: float, count: int) -> float:
    mean = nll / count
    return math.exp(mean) if mean < 700 else math.inf
