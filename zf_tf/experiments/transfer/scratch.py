"""The baseline of the transfer tables: the source architecture trained from scratch on
the same N-per-class target images with the source run's recipe (its training
augmentation, SGD with its learning rate, momentum, weight decay, warmup and label
smoothing), evaluated on the center crops of the test images.
"""

from __future__ import annotations

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from zf_tf.core import model as model_lib
from zf_tf.experiments.transfer.target import Target
from zf_tf.pipelines import preprocess
from zf_tf.training import callbacks, workdirs
from zf_tf.training import train as train_lib


class ScratchTrainer:
    """The source architecture trained from scratch on some target images.

    One model, one training and one test pipeline are built per target; every run
    re-initializes the model (weights, optimizer state, dropout seeds) and swaps the
    images the pipelines read (Python generators), so nothing is traced twice: at small N
    tracing, not the few SGD steps, would dominate. Training takes a random crop of each
    image per step as the source run did (`data.augment`: one of the paper's 10 crops, or
    a scale-augmented crop) in batches of `scratch.batch_size`, for `scratch.epochs`
    passes over the images (small sets repeat within a batch), the learning rate warmed up
    over the source's `warmup_epochs` of these passes. Evaluation: the center crop.
    """

    def __init__(self, source_config, target: Target):
        self._build = model_lib.build_model
        self.target = target
        self.settings = source_config.transfer.scratch
        self.batch = int(self.settings.batch_size)
        self.model_config = ml_collections.ConfigDict(workdirs.config_json(source_config)["model"])
        self.model_config.num_classes = target.num_classes
        self.model = self._fresh(0)
        train = source_config.train
        self.train_settings = train
        loss = (
            keras.losses.BinaryCrossentropy(from_logits=True)
            if target.multi_label
            else train_lib.loss(train.label_smoothing)
        )
        self.model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=train.learning_rate,
                momentum=train.momentum,
                weight_decay=train.weight_decay or None,
            ),
            loss=loss,
        )
        self._logits = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        self._run = None  # (images, labels, test images, seed) of the current run
        data = target.data
        S, s, pixels = data.resize_size, data.crop_size, preprocess.pixels(data)
        source_data = source_config.data
        if source_data.augment == "scale":
            area = float(source_data.min_crop_area)

            def crop(encoded, k):
                square = preprocess.center_square_uint8(encoded, S)
                return preprocess.finish(
                    tf.cast(preprocess.scale_crop_of_square(square, k, s, area), tf.float32),
                    pixels,
                )

        else:  # one of the paper's 10 crops

            def crop(encoded, k):
                return preprocess.train_crop(encoded, k % preprocess.NUM_CROPS, S, s, pixels)

        if target.multi_label:
            label_spec = tf.TensorSpec([target.num_classes], tf.float32)
        else:
            label_spec = tf.TensorSpec([], tf.int64)
        self.train_ds = (
            tf.data.Dataset.from_generator(
                self._train_stream,
                output_signature=(
                    tf.TensorSpec([], tf.string),
                    label_spec,
                    tf.TensorSpec([], tf.int32),
                ),
            )
            .map(lambda e, y, k: (crop(e, k), y), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(self.batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        self.test_ds = (
            tf.data.Dataset.from_generator(
                lambda: iter(self._run[2]), output_signature=tf.TensorSpec([], tf.string)
            )
            .map(
                lambda e: preprocess.center_crop(e, S, s, pixels),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .batch(self.batch)
        )

    def _train_stream(self):
        """Endless (image, label, crop draw) in a seeded order, reshuffled every pass; the
        draw picks the crop (index = draw % 10, or the seed of a scale-augmented crop)."""
        images, labels, _, seed = self._run
        rng = np.random.default_rng(seed)
        while True:
            for i in rng.permutation(len(labels)):
                yield images[i], labels[i], np.int32(rng.integers(2**31 - 1))

    def _fresh(self, seed: int) -> keras.Model:
        self.model_config.seed = int(seed)
        return self._build(self.model_config)

    def _reset(self, seed: int):
        for variable, value in zip(self.model.variables, self._fresh(seed).variables):
            variable.assign(value)
        for variable in self.model.optimizer.variables:
            if variable.name != "learning_rate":
                variable.assign(tf.zeros_like(variable))

    def fit_predict(self, images, labels, test_images, seed: int) -> np.ndarray:
        """Trains afresh on encoded `images` with `labels`; returns logits (M, C) of the
        encoded `test_images`.

        Args:
          seed: initialization, dropout, shuffling and crop choice.
        """
        self._reset(seed)
        labels = labels.astype(np.float32) if self.target.multi_label else labels
        self._run = (images, labels, test_images, seed)
        steps = max(1, round(int(self.settings.epochs) * len(labels) / self.batch))
        warm = self.train_settings.warmup_epochs * len(labels) / self.batch
        warmup = (
            [callbacks.LinearWarmup(self.train_settings.learning_rate, max(1, round(warm)))]
            if warm
            else []
        )
        self.model.optimizer.learning_rate = self.train_settings.learning_rate
        self.model.fit(
            self.train_ds,
            epochs=1,
            steps_per_epoch=steps,
            verbose=0,
            shuffle=False,
            callbacks=warmup,
        )
        return np.concatenate([self._logits(x).numpy() for x in self.test_ds])
