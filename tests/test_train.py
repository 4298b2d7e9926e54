"""Training end to end through main.py: artifacts, TensorBoard, eval, export, resume,
replica equivalence, multi-worker, divergence."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines import inputs, preprocess
from tests.conftest import ROOT
from tests.test_cli import error_lines, main_py
from zf_tf.training import train, workdirs

EPOCHS = 2


def tiny_args(data_dir, workdir, *extra):
    return [
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.tfds_config=tiny",
        "--config.data.shuffle_buffer=64",
        "--config.train.batch_size=16",
        "--config.train.eval_batch_size=16",
        f"--config.train.epochs={EPOCHS}",
        "--config.analysis.evolution.probe_images=16",  # keep the Fig. 4 snapshots cheap
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_data_dir, tmp_path_factory):
    """A workdir trained by the real command with 2 mirrored CPU replicas."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    proc = main_py("--mode=train", "--strategy=mirrored", *tiny_args(tiny_data_dir, workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


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


def test_artifacts(trained):
    workdir, proc = trained
    for path in (
        "config.json",
        "checkpoints/model.keras",
        "eval.json",
        "eval.md",
        "history.csv",
        "export/saved_model.pb",
        "backup/training_metadata.json",
        # Feature-evolution snapshots: epoch 1 of the paper's list and the final epoch.
        "evolution/epoch_001.npz",
        f"evolution/epoch_{EPOCHS:03d}.npz",
    ):
        assert (workdir / path).exists(), path
    assert "with 2 replica(s)" in proc.stderr
    config = json.loads((workdir / "config.json").read_text())  # the resolved config
    assert config["data"]["crop_size"] == config["model"]["input_size"] == 64
    assert config["train"]["epochs"] == EPOCHS
    rows = (workdir / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("loss", "top1", "top5", "val_loss", "val_top1", "val_top5", "learning_rate"):
        assert key in header, key
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(EPOCHS))
    results = json.loads((workdir / "eval.json").read_text())
    assert results["num_images"] == 50
    for key in ("ten_crop", "center_crop"):
        assert 0 <= results[key]["top5_error"] <= results[key]["top1_error"] <= 100
    assert "1 convnet, 10 crops averaged" in (workdir / "eval.md").read_text()


def test_tensorboard_scalars_and_images(trained):
    workdir, _ = trained
    scalars = {**events(workdir / "logs" / "train"), **events(workdir / "logs" / "validation")}
    for tag in ("epoch_loss", "epoch_top1", "epoch_top5", "epoch_learning_rate"):
        assert tag in scalars, sorted(scalars)
    images = events(workdir / "logs" / "images")
    assert [s for s, _ in images["conv1_filters"]] == list(range(1, EPOCHS + 1))
    filters = images["conv1_filters"][-1][1]
    side = int(math.ceil(math.sqrt(24)))  # 24 conv1 filters at width 0.25
    assert filters.shape == (side * 28 + (side - 1) * 2, side * 28 + (side - 1) * 2, 3)
    crops = images["train_crops"][-1][1]
    assert crops.shape == (2 * 64 + 2, 10 * 64 + 9 * 2, 3)
    assert images["filter_rms"][-1][1].ndim == 3
    assert "filter_rms_max/conv5" in images


