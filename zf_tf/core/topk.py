"""Streaming top-k of every feature map of one or several layers over a dataset (paper
Fig. 2), on one device or split over the replicas of a tf.distribute strategy.

One pass keeps, for each of the F feature maps of each layer, the k strongest activations
seen so far (value, image index, y, x) in (k, F) arrays: memory does not grow with the
dataset. Each image contributes at most one entry per feature map (its maximum), so the k
winners of a map are k different images, as in the paper's figures. Ties break by image
index, so a scan's result does not depend on how it was split.
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


def _merge(state, act, index, k):
    """Merges a batch of activations (B, h, w, F) of images `index` (B,) into the running
    (k, F) top-k; the state stays ordered by (activation descending, image ascending)."""
    best, y, x = _first_maximum(act)
    w = tf.shape(act)[2]
    images = tf.broadcast_to(index[:, None], tf.shape(y))
    # Candidates: the state (images below this batch's, in order) then the batch (images
    # ascending); top_k keeps the lower position first among ties, so ties keep the lower
    # image index.
    return _top(
        tf.concat([state[0], best], 0),
        tf.concat([state[1], images], 0),
        tf.concat([state[2] * w + state[3], y * w + x], 0),  # y*w+x keeps one tensor
        w,
        k,
    )


def _first_maximum(act):
    """(maximum, y, x) of each (image, map) of act (B, h, w, F), each (B, F): the first
    maximum in row-major order. In two stages, reading the maps once: the maximum of each
    row, then the first row holding the map's maximum, then its first maximal column read
    from that row alone (a fused max + argmax over h*w read them 3x slower)."""
    shape = tf.shape(act)
    b, h, w, f = (tf.cast(shape[i], tf.int64) for i in range(4))  # int64: no overflow
    rows = tf.reduce_max(act, axis=2)  # (B, h, F)
    best = tf.reduce_max(rows, axis=1)
    y = tf.argmax(rows, axis=1, output_type=tf.int32)  # (B, F): the first row with the max
    start = tf.range(b)[:, None, None] * h + tf.cast(y, tf.int64)[:, :, None]
    at = (start * w + tf.range(w)[None, None, :]) * f + tf.range(f)[None, :, None]
    row = tf.gather(tf.reshape(act, [-1]), at)  # (B, F, w): each map's row of its maximum
    return best, y, tf.argmax(row, axis=2, output_type=tf.int32)


def _top(values, images, pos, w, k):
    """The k largest of (n, F) candidates per column, ties to the lower position."""
    top = tf.math.top_k(tf.transpose(values), k=k)  # (F, k)
    pick = lambda t: tf.transpose(tf.gather(tf.transpose(t), top.indices, batch_dims=1))
    pos = pick(pos)
    return pick(values), pick(images), pos // w, pos % w


def merge(parts: list[TopK], k: int | None = None) -> TopK:
    """The exact top-k of several top-k's of disjoint image sets (replicas, workers):
    ordered by activation descending, then image index ascending."""
    activation = np.concatenate([p.activation for p in parts])
    image = np.concatenate([p.image for p in parts])
    y, x = np.concatenate([p.y for p in parts]), np.concatenate([p.x for p in parts])
    k = k or parts[0].k
    # lexsort: the last key is the primary one; empty slots (-inf, image -1) sort last.
    order = np.lexsort((np.where(image < 0, np.iinfo(np.int64).max, image), -activation), axis=0)
    order = order[:k]
    take = lambda a: np.take_along_axis(a, order, 0)
    return TopK(take(activation), take(image), take(y), take(x))


def scan_layers(
    model: keras.Model,
    layers: list[str],
    dataset,
    k: int = 9,
    progress=None,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, TopK]:
    """One streaming pass: the top-k activations of every feature map of several layers,
    from one forward pass per batch (one multi-output tap).

    Memory is O(layers x maps x k) whatever the dataset's size. Ties break by image index
    (the earlier image first); an image counts once per map (at its first maximum in
    row-major order).

    Args:
      model: the classifier (any Keras convnet, nested models included).
      layers: layers to tap (each output (B, h, w, F); a global pool's (B, F) counts as 1x1
        maps).
      dataset: batches of images, or of (images, labels); image indices count from 0 in
        dataset order; batches of (images, labels, indices) carry their own indices. With a
        strategy, also a function of a `tf.distribute.InputContext` giving such indexed
        batches of one input pipeline (`strategy.distribute_datasets_from_function`): then
        each worker reads only its own share of the split.
      k: how many to keep per feature map.
      progress: optional callable(num_images) called after each batch (with a
        multi-worker strategy: the images this worker scanned).
      strategy: a tf.distribute strategy to split the scan over (mirrored replicas, the
        workers of a multi-worker cluster: each worker must pass the same dataset); every
        replica keeps its own top-k, merged exactly at the end (`merge`): the result equals
        the single-device scan's. The model must have been built in `strategy.scope()`
        for the replicas to hold copies; otherwise they read it from where it lives.

    Returns:
      {layer: TopK with (k, F) arrays}.
    """
    layers = list(layers)
    tap = graph.tap(model, layers)
    outputs = tap.outputs if isinstance(tap.outputs, (list, tuple)) else [tap.outputs]
    shapes = [tuple(o.shape) for o in outputs]

    def init():
        return tuple(
            (
                tf.fill([k, s[-1]], -np.inf),
                tf.fill([k, s[-1]], tf.constant(-1, tf.int64)),
                tf.zeros([k, s[-1]], tf.int32),
                tf.zeros([k, s[-1]], tf.int32),
            )
            for s in shapes
        )

    def step(index, images, state):
        maps = tap(images, training=False)
        maps = maps if isinstance(maps, (list, tuple)) else [maps]
        return tuple(
            _merge(st, m if len(m.shape) == 4 else m[:, None, None, :], index, k)
            for st, m in zip(state, maps)
        )

    if strategy is None:
        step_fn = tf.function(step, reduce_retracing=True)
        state, offset = init(), 0
        for batch in dataset:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            n = int(images.shape[0])
            index = tf.range(offset, offset + n, dtype=tf.int64)
            if isinstance(batch, (tuple, list)) and len(batch) == 3:
                index = batch[2]
            state = step_fn(index, images, state)
            offset += n
            if progress:
                progress(n)
        results = [[_numpy(st) for st in state]]
    else:
        results = _scan_distributed(strategy, step, init, dataset, progress)
    return {
        layer: merge([r[i] for r in results]) if len(results) > 1 else results[0][i]
        for i, layer in enumerate(layers)
    }


def _numpy(state) -> TopK:
    activation, image, y, x = (np.asarray(t) for t in state)
    return TopK(activation.astype(np.float32), image, y, x)


def _scan_distributed(strategy, step, init, dataset, progress) -> list[list[TopK]]:
    """Per-replica scans of `strategy.experimental_distribute_dataset` batches carrying
    their global image indices; returns every replica's states (all workers' replicas,
    gathered, so each worker can merge them)."""
    if callable(dataset):  # each input pipeline reads its own share, with its indices
        dist = strategy.distribute_datasets_from_function(
            lambda context: dataset(context).map(lambda images, labels, index: (index, images))
        )
    else:
        first = next(iter(dataset))
        first = first[0] if isinstance(first, (tuple, list)) else first
        batch_size = int(first.shape[0])
        spec = dataset.element_spec
        images = dataset.map(lambda *b: b[0]) if isinstance(spec, tuple) else dataset
        indexed = images.unbatch().enumerate().batch(batch_size)
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.DATA
        options.experimental_distribute.auto_shard_policy = policy
        dist = strategy.experimental_distribute_dataset(indexed.with_options(options))
    state = strategy.experimental_distribute_values_from_function(lambda _: init())

    @tf.function(reduce_retracing=True)
    def run(index, images, state):
        return strategy.run(step, args=(index, images, state))

    for index, batch in dist:
        state = run(index, batch, state)
        if progress:
            progress(int(sum(int(t.shape[0]) for t in strategy.experimental_local_results(index))))
    num = strategy.num_replicas_in_sync
    flat = tf.nest.flatten(state)
    gathered = [np.asarray(strategy.gather(t, axis=0)) for t in flat]  # (replicas * k, F)
    states = tf.nest.pack_sequence_as(init(), gathered)
    k = int(np.asarray(init()[0][0]).shape[0])
    return [
        [_numpy(tuple(t[r * k : (r + 1) * k] for t in st)) for st in states] for r in range(num)
    ]


def scan(model: keras.Model, layer_name: str, dataset, k: int = 9, progress=None) -> TopK:
    """`scan_layers` of one layer: the top-k activations of every feature map of it."""
    return scan_layers(model, [layer_name], dataset, k, progress)[layer_name]


def gather_images(dataset, indices) -> dict[int, np.ndarray]:
    """Second pass: the images at the given scan-order indices, {index: image}."""
    return gather_examples(dataset, indices)[0]


def gather_examples(dataset, indices) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Second pass: the images at the given scan-order indices and their labels, ({index:
    image}, {index: label}); no labels where the dataset has none. Indices count batches in
    order, or are the batches' own (images, labels, indices). Stops once all are found."""
    wanted = set(int(i) for i in np.ravel(indices) if i >= 0)
    found, labels, offset = {}, {}, 0
    for batch in dataset:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = int(images.shape[0])
        index = list(range(offset, offset + n))
        if isinstance(batch, (tuple, list)) and len(batch) == 3:  # batches with indices
            index = [int(i) for i in np.asarray(batch[2])]
        hits = [(row, i) for row, i in enumerate(index) if i in wanted]
        if hits:
            array = images.numpy()
            found.update({i: array[row] for row, i in hits})
            if isinstance(batch, (tuple, list)) and len(batch) > 1:
                label = np.asarray(batch[1])
                if label.ndim == 1:  # class ids (not multi-hot)
                    labels.update({i: int(label[row]) for row, i in hits})
        offset += n
        if len(found) == len(wanted):
            break
    return found, labels
