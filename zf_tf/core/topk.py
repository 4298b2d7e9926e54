"""Streaming top-k of every feature map of a layer over a dataset (paper Fig. 2).

One pass keeps, for each of the F feature maps, the k strongest activations seen so far
(value, image index, y, x) in (k, F) arrays: memory does not grow with the dataset. Each
image contributes at most one entry per feature map (its maximum), so the k winners of a
map are k different images, as in the paper's figures.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core import graph


@dataclasses.dataclass
class TopK:
    """The k strongest activations of each feature map, strongest first (rank 0)."""

    activation: np.ndarray  # float32 (k, F)
    image: np.ndarray  # int64 (k, F): index of the image in scan order (-1: none)
    y: np.ndarray  # int32 (k, F)
    x: np.ndarray  # int32 (k, F)

    @property
    def k(self) -> int:
        return self.activation.shape[0]

    def records(self, features=None) -> list[dict]:
        """Rows (feature, rank, image, y, x, activation) for the given (or all) features."""
        features = range(self.activation.shape[1]) if features is None else features
        return [
            {
                "feature": int(f),
                "rank": r,
                "image": int(self.image[r, f]),
                "y": int(self.y[r, f]),
                "x": int(self.x[r, f]),
                "activation": float(self.activation[r, f]),
            }
            for f in features
            for r in range(self.k)
            if self.image[r, f] >= 0
        ]


def _merge(state, act, offset, k):
    """Merges a batch of activations (B, h, w, F) into the running (k, F) top-k."""
    b, w = tf.shape(act)[0], tf.shape(act)[2]
    flat = tf.reshape(act, [b, -1, tf.shape(act)[3]])  # (B, h*w, F)
    best = tf.reduce_max(flat, axis=1)  # (B, F)
    where = tf.cast(tf.argmax(flat, axis=1), tf.int32)  # (B, F)
    images = tf.broadcast_to(tf.range(b, dtype=tf.int64)[:, None] + offset, tf.shape(where))
    values = tf.concat([state[0], best], 0)  # (k + B, F)
    index = tf.concat([state[1], images], 0)
    pos = tf.concat([state[2] * w + state[3], where], 0)  # y*w+x keeps one tensor
    top = tf.math.top_k(tf.transpose(values), k=k)  # (F, k), ties: lower index first
    pick = lambda t: tf.transpose(tf.gather(tf.transpose(t), top.indices, batch_dims=1))
    pos = pick(pos)
    return pick(values), pick(index), pos // w, pos % w


def scan(model: keras.Model, layer_name: str, dataset, k: int = 9, progress=None) -> TopK:
    """One streaming pass: the top-k activations of every feature map of a layer.

    Args:
      model: the classifier (any Keras convnet, nested models included).
      layer_name: layer to tap (its output is (B, h, w, F); a global pool's (B, F) counts
        as 1x1 maps).
      dataset: batches of images, or of (images, labels); scanned in order, image
        indices count from 0 in that order.
      k: how many to keep per feature map.
      progress: optional callable(num_images) called after each batch.

    Returns:
      A TopK with (k, F) arrays.
    """
    tap = graph.tap(model, [layer_name])
    features = int(tap.outputs[0].shape[-1])
    maps = (-1, 1, 1, features) if len(tap.outputs[0].shape) == 2 else None  # global pools
    state = (
        tf.fill([k, features], -np.inf),
        tf.fill([k, features], tf.constant(-1, tf.int64)),
        tf.zeros([k, features], tf.int32),
        tf.zeros([k, features], tf.int32),
    )

    @tf.function(reduce_retracing=True)
    def step(images, offset, state):
        fmap = tap(images, training=False)
        return _merge(state, fmap if maps is None else tf.reshape(fmap, maps), offset, k)

    offset = 0
    for batch in dataset:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        state = step(images, tf.constant(offset, tf.int64), state)
        offset += int(images.shape[0])
        if progress:
            progress(int(images.shape[0]))
    activation, image, y, x = (t.numpy() for t in state)
    return TopK(activation.astype(np.float32), image, y, x)


def gather_images(dataset, indices) -> dict[int, np.ndarray]:
    """Second pass: the images at the given scan-order indices, {index: image}."""
    wanted = set(int(i) for i in np.ravel(indices) if i >= 0)
    found, offset = {}, 0
    for batch in dataset:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = int(images.shape[0])
        hits = [i for i in range(offset, offset + n) if i in wanted]
        if hits:
            array = images.numpy()
            found.update({i: array[i - offset] for i in hits})
        offset += n
        if len(found) == len(wanted):
            break
    return found
