"""Choosing devices and the tf.distribute strategy that spans them."""

from __future__ import annotations

import json
import os

from keraslm.backend import tf
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
        _check_tf_config()
        if cpu_replicas and cpu_replicas > 1:
            raise UserError("--cpu-replicas does not apply to --strategy multiworker: each worker "
                            "uses its GPUs, or one CPU replica when it has none")
        # TensorFlow's collective all-reduce; peer failures are detected by the coordination
        # service's heartbeats, which abort the collectives of the surviving workers.
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


def _check_tf_config() -> None:
    """Fail with one line on a missing or malformed TF_CONFIG (TensorFlow's errors are obscure)."""
    if "TF_CONFIG" not in os.environ:
        raise UserError("--strategy multiworker needs the TF_CONFIG environment variable")
    try:
        config = json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as err:
        raise UserError(f"TF_CONFIG is not valid JSON: {err}") from None
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError('TF_CONFIG needs a "cluster" and a "task", e.g. {"cluster": {"worker": '
                        '["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}')
    hosts = cluster.get(task.get("type"))
    if not isinstance(hosts, list) or not 0 <= task.get("index", -1) < len(hosts):
        raise UserError(f"TF_CONFIG task {task} is not in its cluster {cluster}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the one process that writes: the chief, else worker 0, else a single process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0


def is_multiworker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