def test_eval_mode_rewrites_table(trained):
    workdir, _ = trained
    before = json.loads((workdir / "eval.json").read_text())
    proc = main_py("--mode=eval", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((workdir / "eval.json").read_text()) == before
    assert "| 1 convnet, center crop |" in proc.stdout


def test_export_matches_keras_in_fresh_process(trained, tiny_config):
    workdir, _ = trained
    model = workdirs.load_model(str(workdir))
    config = tiny_config
    encoded = [e.numpy() for e, _ in inputs.encoded_records(config.data, "test").take(3)]
    crops = np.stack([preprocess.ten_crops(e, 72, 64, config.data.mean) for e in encoded])
    probs = tf.nn.softmax(model.predict(crops.reshape(-1, 64, 64, 3), verbose=0)).numpy()
    expected = probs.reshape(3, 10, -1).mean(axis=1)
    images = np.stack([tf.io.decode_png(e).numpy() for e in encoded])
    np.save(workdir / "images.npy", images)
    script = f"""
import json, numpy as np, tensorflow as tf
m = tf.saved_model.load({str(workdir / "export")!r})
images = np.load({str(workdir / "images.npy")!r})
b = m.signatures["serving_default"](image_bytes=tf.constant({encoded!r}))
u = m.signatures["serve_images"](images=tf.constant(images))
print(json.dumps([b["probabilities"].numpy().tolist(), u["probabilities"].numpy().tolist()]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_bytes, from_images = (np.array(p) for p in json.loads(proc.stdout.splitlines()[-1]))
    np.testing.assert_allclose(from_bytes, expected, atol=1e-5)
    np.testing.assert_allclose(from_images, expected, atol=1e-5)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", str(workdir / "export"), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "signature_def['serving_default']" in shown.stdout
    assert "signature_def['serve_images']" in shown.stdout


def test_export_is_atomic(trained, tiny_config, monkeypatch):
    workdir, _ = trained
    from zf_tf.training import export

    model = workdirs.load_model(str(workdir))
    stamp = (workdir / "export" / "saved_model.pb").stat().st_mtime_ns

    def broken_save(*args, **kwargs):
        os.makedirs(args[1], exist_ok=True)
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        export.export(model, tiny_config, str(workdir))
    assert (workdir / "export" / "saved_model.pb").stat().st_mtime_ns == stamp


def test_rerun_resumes_and_other_config_is_refused(trained, tiny_data_dir):
    workdir, _ = trained
    # Same command again: restored at the final epoch, trains no more.
    proc = main_py("--mode=train", *tiny_args(tiny_data_dir, workdir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (workdir / "history.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(EPOCHS))
    proc = main_py("--mode=train", *tiny_args(tiny_data_dir, workdir, "--config.train.epochs=3"))
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and "train.epochs" in lines[0] and "--overwrite" in lines[0]


def test_nan_never_overwrites_checkpoint(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = str(tmp_path / "checkpoints" / "model.keras")
    cb = train.LastGoodCheckpoint(path)
    cb.set_model(model)
    cb.on_epoch_end(0, {"loss": 1.0})
    good = model.get_weights()
    model.set_weights([np.full_like(w, np.nan) for w in good])
    cb.on_epoch_end(1, {"loss": float("nan")})
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.get_weights()[0], good[0])
    backup = train.SafeBackupAndRestore(str(tmp_path / "backup"))
    backup.set_model(model)
    backup.on_epoch_end(1, {"loss": float("inf")})
    assert not (tmp_path / "backup").exists()


def test_diverging_run_fails_cleanly(tiny_data_dir, tmp_path):
    workdir = tmp_path / "w"
    proc = main_py(
        "--mode=train",
        *tiny_args(
            tiny_data_dir,
            workdir,
            "--config.train.learning_rate=1e6",
            "--config.train.epochs=1",
            "--config.model.max_filter_rms=0",
        ),
    )
    assert proc.returncode == 1
    assert "diverged" in error_lines(proc)[-1]
    assert not (workdir / "checkpoints" / "model.keras").exists()


def test_one_replica_equals_two_replicas():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "replica_step.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["max_abs_update"] > 1e-3  # the step really moved the weights
    assert result["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_resume_after_sigkill(tiny_data_dir, tmp_path):
    workdir = tmp_path / "w"
    args = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--mode=train",
        *tiny_args(tiny_data_dir, workdir, "--config.train.epochs=5"),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    meta = workdir / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text() or "{}").get("epoch", 0) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(meta.read_text())["epoch"]
    assert 2 <= done < 5, "killed too late to test resuming"
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Epoch {done + 1}/5" in rerun.stdout  # resumed, not from scratch
    assert "Epoch 1/5" not in rerun.stdout
    rows = (workdir / "history.csv").read_text().splitlines()
    epochs = [int(r.split(",")[0]) for r in rows if r and r[0].isdigit()]
    assert epochs[-1] == 4 and sorted(set(epochs)) == list(range(5))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker(tiny_data_dir, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workdir = tmp_path / "w"
    procs = []
    for i in range(2):
        tmpdir = tmp_path / f"tmp{i}"
        tmpdir.mkdir()
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="3",
            TMPDIR=str(tmpdir),
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        )
        args = [
            sys.executable,
            os.path.join(ROOT, "main.py"),
            "--mode=train",
            "--strategy=multi_worker",
            *tiny_args(
                tiny_data_dir,
                workdir,
                "--config.train.epochs=1",
                "--config.train.steps_per_epoch=3",
            ),
        ]
        procs.append(
            subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    sums = [
        [line.rsplit(" ", 1)[1] for line in err.splitlines() if "weights checksum" in line]
        for _, err in outs
    ]
    assert sums[0] and sums[0] == sums[1]  # identical weights on both workers
    assert (workdir / "checkpoints" / "model.keras").exists()
    assert (workdir / "export" / "saved_model.pb").exists()
    assert any((workdir / "logs").iterdir())
    assert not list((tmp_path / "tmp1").glob("zf_tf_worker_*"))  # worker cleaned up
