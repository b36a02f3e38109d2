"""NT-ASGD (Merity et al. 2018, as GluonNLP's language-model script has it): when validation
stops improving, keep a running average of the weights and use it wherever the model is judged.

The trigger (`nonmonotonic_trigger`) is checked after each validation until it fires: with the
validation losses seen so far, the new one is worse than the best of all but the last `window`
of them (the script's `t > n and val_L > min(valid_losses[:-n])`, n = 5). From then on
`WeightAverage` holds the mean of the weights at the switch and after every training step since,
updated in place (`avg += (w - avg) / k` at the k-th snapshot); validation, the best weights,
test perplexity and so export use the average, while training goes on from the weights
themselves. The script counts the k-th step as epoch x (nominal batches per epoch) + batch,
which skips or repeats counts when an epoch has another number of batches (variable-length
BPTT); here the steps themselves are counted, so the average is exactly the mean.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from keraslm.backend import keras, tf


def nonmonotonic_trigger(val_losses: Sequence[float], val_loss: float, window: int) -> bool:
    """Whether to switch to averaging after a validation loss of `val_loss`, given the earlier
    ones (`val_losses`, oldest first): more than `window` of them, and `val_loss` worse than the
    best of all but the last `window`."""
    return len(val_losses) > window and val_loss > min(val_losses[:-window])


class WeightAverage:
    """The running average of a model's trainable weights, off until `start`.

    The average lives in variables of its own on the default device (not mirrored: every
    replica's weights are the same); `count` is how many snapshots it is the mean of.
    """

    def __init__(self, model: keras.Model):
        self.weights = list(model.trainable_variables)
        self.average: list[tf.Variable] | None = None
        self.count = 0
        self._update = tf.function(self._update_impl)

    @property
    def active(self) -> bool:
        return self.count > 0

    def start(self) -> None:
        """Begin averaging at the weights as they are now (the first snapshot)."""
        self.restore([np.asarray(w.numpy()) for w in self.weights], 1)

    def restore(self, values: list[np.ndarray], count: int) -> None:
        """Set the average to `values`, the mean of `count` snapshots (from a checkpoint)."""
        if [tuple(np.shape(v)) for v in values] != [tuple(w.shape) for w in self.weights]:
            raise ValueError("the average does not match the model's weights")
        if self.average is None:
            self.average = [tf.Variable(np.asarray(v, w.dtype), trainable=False)
                            for v, w in zip(values, self.weights)]
        else:
            for variable, value in zip(self.average, values):
                variable.assign(value)
        self.count = int(count)

    def update(self) -> None:
        """Add the weights as they are now to the mean (after a training step)."""
        self.count += 1
        self._update(tf.constant(1.0 / self.count, tf.float32))

    def _update_impl(self, gamma):
        for average, weight in zip(self.average, self.weights):
            average.assign_add(gamma * (tf.convert_to_tensor(weight) - average))

    def values(self) -> list[np.ndarray]:
        """The average, one array per trainable weight (empty when not averaging)."""
        return [np.asarray(a.numpy()) for a in self.average] if self.active else []

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model's weights replaced by the average inside the block (unchanged when not
        averaging), then put back exactly as they were."""
        if not self.active:
            yield
            return
        kept = [np.asarray(w.numpy()) for w in self.weights]
        for weight, average in zip(self.weights, self.average):
            weight.assign(average)
        try:
            yield
        finally:
            for weight, value in zip(self.weights, kept):
                weight.assign(value)
