"""Training with the paper's recipe (Sec. 3) under any tf.distribute strategy.

`train_and_evaluate` runs `model.fit` inside `strategy.scope()` on the per-replica
pipeline, resumes after a kill from the newest saved epoch (resume.py), keeps the last
good checkpoint in `workdir/checkpoints`, logs TensorBoard scalars and images to
`workdir/logs`, and ends with the 10-crop evaluation (`workdir/eval.json`) and a
SavedModel export (`workdir/export`). With several workers only the chief writes the
workdir; the others write to a temporary directory that they delete at the end, and
resume from the chief's workdir, which must therefore be on a file system all of them
read (as for Keras' BackupAndRestore); workers that would resume from different epochs
are refused in one line (`resume.workers_agree`) instead of waiting for each other.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile

import keras
import numpy as np
from absl import logging

from zf_tf.configs import check_section
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs, preprocess
from zf_tf.training import callbacks, evaluate, export, keras_fixes, resume, workdirs

# config.train fields with a range: (field, what it must be, test), checked by check_config.
RANGES = (
    ("batch_size", ">= 1", lambda v: v >= 1),
    ("eval_batch_size", ">= 1", lambda v: v >= 1),
    ("epochs", ">= 1", lambda v: v >= 1),
    ("steps_per_epoch", ">= 0 (0 = one pass)", lambda v: v >= 0),
    ("learning_rate", "> 0", lambda v: v > 0),
    ("momentum", "in [0, 1)", lambda v: 0 <= v < 1),
    ("lr_decay", "in (0, 1]", lambda v: 0 < v <= 1),
    ("lr_patience", ">= 0", lambda v: v >= 0),
    ("min_lr", ">= 0", lambda v: v >= 0),
    ("cpu_replicas", ">= 1", lambda v: v >= 1),
    ("cluster_timeout", "> 0", lambda v: v > 0),
    ("weight_decay", ">= 0", lambda v: v >= 0),
    ("label_smoothing", "in [0, 1)", lambda v: 0 <= v < 1),
    ("warmup_epochs", ">= 0", lambda v: v >= 0),
)


def check_config(train_config) -> None:
    """Checks `config.train` before anything runs: the precision, `lr_drop_epochs` (increasing
    epochs before the last), the fields of RANGES and the callbacks named.

    Raises:
      UsageError: one line naming the first bad field and its valid values.
    """
    t = train_config
    check_section(t, "train", UsageError, choices=(("precision", model_lib.PRECISIONS),))
    drops = tuple(t.lr_drop_epochs)
    if drops and (
        any(not isinstance(d, int) for d in drops)
        or list(drops) != sorted(set(drops))
        or not 1 <= drops[0] <= drops[-1] < t.epochs
    ):
        raise UsageError(
            f"config.train.lr_drop_epochs={drops} must be increasing epochs in "
            f"1..{t.epochs - 1} (config.train.epochs={t.epochs})"
        )
    check_section(t, "train", UsageError, ranges=RANGES)
    callbacks.check_names(t.callbacks)


def compile_model(model: keras.Model, config) -> keras.Model:
    """SGD with momentum on cross-entropy from logits; top-1 and top-5 accuracy.

    Keras scales the per-replica mean loss by the number of replicas, so the gradient
    equals that of the global batch's mean loss whatever the replica count.

    A model with mixed_float16 layers (`build_model(..., precision='mixed_float16')`) gets
    dynamic loss scaling: float16 gradients of an unscaled loss underflow. Keras wraps the
    optimizer itself only when the *model's* dtype policy is mixed_float16; a functional
    model whose layers carry the policy is float32 itself, so it is wrapped here.
    `config.train.jit_compile` turns XLA on (Keras' "auto" would turn it on on a single GPU
    and off on CPU and under tf.distribute: here it is always the config's choice).
    """
    optimizer = keras.optimizers.SGD(
        learning_rate=config.train.learning_rate,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay or None,
    )
    if model_lib.precision_of(model) == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=loss(config.train.label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5"),
        ],
        jit_compile=bool(config.train.jit_compile),
    )
    return model


def loss(label_smoothing: float = 0.0) -> keras.losses.Loss:
    """Cross-entropy from logits of integer labels; with `label_smoothing` > 0 the target
    puts 1 - label_smoothing + label_smoothing / C on the true class (Szegedy et al. 2016)."""
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def smoothed(y_true, logits):
        y = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), keras.ops.shape(logits)[-1]
        )
        return keras.losses.categorical_crossentropy(
            y, logits, from_logits=True, label_smoothing=label_smoothing
        )

    return smoothed


def precision(config) -> str:
    """The run's dtype policy, `config.train.precision` ('float32' in configs without it)."""
    return config.train.precision


def distributed_inputs(strategy, config, split: str, mode: str, normalize: bool = True):
    """The per-replica pipeline (`build_inputs`), distributed by the strategy; with
    `normalize=False` its batches are 0..255 pixels (for `normalized_in_train_step`)."""
    return strategy.distribute_datasets_from_function(
        lambda ctx: inputs.build_inputs(config, split, ctx, mode, normalize=normalize)
    )


@contextlib.contextmanager
def normalized_in_train_step(model: keras.Model, pixels: preprocess.Pixels):
    """For the block, `model.fit` trains on batches of 0..255 pixels (uint8 or float),
    normalizing them by `pixels` inside the train step, on the replica's device.

    The host's input pipeline then stops at uint8 batches: no cast or normalization on
    its cores, a quarter of float32's bytes to the device. The model itself is unchanged
    (its input is still the normalized float32 image, as saved and exported), and so is
    evaluation (`validation_data` still comes normalized: `test_step` is not wrapped).
    Keras' documented way to change what `fit` does per batch is to override `train_step`;
    here the compiled model's own `train_step` is wrapped on the instance and restored
    afterwards, and the train function Keras traced from it is dropped both times.
    """
    own_step = model.train_step

    def train_step(data):
        x, *rest = data
        return own_step((pixels.normalize(x), *rest))

    object.__setattr__(model, "train_function", None)
    object.__setattr__(model, "train_step", train_step)
    try:
        yield model
    finally:
        object.__delattr__(model, "train_step")
        object.__setattr__(model, "train_function", None)


def steps_per_epoch(config) -> int:
    """Training steps per epoch: config value, or one pass over the split."""
    if config.train.steps_per_epoch:
        return int(config.train.steps_per_epoch)
    n = inputs.num_examples(config.data, config.data.train_split)
    if n < config.train.batch_size:
        raise UsageError(
            f"the training split has {n} images, fewer than one batch "
            f"(config.train.batch_size={config.train.batch_size})"
        )
    return n // config.train.batch_size


def learning_rate_schedule(config) -> keras.callbacks.Callback:
    """The rate divided on validation-loss plateaus (the paper's annealing), or at fixed
    epochs (`config.train.lr_drop_epochs`)."""
    t = config.train
    if t.lr_drop_epochs:
        return callbacks.StepDrops(t.learning_rate, t.lr_decay, t.lr_drop_epochs)
    return keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=t.lr_decay, patience=t.lr_patience, min_lr=t.min_lr
    )


