"""The target's images as tf.data: (record index, encoded image, label) records of a split,
their center crops (the evaluation geometry of `zf_tf.pipelines.inputs.build_inputs`), and the
encoded bytes of chosen records for the from-scratch training.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from zf_tf.experiments.transfer.target import Target, tfds_builder
from zf_tf.pipelines import inputs, preprocess


def multi_hot(num_classes: int) -> keras.layers.CategoryEncoding:
    """The layer mapping the classes of one image (a scalar or a list, maybe empty) to an
    int64 (C,) 0/1 vector; usable in `tf.data` maps."""
    return keras.layers.CategoryEncoding(num_classes, output_mode="multi_hot", dtype="int64")


def records(target: Target, split: str) -> tf.data.Dataset:
    """(record index, encoded image, label) of a target split, in split order.

    Labels are int64 class ids, or int64 (C,) multi-hot vectors for multi-label targets.
    For folders, 'a+b' joins splits, as tfds split expressions do.
    """
    data = target.data
    if target.multi_label:
        import tensorflow_datasets as tfds

        ds = tfds_builder(data).as_dataset(
            split=split, decoders={data.image_key: tfds.decode.SkipDecoding()}
        )

        encode = multi_hot(target.num_classes)

        def pick(ex):
            y = ex
            for key in data.label_key.split("/"):
                y = y[key]
            return ex[data.image_key], encode(y)

        ds = ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE)
    elif data.source == "folder" and "+" in split:
        parts = [inputs.encoded_records(data, part) for part in split.split("+")]
        ds = functools.reduce(lambda a, b: a.concatenate(b), parts)
    else:
        ds = inputs.encoded_records(data, split)
    return ds.enumerate().map(lambda i, r: (i, r[0], r[1]))


def _square(data):
    return lambda i, e, y: (i, preprocess.center_square_uint8(e, data.resize_size), y)


def _center(data):
    S, s, pixels = data.resize_size, data.crop_size, preprocess.pixels(data)
    return lambda i, sq, y: (
        i,
        preprocess.crop_of_square(sq, preprocess.CENTER_CROP, S, s, pixels),
        y,
    )


def center_crops(target: Target, split: str, batch_size: int, indices=None) -> tf.data.Dataset:
    """Batches of (record indices, center crops, labels) of a split, streamed.

    Args:
      indices: keep only these record indices (None: all). Images that fail to decode
        are dropped with a warning, so the returned record indices say which remain.
    """
    ds = records(target, split)
    if indices is not None:
        ds = ds.filter(index_filter(indices))
    ds = ds.map(_square(target.data), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.map(_center(target.data), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def index_filter(indices):
    """A `records` filter keeping the given record indices (a lookup table, not a set)."""
    indices = np.asarray(indices, np.int64)
    mask = np.zeros(int(indices.max()) + 2 if len(indices) else 1, bool)
    mask[indices] = True
    mask = tf.constant(mask)
    last = mask.shape[0] - 1  # always False: where every larger index is sent
    return lambda i, e, y: tf.gather(mask, tf.minimum(i, last))


def encoded_images(target: Target, split: str, indices) -> tuple[np.ndarray, np.ndarray]:
    """The encoded bytes and labels of the given record indices of a split, in record
    order: one pass over the split; the images are decoded only when used."""
    ds = records(target, split).filter(index_filter(indices))
    images, labels = [], []
    for _, e, y in ds.as_numpy_iterator():
        images.append(e)
        labels.append(y)
    return np.array(images, dtype=object), np.stack(labels)
