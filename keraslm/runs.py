"""A training run's trained model: `load_run_model`, what evaluation and export start from.

The run directory itself (its files, `RunDir.require_best_weights`) is `keraslm.rundir`, which
never imports TensorFlow; this module builds the Keras model, so it does.
"""

from __future__ import annotations

import os

from keraslm.backend import keras
from keraslm.config import LMConfig
from keraslm.errors import UserError, first_line
from keraslm.model import build_model
from keraslm.rundir import RunDir, resolve_run


def load_run_model(run: RunDir | str | os.PathLike, fused: bool = True
                   ) -> tuple[keras.Model, LMConfig]:
    """A run's model with its best weights, and its config.

    Export asks for `fused=False`: the plain Keras LSTM that tf2onnx turns into ONNX LSTM ops."""
    run = run if isinstance(run, RunDir) else resolve_run(run)
    config = run.model_config()
    weights = run.require_best_weights()
    model = build_model(config, fused=fused)
    try:
        model.load_weights(weights)
    except (ValueError, OSError, KeyError) as err:  # what Keras raises for a bad file
        raise UserError(f"{weights}: cannot load the weights ({first_line(err)})") from None
    return model, config