def warmup(config, steps: int) -> list[keras.callbacks.Callback]:
    """The linear learning-rate warmup over `config.train.warmup_epochs` epochs of `steps`
    steps (none when 0)."""
    epochs = config.train.warmup_epochs
    if not epochs:
        return []
    return [callbacks.LinearWarmup(config.train.learning_rate, max(1, round(epochs * steps)))]


def weights_checksum(model: keras.Model) -> float:
    """A scalar fingerprint of all weights (workers compare it to check they agree)."""
    return float(sum(np.abs(w).astype(np.float64).sum() for w in model.get_weights()))


def train_and_evaluate(config, workdir: str, strategy, overwrite: bool = False):
    """Trains ZFNet on config.data's training split, validating on its eval split.

    Args:
      config: experiment ConfigDict.
      workdir: output folder; reused to resume the same config, refused for another one
        unless `overwrite`.
      strategy: a tf.distribute strategy; the global batch is split across its replicas.
      overwrite: start afresh in a workdir that holds another config's run.

    Returns:
      The Keras History of this invocation.
    """
    chief = workdirs.is_chief(strategy)
    if chief:
        workdirs.prepare_for_training(config, workdir, overwrite)
    out = workdir if chief else tempfile.mkdtemp(prefix="zf_tf_worker_")
    # Every worker resumes from the chief's workdir, the others only when it holds this
    # config's run (else the chief clears it, perhaps after they have read it).
    same_run = os.path.exists(os.path.join(workdir, workdirs.CONFIG_FILE)) and not (
        workdirs.run_differences(workdir, config)
    )
    source = workdir if chief or same_run else out
    try:
        return _train(config, workdir, out, strategy, chief, source)
    finally:
        if not chief:
            shutil.rmtree(out, ignore_errors=True)


