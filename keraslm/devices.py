"""Choosing devices and the tf.distribute strategy that spans them."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from keraslm.errors import UserError


def configure_cpu_devices(count: int) -> None:
    """Split the physical CPU into `count` logical devices (one replica each).

    Must run before TensorFlow initialises its devices; calling it again with the same count is a
    no-op, and with a smaller count the first `count` devices are used by `make_strategy`.
    """
    if count < 1:
        raise UserError(f"--cpu-replicas must be at least 1, got {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing and len(existing) >= count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as err:
        raise UserError(
            f"cannot split the CPU into {count} replicas: TensorFlow is already initialised ({err})"
        ) from None


_STRATEGIES: dict[tuple[str, int | None], tf.distribute.Strategy] = {}


def make_strategy(kind: str = "mirrored", cpu_replicas: int | None = None) -> tf.distribute.Strategy:
    """A MirroredStrategy over all GPUs, else over `cpu_replicas` logical CPUs (default 1).

    `kind="multiworker"` reads the standard `TF_CONFIG` and uses MultiWorkerMirroredStrategy.
    Strategies are cached per process: a second strategy over the same devices running another
    program fails in TensorFlow's collectives ("Shape mismatch in the collective instance").
    """
    key = (kind, cpu_replicas)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _new_strategy(kind, cpu_replicas)
    return _STRATEGIES[key]


def _new_strategy(kind: str, cpu_replicas: int | None) -> tf.distribute.Strategy:
    if kind == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multiworker needs the TF_CONFIG environment variable")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as err:
            raise UserError(f"TF_CONFIG is not valid JSON: {err}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind != "mirrored":
        raise UserError(f"unknown strategy {kind!r}; choose 'mirrored' or 'multiworker'")
    # Physical listing does not initialise the runtime; logical CPUs must be split before that.
    if tf.config.list_physical_devices("GPU") and not cpu_replicas:
        return tf.distribute.MirroredStrategy()
    count = cpu_replicas or 1
    if count > 1:
        configure_cpu_devices(count)
    cpus = tf.config.list_logical_devices("CPU")[:count]
    if len(cpus) < count:
        raise UserError(f"asked for {count} CPU replicas but only {len(cpus)} logical CPUs exist")
    return tf.distribute.MirroredStrategy([d.name for d in cpus])
