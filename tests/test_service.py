"""tf.data service on loopback: a dispatcher and 2 workers as processes (the documented
commands) feed training; every training example is produced exactly once per epoch."""

import os

import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from tests.images import encode, write
from zf_tf.pipelines import folder, inputs
from zf_tf.pipelines import service as service_lib

N = 24  # training images, 12 per class
BATCH = 4


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def service():
    """(dispatcher address, [worker processes]), started as the docs say; stopped after."""
    address, procs = service_lib.spawn(2, cwd=ROOT)
    try:
        yield address, procs[1:]
    finally:
        service_lib.stop(procs)


@pytest.mark.slow
def test_training_through_two_workers_sees_each_example_once_per_epoch(service, tmp_path):
    address, workers = service
    # Each image one gray level: any crop, flipped or not, says which image it is.
    root = tmp_path / "grays"
    for i in range(N):
        gray = np.full((72, 72, 3), 20 + 9 * i, np.uint8)
        write(f"{root}/train/c{i % 2}/{i}.png", encode(gray, "PNG"))
    for i in range(4):
        write(f"{root}/validation/c{i % 2}/{i}.png", encode(np.full((72, 72, 3), 7, np.uint8)))
    config = load_config()
    config.data.source, config.data.folder, config.data.num_classes = "folder", str(root), 2
    config.data.mean = (0.0, 0.0, 0.0)  # inputs are the gray levels themselves
    config.data.cache = False
    config.data.service_address = address
    config.model.width = 0.125
    config.train.batch_size = config.train.eval_batch_size = BATCH
    config.train.epochs, config.train.steps_per_epoch = 2, N // BATCH
    config.train.callbacks = ()
    folder.forget()

    before = [_cpu_seconds(w.pid) for w in workers]
    epochs = 3
    grays = []
    for images, labels in inputs.build_inputs(config, "train").take(epochs * N // BATCH):
        assert images.shape == (BATCH, 64, 64, 3)
        x = images.numpy()
        assert (x == x[:, :1, :1, :1]).all(axis=(1, 2, 3)).all()  # constant crops
        grays += [int(round(v)) for v in x[:, 0, 0, 0]]
        assert [(g - 20) // 9 % 2 for g in grays[-BATCH:]] == labels.numpy().tolist()
    for e in range(epochs):
        epoch = sorted(grays[e * N : (e + 1) * N])
        assert epoch == [20 + 9 * i for i in range(N)], f"epoch {e}: {epoch}"
    # The workers did the decoding (the trainer only received batches).
    assert all(_cpu_seconds(w.pid) > b for w, b in zip(workers, before))

    from zf_tf.training import strategies, train

    workdir = str(tmp_path / "workdir")
    history = train.train_and_evaluate(config, workdir, strategies.make_strategy("default"))
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert os.path.exists(os.path.join(workdir, "checkpoints", "model.keras"))


def test_an_unreachable_dispatcher_is_one_line_within_the_timeout(tmp_path):
    """Training through a dispatcher that is not there (nothing listening, no such host):
    one line naming the address and the cause after config.data.service_timeout, before
    anything is written."""
    import time

    from zf_tf import cli
    from zf_tf.analyses.base import Request
    from zf_tf.pipelines import DataError

    for address, cause in (("localhost:1", "Connection refused"), ("not_a_host:5050", "")):
        config = cli.resolved_config(
            cli.DEFAULT_CONFIG,
            [f"--config.data.service_address={address}", "--config.data.service_timeout=1"],
        )
        start = time.monotonic()
        with pytest.raises(
            DataError, match=f"no tf.data service dispatcher answers at {address}"
        ) as e:
            cli.run("train", config, Request(workdir=str(tmp_path / "w")))
        assert f"({cause}" in str(e.value)
        assert 1 <= time.monotonic() - start < 10
        assert not (tmp_path / "w").exists()
    with pytest.raises(
        DataError, match="Connection refused.*python -m zf_tf.pipelines.service disp"
    ):
        service_lib.wait_for("localhost:1", "tf.data service dispatcher", 0.5)
    with pytest.raises(DataError, match="'nohost' is not HOST:PORT"):
        service_lib.wait_for("nohost", "tf.data service dispatcher", 0.5)


def test_a_worker_says_whom_it_waits_for(monkeypatch):
    """A worker started before its dispatcher: a line naming it at once, then notices."""
    said = []
    monkeypatch.setattr(service_lib, "NOTICE_EVERY", 1.0)
    with pytest.raises(Exception):  # noqa: B017 - a bound only so that the test ends
        service_lib.wait_for("localhost:1", "tf.data service dispatcher", 2.5, say=said.append)
    assert said[0] == (
        "Waiting for the tf.data service dispatcher at localhost:1 (Connection refused; 0 s so "
        "far, giving up after 2.5 s)"
    )
    assert len(said) >= 2 and "1 s so far" in said[1]
