"""Resuming training where it stopped, whenever it was killed.

After every epoch with a finite loss, two callbacks write the training state (weights and
optimizer state, the learning rate included), each file atomically:
  checkpoints/model.keras        the full model (`LastGoodCheckpoint`), and beside it
  checkpoints/model.epochs.json  its epoch count with the model file's size and mtime, so a
                                 kill between the two writes is seen (they disagree)
  backup/epoch_NNNN.weights.h5   the state after epoch NNNN (`Backup`, the last callback);
                                 the two newest are kept
A rerun of the same command (`Resume`, the first callback) continues from the newest of
these that loads, and cuts history.csv back to the epochs before it, so that every epoch
has exactly one row whenever the kill came: during an epoch, between its history row and
its checkpoint, between the checkpoint and the backup, or during either write. A damaged
file is passed over with one line saying so. Workdirs written before this layout (Keras'
BackupAndRestore: backup/latest.weights.h5 and training_metadata.json, with .bkp copies)
resume from those files too.

The callbacks' order in `train._train` is what makes this hold: the epoch's logs (history
row, TensorBoard, snapshots) first, then the checkpoint, then the backup.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import keras
from absl import logging

from zf_tf import outputs
from zf_tf.core.errors import UsageError
from zf_tf.training import keras_fixes, strategies
from zf_tf.training.workdirs import checkpoint_path

BACKUP_DIR = "backup"
BACKUP_PATTERN = "epoch_{:04d}.weights.h5"
KEEP = 2  # backups kept: the newest and the one before it
HISTORY = "history.csv"
_BACKUP_RE = re.compile(r"epoch_(\d{4,})\.weights\.h5")


def finite(logs) -> bool:
    """Whether an epoch's logs hold a finite loss (a diverged epoch is never saved)."""
    return logs is not None and math.isfinite(float(logs.get("loss", 0.0)))


