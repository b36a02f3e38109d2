"""Keras on the TensorFlow backend, for every module that uses either: `from keraslm.backend
import keras, tf`.

Keras chooses its backend once, when it is first imported (`import tensorflow` imports it too),
from $KERAS_BACKEND or else ~/.keras/keras.json. The training side, evaluation and export need
TensorFlow whatever those say, so this module sets the variable before importing either. It is
the one place that does: importing `keraslm` itself changes nothing.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras
import tensorflow as tf

if keras.backend.backend() != "tensorflow":  # Keras was imported before this module
    raise ImportError(f"keraslm needs Keras on the TensorFlow backend, but Keras was already "
                      f"imported with the {keras.backend.backend()!r} backend: set "
                      f"KERAS_BACKEND=tensorflow, or import keraslm.backend before Keras")

__all__ = ["keras", "tf"]
