"""Training: `train(config)` sets up a run and runs its epoch loop.

    run.py         train(config): set up, run the loop; a failed peer as one line
    setup.py       the typed set-up, done once: data, vocabulary, run directory (`prepare`),
                   then model, optimizer, trainer, fine-tune weights or checkpoint (`build`)
    loop.py        the epoch loop: carried state, validation, best weights, LR decay, checkpoints
    schedule.py    the learning rate after a validation: plateau decay or GluonNLP's step schedule
    averaging.py   NT-ASGD: its trigger and the running average of the weights
    step.py        the distributed truncated-BPTT step (clipping, MXNet's twin biases)
    checkpoint.py  the resumable state, one atomic file
    devices.py     the tf.distribute strategy over GPUs, CPUs or workers
    signals.py     Ctrl-C and SIGTERM as stop requests honoured at consistent points
"""

from keraslm.training.run import train
from keraslm.training.signals import Stopped

__all__ = ["Stopped", "train"]