def _train(config, workdir, out, strategy, chief, source):
    steps = steps_per_epoch(config)
    with strategy.scope():
        model = compile_model(model_lib.build_model(config.model, precision(config)), config)
    # Training batches stay uint8 on the host and are normalized on the device.
    train_ds = distributed_inputs(strategy, config, config.data.train_split, "train", False)
    # Validation reads the global-batch pipeline on the host (`callbacks.Validation`: not
    # fit's validation_data, whose iterators stall under MirroredStrategy on the CPU).
    val_ds = inputs.build_inputs(config, config.data.eval_split, None, "center")
    t = config.train
    run_callbacks = [
        # First: restores the newest state that loads and trims history.csv to it, before
        # the callbacks below start (CSVLogger appends; LinearWarmup reads the step).
        # Every worker reads the same resume points (`source`: the chief's workdir).
        resume.Resume(out, source),
        # Then what adds to the epoch's logs (val_*, epoch_seconds) and what reads them.
        callbacks.Validation(val_ds),
        callbacks.EpochSeconds(),
        keras.callbacks.TerminateOnNaN(),
        learning_rate_schedule(config),
        *warmup(config, steps),
        keras.callbacks.CSVLogger(os.path.join(out, resume.HISTORY), append=True),
        keras.callbacks.TensorBoard(os.path.join(out, "logs"), write_graph=False),
        *callbacks.from_config(config, out),  # image summaries, Fig. 4 snapshots, ...
        # Last, the resume points: an epoch counts as done only once its logs are written,
        # so a kill at any moment resumes with one history row per epoch (resume.py).
        resume.LastGoodCheckpoint(workdirs.checkpoint_path(out)),
        resume.Backup(out),
    ]
    if chief:
        print(
            f"Training {t.epochs} epochs x {steps} steps, global batch {t.batch_size} on "
            f"{strategy.num_replicas_in_sync} replica(s), in {out}"
        )
    example = keras_fixes.image_batch(config.data.crop_size)
    with (
        keras_fixes.fit_workarounds(model, strategy, example),
        normalized_in_train_step(model, preprocess.pixels(config.data)),
    ):
        history = model.fit(
            train_ds,
            epochs=t.epochs,
            steps_per_epoch=steps,
            callbacks=run_callbacks,
            verbose=1 if chief else 0,
        )
    logging.info("Final weights checksum: %.10e", weights_checksum(model))
    losses = history.history.get("loss", [])
    checkpoint = workdirs.checkpoint_path(out)
    if losses and not math.isfinite(losses[-1]):
        kept = (
            f"the last good checkpoint is kept in {checkpoint}"
            if os.path.exists(checkpoint)
            else "no epoch finished with a finite loss, so there is no checkpoint"
        )
        raise UsageError(f"training diverged (NaN loss); {kept}: lower config.train.learning_rate")
    if not losses and (not os.path.exists(checkpoint) or workdirs.damage(checkpoint)):
        # A finished run restored from its backup trains no more epochs (so nothing rewrote
        # the checkpoint): rewrite a missing or damaged one from the restored model.
        resume.save_model(model, checkpoint, epochs_done=t.epochs)
    # Every worker exports (saving distributed variables may need all of them); only the
    # chief's `out` is the workdir.
    evaluate.evaluate(config, out, model)
    export.export(model, config, out)
    if chief:
        logs = os.path.join(workdir, "logs")
        print(
            f"Wrote {workdir}: checkpoints/model.keras, history.csv, eval.json, eval.md, "
            f"export/ (SavedModel), logs/ (tensorboard --logdir {logs})"
        )
    return history
