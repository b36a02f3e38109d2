"""Variable-length truncated BPTT, as GluonNLP's language-model script draws it (the AWD-LSTM's).

Each training batch's length is drawn: the nominal `bptt` with probability 0.95, else half of
it, then a normal draw around that with a standard deviation of 5, truncated to an integer and
at least 5. Batches start where the previous one ended, so every column advances by the drawn
length and the carried LSTM state sees each column as one unbroken text; an epoch goes on while
at least two targets remain in the columns (the script's `i < len(data) - 2`), its last batch
cut to what remains. The step's learning rate is scaled by drawn length / bptt (the drawn one,
even where the last batch is cut, as in the script).

Where the script draws from MXNet's global random state, each length here is a pure function of
(seed, epoch, batch), so every worker and replica draws the same lengths and a resumed run draws
those the uninterrupted one did. This module never imports TensorFlow.
"""

from __future__ import annotations

import numpy as np

from keraslm.batching import BPTTBatches

SHORT_PROBABILITY = 0.05  # a batch of half the nominal length
SPREAD = 5.0              # standard deviation of the length around its nominal value
MIN_LENGTH = 5
_SALT = 0xB977  # keeps these draws apart from any other keyed by (seed, epoch, batch)


def draw_length(seed: int, epoch: int, batch: int, bptt: int) -> int:
    """The length of batch `batch` of epoch `epoch` (both 0-based) for a nominal `bptt`."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, batch, _SALT])
    nominal = bptt if rng.random() >= SHORT_PROBABILITY else bptt / 2
    return max(MIN_LENGTH, int(rng.normal(nominal, SPREAD)))


class VariableBPTTBatches:
    """One epoch's variable-length batches over the columns of `batches` (its batch size,
    column layout, padding and nominal bptt); indexable like `BPTTBatches`."""

    def __init__(self, batches: BPTTBatches, seed: int, epoch: int):
        self.batches = batches
        self.bptt = batches.bptt
        self.starts: list[int] = []
        self.lengths: list[int] = []  # as drawn (the last batch may be cut shorter)
        start, end = 0, batches.column_length - 2
        while start < end:
            drawn = draw_length(seed, epoch, len(self.lengths), self.bptt)
            self.starts.append(start)
            self.lengths.append(drawn)
            start += drawn

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `i` as (inputs, targets), int32 arrays of [batch_size, its length]."""
        return self.batches.span(self.starts[i], self.lengths[i])

    def lr_scale(self, i: int) -> float:
        """The factor of batch `i`'s learning rate: its drawn length / the nominal bptt."""
        return self.lengths[i] / self.bptt
