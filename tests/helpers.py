"""Helpers that test modules share (no test module imports another): main.py in a
subprocess and its error lines, TensorBoard events, the tiny training command line, a
local multi-worker cluster, random images."""

import contextlib
import copy
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tests.conftest import ROOT
from zf_tf import cli

# The tiny training runs of main.py (tiny_args): epochs, steps per epoch, model width.
EPOCHS = 2
STEPS = 4
WIDTH = 0.25


def with_aliases(config, mode, **aliases):
    """A copy of `config` with the alias flags `aliases` (layer=, top_k=, features=, ...)
    set as the command line sets them for `mode` (`cli.alias_overrides`)."""
    config = copy.deepcopy(config)
    cli.apply_overrides(config, cli.alias_overrides(config, mode, aliases))
    return config


def main_py(*args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def error_lines(proc):
    """stderr lines that are not TF/absl logging (e.g. 'I1127 00:22:46.4 ...')."""
    log = re.compile(r"^([IWEF]\d{4} |WARNING: All log)")
    return [line for line in proc.stderr.splitlines() if line and not log.match(line)]


def tiny_args(data_dir, workdir, *extra):
    """main.py's arguments for tiny_train_config."""
    return [
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.tfds_config=tiny",
        "--config.data.shuffle_buffer=64",
        f"--config.model.width={WIDTH}",
        "--config.train.batch_size=16",
        "--config.train.eval_batch_size=16",
        f"--config.train.epochs={EPOCHS}",
        f"--config.train.steps_per_epoch={STEPS}",
        "--config.analysis.evolution.probe_images=16",
        *extra,
    ]


def events(logdir):
    """{tag: [(step, value)]} of all event files under logdir (images decoded)."""
    out = {}
    for root, _, files in os.walk(logdir):
        for f in files:
            for e in tf.compat.v1.train.summary_iterator(os.path.join(root, f)):
                for v in e.summary.value:
                    t = tf.make_ndarray(v.tensor) if v.HasField("tensor") else None
                    if t is not None and t.dtype == object and t.shape == (3,):
                        t = tf.io.decode_png(t[2]).numpy()  # [width, height, png]
                    out.setdefault(v.tag, []).append((e.step, t))
    return out


def local_cluster(workers: int = 2) -> dict:
    """A TF_CONFIG cluster of `workers` distinct free loopback ports (the sockets are held
    until all are chosen: closing each at once may hand the same port out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(workers)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]}


def worker_env(tmp_path, cluster, index):
    """The environment of worker `index` of `cluster`, with its own TMPDIR."""
    tmpdir = tmp_path / f"tmp{index}"
    tmpdir.mkdir(exist_ok=True)
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        TMPDIR=str(tmpdir),
        TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
    )


def run_workers(tmp_path, command, timeout=400):
    """Runs `command` (or a list of one command per worker) as the 2 workers of a local
    cluster; [(returncode, stdout, stderr)]."""
    cluster = local_cluster()
    commands = command if isinstance(command[0], list) else [command] * 2
    procs = [
        subprocess.Popen(
            commands[i],
            cwd=ROOT,
            env=worker_env(tmp_path, cluster, i),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, *out) for p, out in zip(procs, outs)]


def random_images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, size, size, 3)) * 60).astype("float32")