def epochs_path(checkpoint: str) -> str:
    return checkpoint[: -len(".keras")] + ".epochs.json"


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_model(model: keras.Model, path: str, epochs_done: int | None = None):
    """Saves a Keras model so that `path` is always either the old or the new file; with
    `epochs_done`, also the epochs it has trained and the file's size and mtime, beside
    it (`epochs_path`): a resume point only while they match the file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with outputs.atomic(path, ".tmp.keras") as tmp:
        model.save(tmp)
    if epochs_done is not None:
        record = {"epochs_done": int(epochs_done), **_stat(path)}
        outputs.save_text(epochs_path(path), json.dumps(record))


def checkpoint_epochs(path: str) -> int | None:
    """The epochs the checkpoint at `path` has trained, or None when unknown: no file, no
    epoch record, or a record written for another file (a kill between the two writes).
    A record without size and mtime (written before they were kept) is taken as is."""
    record_path = epochs_path(path)
    if not (os.path.exists(path) and os.path.exists(record_path)):
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
        done = int(record["epochs_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "size" in record and {k: record.get(k) for k in ("size", "mtime_ns")} != _stat(path):
        return None
    return done


def _legacy_backups(backup_dir: str) -> list[tuple[int, str]]:
    """(epoch, weights file) of Keras' BackupAndRestore layout (older workdirs)."""
    out = []
    for suffix in ("", ".bkp"):
        weights = os.path.join(backup_dir, "latest.weights.h5" + suffix)
        meta = os.path.join(backup_dir, "training_metadata.json" + suffix)
        try:
            with open(meta) as f:
                epoch = int(json.load(f)["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.exists(weights):
            out.append((epoch, weights))
    return out


def backups(workdir: str) -> list[tuple[int, str]]:
    """(epoch, weights file) of every backup in `workdir`, newest first."""
    folder = os.path.join(workdir, BACKUP_DIR)
    found = [
        (int(m.group(1)), p)
        for p in glob.glob(os.path.join(folder, "epoch_*.weights.h5"))
        if (m := _BACKUP_RE.fullmatch(os.path.basename(p)))
    ]
    return sorted(found + _legacy_backups(folder), reverse=True)


def resume_points(workdir: str) -> list[tuple[int, str]]:
    """Where a rerun may continue: (epochs done, file), newest first; at equal epochs the
    backup comes before the checkpoint."""
    points = backups(workdir)
    checkpoint = checkpoint_path(workdir)
    done = checkpoint_epochs(checkpoint)
    if done is not None:
        points.append((done, checkpoint))
    return sorted(points, key=lambda p: (-p[0], p[1] == checkpoint))


def truncate_history(workdir: str, epochs: int):
    """Keeps history.csv's header and its rows of the first `epochs` epochs (0-based epoch
    in the first column), atomically: a resumed run then appends each later epoch once."""
    path = os.path.join(workdir, HISTORY)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = lines[:1] + [
        row for row in lines[1:] if row.split(",")[0].isdigit() and int(row.split(",")[0]) < epochs
    ]
    if kept != lines:
        outputs.save_text(path, "".join(line + "\n" for line in kept))


class Resume(keras.callbacks.Callback):
    """The first callback: at the start of training, restores the newest resume point that
    loads (`resume_points`) and sets the epoch to continue from; trims history.csv.

    Raises (at the start of training):
      UsageError: resume points exist but none loads.
    """

    def __init__(self, workdir: str, source: str | None = None):
        """`workdir`: where this process writes (its history.csv is trimmed); `source`:
        where the resume points are read, the chief's workdir for every worker (default:
        `workdir`)."""
        super().__init__()
        self.workdir = workdir
        self.source = source or workdir
        self.epochs_done = 0

    def on_train_begin(self, logs=None):
        for stale in glob.glob(os.path.join(self.workdir, BACKUP_DIR, "*.tmp*")):
            os.remove(stale)  # a backup cut short by a kill
        points = resume_points(self.source)
        damaged = []
        optimizer = self.model.optimizer
        if points and optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        for epochs, path in points:
            try:
                self.model.load_weights(path)
            except Exception as e:  # noqa: BLE001 - a damaged HDF5 or zip fails anywhere
                damaged.append(f"{path} ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            if damaged:
                print(f"Damaged: {'; '.join(damaged)}: resuming from {path} after epoch {epochs}")
            self.epochs_done = epochs
            self.model._initial_epoch = epochs
            break
        else:
            if damaged:
                raise UsageError(
                    f"the training state in {self.workdir} is damaged ({'; '.join(damaged)}) "
                    "and there is nothing good to resume from: start afresh with --overwrite"
                )
        truncate_history(self.workdir, self.epochs_done)
        workers_agree(self.model.distribute_strategy, self.epochs_done, self.source)
        if self.epochs_done:
            logging.info("Resuming after epoch %d", self.epochs_done)


def workers_agree(strategy, epochs_done: int, source: str):
    """Raises UsageError on every worker of a multi-worker run unless all resume after the
    same epoch (else the one with fewer epochs left would wait for the others for ever):
    each must read the chief's workdir. One all-reduce of (e, e^2): equal iff n sum(e^2)
    = (sum e)^2."""
    if not keras_fixes.is_multi_worker(strategy):
        return
    total = strategies.sum_over_replicas(strategy, [epochs_done, epochs_done**2])
    if strategy.num_replicas_in_sync * total[1] != total[0] ** 2:
        raise UsageError(
            f"the workers would resume from different epochs (this one after {epochs_done}, "
            f"from {source}): every worker must read the chief's --workdir (on a file "
            "system all of them share), or start afresh with --overwrite"
        )


class LastGoodCheckpoint(keras.callbacks.Callback):
    """Saves the full model to `path` after every epoch whose loss is finite, atomically,
    with its epoch record beside it (`save_model`)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        if not finite(logs):
            logging.warning("Epoch %d diverged (loss %s): checkpoint not updated", epoch + 1, logs)
            return
        save_model(self.model, self.path, epochs_done=epoch + 1)


class Backup(keras.callbacks.Callback):
    """The last callback: after every epoch whose loss is finite, the training state as
    backup/epoch_NNNN.weights.h5 (atomically), keeping the KEEP newest."""

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir

    def on_epoch_end(self, epoch, logs=None):
        if not finite(logs):
            return
        folder = os.path.join(self.workdir, BACKUP_DIR)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, BACKUP_PATTERN.format(epoch + 1))
        with outputs.atomic(path, ".tmp.weights.h5") as tmp:
            self.model.save_weights(tmp)
        for _, old in backups(self.workdir)[KEEP:]:
            os.remove(old)
