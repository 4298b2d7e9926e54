"""Training with the paper's recipe (Sec. 3) under a tf.distribute strategy."""

from __future__ import annotations

import os

import keras
from absl import logging

from pipelines import inputs
from zf_tf import model as model_lib


def compile_model(model: keras.Model, config) -> keras.Model:
    """SGD with momentum on cross-entropy from logits; top-1 and top-5 accuracy."""
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=config.train.learning_rate, momentum=config.train.momentum
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5"),
        ],
    )
    return model


def distributed_inputs(strategy, config, split: str, mode: str):
    """The per-replica pipeline, distributed by the strategy."""
    return strategy.distribute_datasets_from_function(
        lambda ctx: inputs.build_inputs(config, split, ctx, mode)
    )


def train_and_evaluate(config, workdir: str, strategy) -> keras.callbacks.History:
    """Trains ZFNet on config.data's training split, validating on its eval split.

    Args:
      config: experiment ConfigDict.
      workdir: output folder (checkpoints, TensorBoard logs).
      strategy: a tf.distribute strategy; the global batch is split across its replicas.

    Returns:
      The Keras History.
    """
    steps = config.train.steps_per_epoch or (
        inputs.num_examples(config.data, config.data.train_split) // config.train.batch_size
    )
    with strategy.scope():
        model = compile_model(model_lib.build_model(config.model), config)
    train_ds = distributed_inputs(strategy, config, config.data.train_split, "train")
    val_ds = distributed_inputs(strategy, config, config.data.eval_split, "center")
    logging.info("Training %d epochs of %d steps in %s", config.train.epochs, steps, workdir)
    history = model.fit(
        train_ds,
        epochs=config.train.epochs,
        steps_per_epoch=steps,
        validation_data=val_ds,
        callbacks=[keras.callbacks.TensorBoard(os.path.join(workdir, "logs"))],
        verbose=1,
    )
    model.save(os.path.join(workdir, "model.keras"))
    return history
