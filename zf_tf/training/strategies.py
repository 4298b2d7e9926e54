"""tf.distribute strategies by name: default, mirrored (GPUs, or the CPU split into logical
devices), multi_worker (TF_CONFIG), tpu."""

from __future__ import annotations

import json
import os
import sys

from zf_tf.core.errors import UsageError
from zf_tf.pipelines import service

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
CLUSTER_TIMEOUT = 60.0  # seconds a multi_worker run waits for its peers by default


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


def make_strategy(name: str, cpu_replicas: int = 2, cluster_timeout: float = CLUSTER_TIMEOUT):
    """Creates a tf.distribute strategy by name; must run before any other TF op.

    Args:
      name: one of STRATEGIES.
      cpu_replicas: for 'mirrored' on a machine without GPUs, the CPU is split into this
        many logical devices so that MirroredStrategy really runs that many replicas.
      cluster_timeout: for 'multi_worker', seconds to wait for every worker to join.

    Raises:
      UsageError: unknown name, a malformed TF_CONFIG for 'multi_worker', a worker that
        does not join within `cluster_timeout`, or no TPU reachable for 'tpu'.
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
        return _multi_worker(cluster_timeout)
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


def sum_over_replicas(strategy, values):
    """float64 numpy (len(values),): each of `values` (numbers, the same count on every
    replica) summed over the replicas of `strategy`, of every worker, in one all-reduce.
    Every worker must call it at the same point (a collective)."""
    import tensorflow as tf

    values = [float(v) for v in values]
    mine = tf.constant(values or [0.0], tf.float64)  # never an empty all-reduce
    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(mine)), axis=None
    )
    return total.numpy()[: len(values)]


def _peers() -> list[tuple[str, int, str]]:
    """(job, index, address) of every other task of TF_CONFIG."""
    spec = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    me = spec.get("task", {})
    return [
        (job, i, address)
        for job, hosts in spec.get("cluster", {}).items()
        for i, address in enumerate(hosts)
        if (job, i) != (me.get("type"), me.get("index"))
    ]


# The watchdog process of `_multi_worker`: argv = parent pid, pipe fd, timeout, message.
# It waits for the pipe to close (the strategy exists, or the parent died). If `timeout`
# passes first, it prints the message and ends the parent; so it does at once if SIGINT or
# SIGTERM is pending for the parent (Linux: /proc/PID/status ShdPnd), whose signal thread
# cannot take it while TensorFlow holds the GIL (`core.interrupts`). Ctrl-C reaches the
# watchdog too (same process group): it ignores it and acts for the parent.
_WATCHDOG = """
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, fd, timeout, message = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def pending():
    try:
        with open(f"/proc/{parent}/status") as f:
            bits = next(int(l.split()[1], 16) for l in f if l.startswith("ShdPnd:"))
    except (OSError, StopIteration, ValueError):
        return None
    return next((s for s in (signal.SIGTERM, signal.SIGINT) if bits >> (s - 1) & 1), None)

deadline = time.monotonic() + timeout
while not select.select([fd], [], [], max(0.0, min(0.25, deadline - time.monotonic())))[0]:
    if (sig := pending()) or time.monotonic() >= deadline:
        print(message if not sig else f"\\n{signal.Signals(sig).name}: stopping while waiting "
              "for the other workers (nothing was written)", file=sys.stderr, flush=True)
        os.kill(parent, signal.SIGKILL)
        break
"""


def _multi_worker(timeout: float):
    """MultiWorkerMirroredStrategy, waiting at most `timeout` s for the other workers.

    Its constructor waits inside TensorFlow until every worker of TF_CONFIG has connected
    to the coordination service, silently, for as long as an hour, holding the GIL (so no
    Python thread or signal handler runs) and ignoring the coordination service's own
    registration timeout (checked with TensorFlow 2.21). So a small watchdog process
    bounds it: if the strategy does not exist after `timeout` s, it prints one line naming
    the peers that do not answer and ends this process (nothing is written before the
    strategy exists); a SIGINT or SIGTERM ends it at once, with a line.
    """
    import subprocess

    import tensorflow as tf

    peers = _peers()
    if not peers:
        return tf.distribute.MultiWorkerMirroredStrategy()
    names = ", ".join(f"{job} {i} at {address}" for job, i, address in peers)
    print(f"Waiting up to {timeout:g} s for the other workers: {names}", flush=True)
    # Probed now, named if still missing when the watchdog fires: a peer that answers now
    # but never joins is named by the list of all of them.
    missing = [
        f"{job} {i} at {address} ({why})"
        for job, i, address in peers
        if (why := service.unreachable(address, timeout=1.0)) is not None
    ]
    message = (
        f"error: --strategy=multi_worker: {', '.join(missing) or names} did not join within "
        f"{timeout:g} s: start every worker of TF_CONFIG (each with its own task index), or "
        "raise config.train.cluster_timeout"
    )
    read, write = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(read), str(timeout), message],
        pass_fds=(read,),
    )
    os.close(read)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        os.close(write)
        watchdog.wait()
