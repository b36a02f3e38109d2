"""Training: `train(config)` sets up a run and runs its epoch loop.

    run.py         set up (data, vocabulary, model config, run directory) and run
    loop.py        the epoch loop: carried state, validation, best weights, LR decay, checkpoints
    step.py        the distributed truncated-BPTT step (clipping, MXNet's twin biases)
    checkpoint.py  the resumable state, one atomic file
    devices.py     the tf.distribute strategy over GPUs, CPUs or workers
    signals.py     Ctrl-C and SIGTERM as stop requests honoured at consistent points
"""

from keraslm.training.run import train
from keraslm.training.signals import Stopped

__all__ = ["Stopped", "train"]
