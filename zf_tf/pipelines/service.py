"""tf.data service: the training input pipeline runs on other processes or machines.

With `config.data.service_address = "HOST:PORT"` (a dispatcher's address) the training
pipeline of `inputs.build_inputs` (read, shuffle, decode the crop, flip, batch) is sent
to the tf.data service (`tf.data.experimental.service.distribute`) in the
"distributed_epoch" processing mode: the dispatcher hands the data's splits (files, tfds
shards, or the folder's file list) to the workers, each worker decodes its part, and every
training example is produced exactly once per epoch. The trainer only receives and
rebatches batches (uint8 where the crops are; training normalizes them on its device), so
its cores stay free for the model.
Evaluation and the analyses read the data locally.

Start a dispatcher, then workers (on this machine or others that can read the same data
paths), then train:

    python -m zf_tf.pipelines.service dispatcher --port=5050
    python -m zf_tf.pipelines.service worker --dispatcher=localhost:5050      # one per process
    python main.py --mode=train --config.data.service_address=localhost:5050

Each command serves until it is stopped (Ctrl-C); a dispatcher given `--work_dir` keeps its
journal there, so it can be restarted without losing the running jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import tensorflow as tf

from zf_tf.pipelines import DataError

DEFAULT_TIMEOUT = 60.0  # seconds a trainer waits for an unreachable dispatcher
NOTICE_EVERY = 30.0  # seconds between "still waiting" lines
PROCESSING_MODE = "distributed_epoch"
PROTOCOL = "grpc"
COMPRESSION = None
# The folder holding the zf_tf package: `python -m zf_tf.pipelines.service` works from there.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def host_port(address: str) -> tuple[str, int]:
    """("HOST", PORT) of "HOST:PORT" (a grpc:// prefix allowed).

    Raises:
      DataError: not of that form.
    """
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"service address {address!r} is not HOST:PORT (e.g. localhost:5050)")
    return host, int(port)


def unreachable(address: str, timeout: float = 2.0) -> str | None:
    """Why nothing answers a TCP connection at "HOST:PORT" ('Connection refused', 'Name or
    service not known', 'timed out'), or None when something does."""
    try:
        with socket.create_connection(host_port(address), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def wait_for(address: str, what: str, timeout: float | None, say=print) -> None:
    """Waits until `address` answers, saying for whom it waits, then a notice every
    NOTICE_EVERY seconds; `timeout` None waits for ever (a worker started before its
    dispatcher), else at most `timeout` seconds.

    Raises:
      DataError: `timeout` passed; one line naming the address, the cause and what to do.
    """
    start, notice = time.monotonic(), 0.0
    why = unreachable(address)
    while why is not None:
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            port = host_port(address)[1]
            raise DataError(
                f"no {what} answers at {address} ({why}) after {timeout:g} s: start one "
                f"(python -m zf_tf.pipelines.service dispatcher --port={port}), or fix "
                "config.data.service_address (config.data.service_timeout sets the wait)"
            )
        if waited >= notice:
            limit = "" if timeout is None else f", giving up after {timeout:g} s"
            say(f"Waiting for the {what} at {address} ({why}; {waited:.0f} s so far{limit})")
            notice += NOTICE_EVERY
        time.sleep(1.0)
        why = unreachable(address)


def distribute(ds: tf.data.Dataset, address: str, job_name: str | None = None):
    """`ds` produced by the tf.data service at `address` ("HOST:PORT" of a dispatcher),
    each element once per iteration (distributed epoch)."""
    return ds.apply(
        tf.data.experimental.service.distribute(
            processing_mode=PROCESSING_MODE,
            service=f"{PROTOCOL}://{address}",
            job_name=job_name,
            compression=COMPRESSION,
        )
    )


def start_dispatcher(port: int = 0, work_dir: str | None = None):
    """A started DispatchServer (port 0: any free port; its `target` says which)."""
    config = tf.data.experimental.service.DispatcherConfig(
        port=port, protocol=PROTOCOL, work_dir=work_dir, fault_tolerant_mode=bool(work_dir)
    )
    return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher: str, port: int = 0):
    """A started WorkerServer registered with the dispatcher at "HOST:PORT"."""
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=dispatcher, port=port, protocol=PROTOCOL
    )
    return tf.data.experimental.service.WorkerServer(config)


def spawn(num_workers: int = 2, cwd: str | None = None):
    """A dispatcher and `num_workers` workers on this machine, each a process of this
    module's command line (as the docs start them), for tests and benchmarks.

    Returns:
      ("localhost:PORT" of the dispatcher, [the processes: dispatcher first]); end them
      with `stop`.
    """

    def start(*args):
        return subprocess.Popen(
            [sys.executable, "-m", "zf_tf.pipelines.service", *args],
            cwd=cwd or _ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )

    procs = [start("dispatcher", "--port=0")]
    try:
        line = procs[0].stdout.readline()
        if "dispatcher at " not in line:
            raise RuntimeError(f"the tf.data service dispatcher did not start: {line!r}")
        address = line.split("dispatcher at ")[1].split(":")[:2]
        address = ":".join(address)
        procs += [start("worker", f"--dispatcher={address}") for _ in range(num_workers)]
        for worker in procs[1:]:
            if "serving" not in worker.stdout.readline():
                raise RuntimeError("a tf.data service worker did not start")
    except BaseException:
        stop(procs)
        raise
    return address, procs


def stop(procs) -> None:
    """Ends the processes of `spawn` (SIGTERM, then SIGKILL after 30 s)."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zf_tf.pipelines.service", description=__doc__.splitlines()[0]
    )
    roles = parser.add_subparsers(dest="role", required=True)
    dispatcher = roles.add_parser("dispatcher", help="hands out the data's splits")
    dispatcher.add_argument("--port", type=int, default=5050, help="0 = any free port")
    dispatcher.add_argument("--work_dir", default=None, help="journal, for restarts")
    worker = roles.add_parser("worker", help="runs the input pipeline")
    worker.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    worker.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = parser.parse_args(argv)
    if args.role == "dispatcher":
        server = start_dispatcher(args.port, args.work_dir)
        address = server.target.split("://")[-1]
        print(
            f"tf.data service dispatcher at {address}: train with "
            f"--config.data.service_address={address}",
            flush=True,
        )
    else:
        wait_for(args.dispatcher, "tf.data service dispatcher", None, say=_say)
        server = start_worker(args.dispatcher, args.port)
        print(f"tf.data service worker of {args.dispatcher} serving", flush=True)
    # Not server.join(): a Python loop lets SIGINT / SIGTERM stop the server at once, and
    # os._exit skips the servers' destructors, which wait for clients still connected.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        sys.stdout.flush()
        os._exit(0)


def _say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
