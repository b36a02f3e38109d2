"""Train: `train(config)` sets a run up (`setup.py`) and runs its epoch loop (`loop.py`).

The loop runs under the strategy (`devices.py`) with Ctrl-C and SIGTERM turned into stop
requests (`signals.py`); a multi-worker run whose peer fails stops with one line saying how to
continue.
"""

from __future__ import annotations

import re
import shutil

from keraslm.backend import tf
from keraslm.config import TrainConfig
from keraslm.errors import UserError
from keraslm.rundir import RunDir
from keraslm.training.devices import is_chief, is_multiworker, make_strategy
from keraslm.training.loop import EpochLoop
from keraslm.training.setup import Prepared, build, prepare
from keraslm.training.signals import StopRequest

PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                 tf.errors.AbortedError, tf.errors.CancelledError)


def train(config: TrainConfig, command: list[str] | None = None) -> RunDir:
    """Train as `config` says and return the run directory.

    `config.run.resume` names a run to continue (see `keraslm.config.resume_config` for how its
    saved settings combine with new ones). `command` is recorded in config.json (by default, the
    command line equivalent to `config`). A SIGINT or
    SIGTERM stops at the next consistent point and raises `signals.Stopped` after saving.
    """
    strategy = make_strategy(config.run.strategy, config.run.cpu_replicas)
    prepared = prepare(config, is_chief(strategy), command)
    try:
        with StopRequest() as stop:
            EpochLoop(build(prepared, strategy), stop).run()
    except PEER_FAILURES as err:
        if not is_multiworker(strategy):
            raise
        raise UserError(_peer_failure(err, strategy, prepared)) from None
    finally:
        if prepared.scratch is not None:
            shutil.rmtree(prepared.scratch, ignore_errors=True)
    return prepared.run


def _peer_failure(err: Exception, strategy: tf.distribute.Strategy, prepared: Prepared) -> str:
    """One line for collectives aborted because another worker died or cannot be reached."""
    resolver = strategy.cluster_resolver
    me = (resolver.task_type, str(resolver.task_id))
    peers = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", str(err))) - {me})
    who = ", ".join(f"{job} {task}" for job, task in peers) or "another worker"
    run = "<run>" if prepared.scratch is not None else str(prepared.run.path)
    return (f"multi-worker training stopped: {who} failed or cannot be reached "
            f"({type(err).__name__}); restart every worker with --resume {run} to continue "
            f"from the last checkpoint")
