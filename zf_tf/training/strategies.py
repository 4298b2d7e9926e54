"""tf.distribute strategies by name: default, mirrored (GPUs, or the CPU split into logical
devices), multi_worker (TF_CONFIG), tpu."""

from __future__ import annotations

import json
import os

from zf_tf.core.errors import UsageError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


TF_CONFIG_FORM = (
    '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
)


def check_tf_config(text: str):
    """Raises UsageError unless TF_CONFIG (if set) is a cluster spec with this task in it.

    Unset (or empty) is one worker on its own, as tf.distribute has it."""
    if not text.strip():
        return

    def bad(why):
        return UsageError(f"TF_CONFIG is not valid ({why}): it must look like {TF_CONFIG_FORM}")

    try:
        spec = json.loads(text)
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise bad("no 'cluster' object")
    for job, hosts in cluster.items():
        if not isinstance(hosts, list) or not all(
            isinstance(h, str) and h.rpartition(":")[2].isdigit() for h in hosts
        ):
            raise bad(f"cluster.{job} must be a list of 'host:port' strings")
    task = spec.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise bad(f"task.type must be one of {', '.join(cluster)}")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise bad(f"task.index must be 0..{len(cluster[task['type']]) - 1}")


def make_strategy(name: str, cpu_replicas: int = 2):
    """Creates a tf.distribute strategy by name; must run before any other TF op.

    Args:
      name: one of STRATEGIES.
      cpu_replicas: for 'mirrored' on a machine without GPUs, the CPU is split into this
        many logical devices so that MirroredStrategy really runs that many replicas.

    Raises:
      UsageError: unknown name, a malformed TF_CONFIG for 'multi_worker', or no TPU
        reachable for 'tpu'.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        if tf.config.get_logical_device_configuration(cpu) is None and cpu_replicas > 1:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
            )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG", ""))
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise UsageError(
                f"--strategy=tpu: no TPU reachable ({str(e).splitlines()[0]})"
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise UsageError(f"unknown strategy {name!r}: valid strategies: {', '.join(STRATEGIES)}")
