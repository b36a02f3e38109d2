"""Truncated-BPTT batches from a flat id stream (GluonNLP ``CorpusBPTTBatchify`` semantics).

The stream is cut into ``batch_size`` contiguous segments of equal length L, the columns: column j
is ``stream[j*L:(j+1)*L]``. Batch i holds time steps ``[i*bptt, (i+1)*bptt)`` of every column as
inputs and the steps one later as targets, so column j of batch i+1 continues column j of batch i
and an LSTM state carried across batches sees each column as one unbroken text. Arrays are
batch-major, int32, shape ``[batch_size, bptt]``.

``last_batch="discard"`` is GluonNLP exactly: L = len // batch_size (the stream's tail is
dropped), and only the ``(L - 1) // bptt`` complete batches are kept, so there are
``batch_size * bptt * ((L - 1) // bptt)`` targets.

``last_batch="keep"`` scores every token: L = ceil(len / batch_size), the last column(s) are padded
at the end, and the last batch is padded in time to the full bptt, so every batch has the same
shape. Padded inputs are ``PAD_INPUT``; padded targets are ``PAD_TARGET`` (-1), which the loss
must ignore. Every stream token that has a predecessor in its column (all but the first token of
each non-empty column) is a target exactly once. (GluonNLP's own ``keep`` pads with a vocabulary
padding token that it then trains on; this one is masked instead.)

Only the id array is held; batches are built on demand. This module never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from keraslm.contract import PAD_INPUT, PAD_TARGET
from keraslm.errors import UserError

LAST_BATCH = ("keep", "discard")


class BPTTBatches:
    """The BPTT batches of one id stream; indexable, iterable, resumable at any batch."""

    def __init__(self, ids: np.ndarray | list[int], batch_size: int, bptt: int,
                 last_batch: str = "keep") -> None:
        if last_batch not in LAST_BATCH:
            raise UserError(f"last_batch must be 'keep' or 'discard', got {last_batch!r}")
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        if not (isinstance(bptt, (int, np.integer)) and bptt >= 1):
            raise UserError(f"bptt must be a positive integer, got {bptt!r}")
        self._ids = np.asarray(ids, dtype=np.int32)  # no copy when already int32
        if self._ids.ndim != 1:
            raise UserError(f"the id stream must be one-dimensional, got shape {self._ids.shape}")
        if self._ids.size and self._ids.min() < 0:
            raise UserError("the id stream has negative ids")
        self.batch_size = int(batch_size)
        self.bptt = int(bptt)
        self.last_batch = last_batch

        n, b = self._ids.size, self.batch_size
        if last_batch == "discard":
            self.column_length = n // b
            self._used = self.column_length * b  # the tail beyond this is dropped
            self._num_batches = max(0, (self.column_length - 1) // self.bptt)
            needed = b * (self.bptt + 1)
        else:
            self.column_length = -(-n // b)
            self._used = n
            self._num_batches = -(-(self.column_length - 1) // self.bptt) if n > b else 0
            needed = b + 1
        if self._num_batches == 0:
            raise UserError(f"the stream has {n} tokens, too few for one batch: batch size {b} "
                            f"and bptt {self.bptt} need at least {needed} "
                            f"(last_batch={last_batch!r})")

    @property
    def num_tokens(self) -> int:
        """Length of the id stream (before any tail is discarded)."""
        return int(self._ids.size)

    @property
    def num_targets(self) -> int:
        """Number of non-padding targets over all batches."""
        if self.last_batch == "discard":
            return self._num_batches * self.bptt * self.batch_size
        nonempty_columns = -(-self._used // self.column_length)
        return self._used - nonempty_columns

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` as ``(inputs, targets)``, fresh int32 arrays of shape [batch_size, bptt]."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"batch index must be an integer, got {type(i).__name__}")
        if i < 0:
            i += self._num_batches
        if not 0 <= i < self._num_batches:
            raise IndexError(f"batch {i} out of range for {self._num_batches} batches")
        return self._batch(int(i) * self.bptt, self.bptt)

    def span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Time steps ``[start, start + length)`` of every column as inputs and the steps one
        later as targets, cut where the columns end (so at least one step long): a batch of
        any length at any position, for variable-length BPTT. Padded columns (``keep``) have
        padded targets as in the fixed batches."""
        if not 0 <= start < self.column_length - 1 or length < 1:
            raise IndexError(f"no batch of {length} steps at step {start} of columns of "
                             f"{self.column_length}")
        return self._batch(start, min(length, self.column_length - 1 - start))

    def _batch(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        window, valid = self._window(start, length)
        inputs = np.where(valid[:, :-1], window[:, :-1], PAD_INPUT).astype(np.int32)
        targets = np.where(valid[:, 1:], window[:, 1:], PAD_TARGET).astype(np.int32)
        return inputs, targets

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate from batch ``start`` on (0 <= start <= len), e.g. to resume an epoch."""
        if not 0 <= start <= self._num_batches:
            raise UserError(f"cannot start at batch {start}: there are {self._num_batches}")
        return (self[i] for i in range(start, self._num_batches))

    def num_targets_in(self, i: int) -> int:
        """Number of non-padding targets in batch ``i``."""
        return int(np.count_nonzero(self[i][1] != PAD_TARGET))

    def _window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Time steps ``[start, start + length]`` of every column, and which of them are real."""
        steps = start + np.arange(length + 1)
        positions = (np.arange(self.batch_size) * self.column_length)[:, None] + steps[None, :]
        valid = (steps < self.column_length)[None, :] & (positions < self._used)
        window = self._ids[np.where(valid, positions, 0)]
        return window, valid

    def __repr__(self) -> str:
        return (f"BPTTBatches({len(self)} batches of {self.batch_size}x{self.bptt}, "
                f"{self.num_targets} targets, last_batch={self.last_batch!r})")
