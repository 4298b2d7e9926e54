"""tf.distribute strategies by name: default, mirrored (GPUs, or the CPU split into logical
devices), multi_worker (TF_CONFIG), tpu."""

from __future__ import annotations

from zf_tf.core.errors import UsageError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str, cpu_replicas: int = 2):
    """Creates a tf.distribute strategy by name; must run before any other TF op.

    Args:
      name: one of STRATEGIES.
      cpu_replicas: for 'mirrored' on a machine without GPUs, the CPU is split into this
        many logical devices so that MirroredStrategy really runs that many replicas.

    Raises:
      UsageError: unknown name, or no TPU reachable for 'tpu'.
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
