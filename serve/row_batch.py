"""Continuous batching: texts scored each on its own, in a batch they join and leave between calls.

The one implementation of texts scored each on its own: `Scorer.score_rows` (and so the CLI's
`--per-line`, `Scorer.score`) feeds its rows through a RowBatch, and the HTTP service feeds the
texts of its requests as they arrive. If a batch had to end before the next could start, the
model would idle while answers go out and new requests come in, and every batch would shrink as
its rows end. A `RowBatch` holds up to `max_rows` rows, each at its own position with its own
LSTM state (and its own continuous cache, when the scorer has one on): `add` puts a row in (zero
state, `<eos>` as its context, an empty cache), `step` runs one onnxruntime call over every row
present and hands back the rows it finished, `drop` takes out rows nobody waits for. Rows never
share state, so a row's numbers do not depend on its batch-mates.

The width of a call. Rows sit at different positions, so a call that ended wherever some row
ends would be a few steps wide (with 32 rows of 80 tokens, about 2.5), and a call has a cost of
its own; a call of `bptt` steps pads every row that ends inside it. `step` takes the width that
scores the most tokens per unit of expected cost (`CallCost`): a fixed cost per call, plus every
position, a padded one costing a fraction of a scored one. That fraction is the bundle's: the
graph exported since issue 14 runs its [vocab]-wide decoder only at targets, so padding costs
the LSTM alone (about a sixth of a position at WikiText-2's vocabulary); in older bundles the
decoder runs everywhere and padding costs as much as a target. `calibrate` measures both for
the bundle at hand (the fixed cost grows as the vocabulary shrinks: the decoder gets cheaper).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from keraslm.contract import PAD_INPUT, PAD_TARGET
from serve.cache import ContinuousCache, check_memory, plan

if TYPE_CHECKING:
    from serve.scorer import Scorer


@dataclass(frozen=True)
class CallCost:
    """A call's expected cost in scored positions: `overhead` for the call, one for every
    position scored, and `padding` for every padded one."""

    overhead: float = 16.0
    padding: float = 1.0

    def of(self, rows: int, width: int, scored: int) -> float:
        return self.overhead + scored + self.padding * (rows * width - scored)


@dataclass(eq=False)
class Row:
    """One text's ids, the position reached, and the log-probabilities so far."""

    key: Hashable
    ids: np.ndarray
    at: int = 0
    logprobs: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.logprobs = np.zeros(self.ids.size, np.float32)

    @property
    def remaining(self) -> int:
        return self.ids.size - self.at


