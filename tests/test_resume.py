"""Resume points (zf_tf/training/resume.py) without training: which file a rerun continues
from after a kill at each moment of an epoch's writes, and history.csv cut back to it.
The process-level chaos test is tests/test_train.py::test_chaos_ten_sigkills_lose_no_epoch."""

import json
import os

import keras
import numpy as np
import pytest

from zf_tf.core.errors import UsageError
from zf_tf.training import resume, workdirs


def compiled():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    return model


def train_epoch(model, epoch, workdir):
    """One epoch as train.py ends it: a step, the checkpoint, then the backup."""
    model.fit(np.ones((4, 3)), np.full((4, 2), epoch), epochs=1, verbose=0)
    for callback in (
        resume.LastGoodCheckpoint(workdirs.checkpoint_path(workdir)),
        resume.Backup(workdir),
    ):
        callback.set_model(model)
        callback.on_epoch_end(epoch, {"loss": 1.0})


def restored(workdir):
    model = compiled()
    callback = resume.Resume(workdir)
    callback.set_model(model)
    callback.on_train_begin()
    return callback.epochs_done, model


def test_resume_points_after_each_kind_of_kill(tmp_path):
    workdir = str(tmp_path)
    model = compiled()
    for epoch in range(3):
        train_epoch(model, epoch, workdir)
    names = sorted(os.listdir(tmp_path / "backup"))
    assert names == ["epoch_0002.weights.h5", "epoch_0003.weights.h5"]  # the 2 newest
    checkpoint = workdirs.checkpoint_path(workdir)
    points = resume.resume_points(workdir)
    assert [(e, os.path.basename(p)) for e, p in points] == [
        (3, "epoch_0003.weights.h5"),
        (3, "model.keras"),
        (2, "epoch_0002.weights.h5"),
    ]
    done, again = restored(workdir)
    assert done == 3 and int(again.optimizer.iterations.numpy()) == 3
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Killed between the checkpoint and its epoch record: the record names another file.
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    with resume.outputs.atomic(checkpoint, ".tmp.keras") as tmp:
        model.save(tmp)
    assert resume.checkpoint_epochs(checkpoint) is None
    os.remove(tmp_path / "backup" / "epoch_0003.weights.h5")
    assert restored(workdir)[0] == 2  # not the checkpoint of unknown epoch
    # Killed between the checkpoint (epoch 4) and the backup: the checkpoint is newest.
    resume.save_model(model, checkpoint, epochs_done=4)
    assert resume.checkpoint_epochs(checkpoint) == 4
    assert restored(workdir)[0] == 4


def test_damaged_points_are_passed_over_then_refused(tmp_path, capsys):
    workdir = str(tmp_path)
    model = compiled()
    for epoch in range(2):
        train_epoch(model, epoch, workdir)
    newest = tmp_path / "backup" / "epoch_0002.weights.h5"
    newest.write_bytes(newest.read_bytes()[:100])
    (tmp_path / "backup" / "epoch_0003.weights.h5.tmp.weights.h5").write_bytes(b"cut short")
    assert restored(workdir)[0] == 2  # the checkpoint of epoch 2
    assert f"Damaged: {newest}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "backup")) == [
        "epoch_0001.weights.h5",
        "epoch_0002.weights.h5",
    ]  # the temporary of a killed write is gone
    for path in (workdirs.checkpoint_path(workdir), tmp_path / "backup" / "epoch_0001.weights.h5"):
        with open(path, "r+b") as f:
            f.truncate(64)
        if path != tmp_path / "backup" / "epoch_0001.weights.h5":
            assert restored(workdir)[0] == 1  # the checkpoint too: the backup before
    with pytest.raises(UsageError, match="nothing good to resume from: start afresh"):
        restored(workdir)


def test_keras_backup_of_older_workdirs_resumes(tmp_path):
    model = compiled()
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    (tmp_path / "backup").mkdir()
    model.save_weights(str(tmp_path / "backup" / "latest.weights.h5"))
    (tmp_path / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 5}))
    done, again = restored(str(tmp_path))
    assert done == 5 and int(again.optimizer.iterations.numpy()) == 1


def test_history_is_cut_back_to_the_resume_point(tmp_path):
    rows = ["epoch,loss", "0,2.0", "1,1.5", "2,1.2", "2,1.2"]  # killed after a row, rerun
    (tmp_path / "history.csv").write_text("\n".join(rows) + "\n")
    resume.truncate_history(str(tmp_path), 2)
    assert (tmp_path / "history.csv").read_text() == "epoch,loss\n0,2.0\n1,1.5\n"
    resume.truncate_history(str(tmp_path / "none"), 2)  # no history yet: nothing to do


def test_the_step_schedule_depends_on_the_epoch_alone():
    """config.train.lr_drop_epochs: the rate after each listed epoch is divided, from the
    epoch index only, so a run resumed at any epoch continues the same schedule."""
    import keras

    from zf_tf.training import callbacks

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    drops = callbacks.StepDrops(0.01, 0.1, (3, 5))
    drops.set_model(model)
    for epoch, rate in (
        (0, 0.01),
        (2, 0.01),
        (3, 0.001),
        (4, 0.001),
        (5, 1e-4),
        (9, 1e-4),
        (1, 0.01),
    ):
        drops.on_epoch_begin(epoch)
        assert float(model.optimizer.learning_rate) == pytest.approx(rate), epoch


def test_workers_that_would_resume_from_different_epochs_are_refused(monkeypatch):
    """`resume.workers_agree`: one all-reduce of (e, e^2) over the replicas; equal epochs
    pass, any difference is one UsageError (here two workers of one replica each, as the
    all-reduce would sum them: the 2-process test of test_train covers the collective)."""
    import types

    import tensorflow as tf

    from zf_tf.core.errors import UsageError
    from zf_tf.training import keras_fixes

    def cluster(*epochs):
        def reduce(op, value, axis=None):
            return tf.add_n([tf.constant([e, e * e], tf.float64) for e in epochs])

        return types.SimpleNamespace(
            num_replicas_in_sync=len(epochs), run=lambda fn: fn(), reduce=reduce
        )

    monkeypatch.setattr(keras_fixes, "is_multi_worker", lambda strategy: True)
    resume.workers_agree(cluster(3, 3), 3, "/w")
    for epochs in ((3, 0), (0, 2), (5, 4)):
        with pytest.raises(UsageError, match="would resume from different epochs .* the chief's"):
            resume.workers_agree(cluster(*epochs), epochs[0], "/w")