class RowBatch:
    """Up to `max_rows` rows in one batch, stepped together `scorer.bptt` steps at most a call.

    Not thread-safe: call it from one thread at a time (the service calls `step` on the model
    thread and `add`/`drop` on the event loop, never at the same time).
    """

    def __init__(self, scorer: Scorer, max_rows: int, cost: CallCost = CallCost()) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.scorer, self.max_rows, self.cost = scorer, max_rows, cost
        self.rows: list[Row] = []
        self._state = scorer.zero_state(0)
        self._cache = None
        if scorer.cache is not None:
            piece = plan(max_rows, scorer.bptt)[1]
            units = scorer.bundle.hidden_size  # the last LSTM layer's: the cache's keys
            check_memory(max_rows, scorer.cache.size, units, piece)
            self._cache = ContinuousCache(scorer.cache, 0, units, piece, max_rows)

    @property
    def free(self) -> int:
        """Rows that can still be added before the next call."""
        return self.max_rows - len(self.rows)

    def add(self, key: Hashable, ids: np.ndarray) -> None:
        """Put a non-empty id row in the batch; it starts at the next `step`."""
        if not ids.size:
            raise ValueError("an empty row has nothing to score")
        if not self.free:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        self.rows.append(Row(key, ids))
        self._state = [np.concatenate([s, zero])
                       for s, zero in zip(self._state, self.scorer.zero_state(1))]
        if self._cache is not None:
            self._cache.add_streams(1)

    def drop(self, keys: set) -> int:
        """Take out the rows whose key is in `keys`; how many there were."""
        keep = [i for i, row in enumerate(self.rows) if row.key not in keys]
        dropped = len(self.rows) - len(keep)
        if dropped:
            self._keep(keep)
        return dropped

    def step(self) -> list[Row]:
        """One onnxruntime call over every row; the rows it finished (taken out of the batch)."""
        if not self.rows:
            return []
        remaining = np.array([row.remaining for row in self.rows])
        width = best_width(remaining, self.scorer.bptt, self.cost)
        tokens, targets = self._inputs(width)
        if self._cache is None:
            logprobs, self._state = self.scorer.step(tokens, targets, self._state)
        else:
            logprobs, self._state, hidden = self.scorer.step_hidden(tokens, targets, self._state)
            logprobs = self._cache(hidden, targets, logprobs)
        for row, lp in zip(self.rows, logprobs):
            n = min(width, row.remaining)
            row.logprobs[row.at:row.at + n] = lp[:n]
            row.at += n
        done = [row for row in self.rows if not row.remaining]
        if done:
            self._keep([i for i, row in enumerate(self.rows) if row.remaining])
        return done

    def _keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        self._state = [s[indices] for s in self._state]
        if self._cache is not None:
            self._cache.keep(indices)

    def _inputs(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and targets of the next `width` steps of every row, padded past a row's end."""
        tokens = np.full((len(self.rows), width), PAD_INPUT, np.int32)
        targets = np.full((len(self.rows), width), PAD_TARGET, np.int32)
        for r, row in enumerate(self.rows):
            n = min(width, row.remaining)
            targets[r, :n] = row.ids[row.at:row.at + n]
            if row.at:
                tokens[r, :n] = row.ids[row.at - 1:row.at - 1 + n]
            else:
                tokens[r, 0] = self.scorer.context_id
                tokens[r, 1:n] = row.ids[:n - 1]
        return tokens, targets


def best_width(remaining: np.ndarray, bptt: int, cost: CallCost) -> int:
    """The call width (at most `bptt`) with the most tokens scored per expected `cost`, for
    rows with `remaining` tokens each; ties go to the narrower call (rows that end leave room
    for new ones sooner)."""
    candidates = np.unique(np.minimum(np.append(remaining, bptt), bptt))
    scored = np.minimum(remaining[None, :], candidates[:, None]).sum(axis=1)
    value = scored / cost.of(remaining.size, candidates, scored)
    return int(candidates[np.argmax(value)])


def calibrate(scorer: Scorer, rows: int) -> CallCost:
    """The CallCost of `scorer`'s bundle, from three calls of `rows` rows timed a few times
    each: one step wide, `bptt` steps wide, and `bptt` steps with only the first a target."""
    wide = max(scorer.bptt, 2)

    def seconds(width: int, targets: int) -> float:
        ids = np.arange(rows * width, dtype=np.int32).reshape(rows, width) % len(scorer.vocab)
        wanted = np.where(np.arange(width) < targets, ids, PAD_TARGET).astype(np.int32)
        state = scorer.zero_state(rows)
        scorer.step(ids, wanted, state)  # onnxruntime's first call at a new shape is slower
        best = np.inf
        for _ in range(3):
            started = time.perf_counter()
            scorer.step(ids, wanted, state)
            best = min(best, time.perf_counter() - started)
        return best

    narrow, full, padded = seconds(1, 1), seconds(wide, wide), seconds(wide, 1)
    extra = max(full - narrow, 1e-9)  # rows * (wide - 1) more scored positions
    overhead = narrow / (extra / (rows * (wide - 1))) - rows
    return CallCost(overhead=max(overhead, 0.0),
                    padding=min(max((padded - narrow) / extra, 0.0), 1.0))
