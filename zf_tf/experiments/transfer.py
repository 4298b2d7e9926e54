"""`--mode=transfer`: how well a trained ZFNet's features generalize to other datasets
(paper Sec. 5.2, Tables 4-6, Fig. 9).

The workdir's trained model is the source. Its layers 1-7 stay fixed: every image of the
target dataset goes through them once (center crop, inference mode) and the activations of
`config.transfer.feature_layer` (fc7 by default; any named layer, e.g. pool5 or fc6) are
cached in `WORKDIR/transfer/cache/<key>.npz`. A new softmax (a per-class sigmoid for
multi-label targets such as PASCAL VOC) is then trained on those features with N training
images per class, for each N in `config.transfer.per_class`, over `config.transfer.draws`
seeded draws; for comparison the same architecture is trained from scratch on the same
images. Results: mean and standard deviation per N of the mean per-class accuracy (mean
AP for multi-label targets) as JSON, a Table 4/5-style markdown table (Table 6-style AP
per class for multi-label targets) and a Fig. 9-style plot, in
`WORKDIR/transfer/<config.transfer.name>/<feature_layer>.{json,md,png}`.

Choices (the paper gives no more detail):
- sampling: per draw, each class's images are shuffled once (seed, draw) and the first N
  are the training images, so smaller N are subsets of larger ones. A class with fewer
  than N images (N + 1 when the test images are held out of the same split) is an error
  naming the largest usable N, not a silent skip. Multi-label: the union over classes of
  N images containing that class (every class gets at least N positives).
- test images: the target's `test_split`, or, if that is '', the images of `train_split`
  outside the draw's training images for every N (never overlapping them), at most
  `test_per_class` per class (0 = all; a seeded choice per draw).
- features: the unflipped center crop (the evaluation geometry of `build_inputs`).
- softmax: full-batch Adam from zero weights for a fixed number of steps, with L2 weight
  decay; features are divided by their root mean square on the training images first.
  Zero initialization and full batches make it deterministic.
- from scratch: `build_model` with the source run's model section and the target's class
  count, seeded per (draw, N), SGD with the source run's learning rate and momentum for
  `scratch.epochs` epochs over the N-per-class images with the 10-crop training
  augmentation (a random one of the 10 crops per step, as in training), evaluated on the
  center crops of the same test images.
- metric: mean per-class accuracy (the Caltech protocol); multi-label: mean over classes
  of the average precision (VOC 2010+ definition: area under the monotone precision
  envelope, `average_precision`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from pipelines import inputs, preprocess
from zf_tf import outputs
from zf_tf.core.errors import UsageError
from zf_tf.training import workdirs

MODE = "transfer"
CONFIGS = (
    "configs/transfer_shapes.py",
    "configs/transfer_caltech101.py",
    "configs/transfer_caltech256.py",
    "configs/transfer_voc2012.py",
)
# Bump when what a cache file holds changes, so old files are never misread.
CACHE_VERSION = 1
# Target data fields that decide which images (and labels) a cache file holds.
_DATA_IDENTITY = (
    "source",
    "name",
    "tfds_config",
    "folder",
    "image_key",
    "label_key",
    "classes",
    "multi_label",
    "resize_size",
    "crop_size",
    "mean",
)
_TARGET_FIELDS = (
    "source",
    "name",
    "tfds_config",
    "data_dir",
    "manual_dir",
    "folder",
    "train_split",
    "test_split",
    "image_key",
    "label_key",
    "classes",
    "multi_label",
)


# ----------------------------------------------------------------------------------------
# The target dataset
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A resolved transfer target: a data section usable by `pipelines.inputs`, plus facts."""

    data: ml_collections.ConfigDict  # the source's geometry and mean, the target's dataset
    class_names: list[str]
    multi_label: bool
    held_out: bool  # test images come from train_split (those no draw trains on)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_section(config):
    """Raises UsageError unless `config.transfer` names a target."""
    choices = ", ".join(CONFIGS)
    if "transfer" not in config:
        raise UsageError(f"--mode=transfer needs a config with a transfer section: {choices}")
    if not config.transfer.get("name"):
        raise UsageError(
            "--mode=transfer needs a transfer target (config.transfer.name is empty): "
            f"pass --config= one of {choices}"
        )


def label_feature(features, label_key: str):
    """The ClassLabel feature of `label_key` in a tfds FeaturesDict ('a/b' walks nested
    features, e.g. VOC's 'objects/label'; a Sequence yields the ClassLabel it holds)."""
    feature = features
    for key in label_key.split("/"):
        feature = feature[key]
    while not hasattr(feature, "names") and hasattr(feature, "feature"):
        feature = feature.feature
    if not hasattr(feature, "names"):
        raise UsageError(f"config.transfer.data.label_key={label_key!r} is not a class label")
    return feature


def _all_class_names(data) -> list[str]:
    if data.source == "folder":
        root = data.folder
        first = data.train_split.split("+")[0]
        if os.path.isdir(os.path.join(root, first)):
            root = os.path.join(root, first)
        if not os.path.isdir(root):
            raise UsageError(f"config.transfer.data.folder: image folder not found: {root}")
        return sorted(
            d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d[0] != "."
        )
    return list(label_feature(inputs._tfds_builder(data).info.features, data.label_key).names)


def check_config(config):
    """Checks `config.transfer` without reading any data (configs are validated by this).

    Raises:
      UsageError: no transfer target, or an invalid setting, naming the valid choices.
    """
    _check_section(config)
    t = config.transfer
    data = t.data
    if data.source not in inputs.SOURCES:
        raise UsageError(
            f"config.transfer.data.source={data.source!r} is not valid: choose one of "
            f"{', '.join(inputs.SOURCES)}"
        )
    if data.source == "folder" and not data.folder:
        raise UsageError(
            "config.transfer.data.source='folder' needs "
            "--config.transfer.data.folder=/path/to/class/subfolders"
        )
    if data.multi_label and data.source == "folder":
        raise UsageError(
            "config.transfer.data.multi_label needs a tfds source (folders have one label)"
        )
    if data.multi_label and data.classes:
        raise UsageError("config.transfer.data.classes is not supported with multi_label")
    per_class = [int(n) for n in t.per_class]
    if not per_class or any(n < 0 for n in per_class) or len(set(per_class)) != len(per_class):
        raise UsageError(
            f"config.transfer.per_class={tuple(t.per_class)}: distinct images-per-class "
            "counts >= 1 (0 = all training images), e.g. (1, 5, 10, 15, 30, 60)"
        )
    if 0 in per_class and not data.test_split:
        raise UsageError(
            "config.transfer.per_class 0 (all training images) needs a separate "
            "config.transfer.data.test_split (nothing would be left to test on)"
        )
    if t.draws < 1:
        raise UsageError(f"config.transfer.draws={t.draws}: must be >= 1")
    if t.scratch.epochs < 0 or t.softmax.steps < 1:
        raise UsageError("config.transfer.scratch.epochs must be >= 0, softmax.steps >= 1")


def resolve_target(config) -> Target:
    """The target dataset of `config.transfer.data` with the source run's image geometry.

    Args:
      config: the source workdir's config with the command line's `transfer` section.

    Returns:
      A Target (class names read from the dataset: tfds may prepare it first).

    Raises:
      UsageError: an invalid target setting, naming the valid choices.
    """
    check_config(config)
    resolved = workdirs.config_json(config)
    fields = dict(resolved["data"])  # the source's geometry and mean (and old fields)
    fields.update({k: resolved["transfer"]["data"][k] for k in _TARGET_FIELDS})
    # Features are streamed once, so keeping decoded squares of a large target is pointless.
    fields["cache"] = False
    data = ml_collections.ConfigDict(fields)
    names = _all_class_names(data)
    classes = inputs.selected_classes(data)
    bad = [c for c in classes if not 0 <= c < len(names)]
    if bad or len(set(classes)) != len(classes):
        raise UsageError(
            f"config.transfer.data.classes={classes}: must be distinct ids in 0..{len(names) - 1}"
        )
    if classes:
        names = [names[c] for c in classes]
    return Target(data, names, bool(data.multi_label), not data.test_split)


def _source_overlap_warning(config, target: Target):
    """Warns when the source was trained on the target's images' classes (no transfer)."""
    src = config.data
    same = all(src.get(k) == target.data.get(k) for k in ("source", "name", "tfds_config"))
    if src.get("source") == "folder":
        same = same and src.get("folder") == target.data.folder
    if not same:
        return
    src_classes = set(inputs.selected_classes(src)) or set(range(int(src.num_classes)))
    tgt_classes = set(inputs.selected_classes(target.data)) or set(range(target.num_classes))
    if src_classes & tgt_classes:
        logging.warning(
            "The source run was trained on target classes %s of the same dataset: this "
            "measures no transfer (pretrain on the other classes, e.g. configs/pretrain_shapes.py)",
            sorted(src_classes & tgt_classes),
        )


# ----------------------------------------------------------------------------------------
# Records and features
# ----------------------------------------------------------------------------------------


def multi_hot(labels, num_classes: int) -> tf.Tensor:
    """int64 (C,) 0/1 vector of the classes in `labels` (a scalar or a list, maybe empty)."""
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    hot = tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.int64), axis=0)
    return tf.minimum(hot, 1)


def records(target: Target, split: str) -> tf.data.Dataset:
    """(record index, encoded image, label) of a target split, in split order.

    Labels are int64 class ids, or int64 (C,) multi-hot vectors for multi-label targets.
    For folders, 'a+b' joins splits, as tfds split expressions do.
    """
    data = target.data
    if target.multi_label:
        import tensorflow_datasets as tfds

        ds = inputs._tfds_builder(data).as_dataset(
            split=split, decoders={data.image_key: tfds.decode.SkipDecoding()}
        )

        def pick(ex):
            y = ex
            for key in data.label_key.split("/"):
                y = y[key]
            return ex[data.image_key], multi_hot(y, target.num_classes)

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
    S, s, mean = data.resize_size, data.crop_size, tuple(data.mean)
    return lambda i, sq, y: (
        i,
        preprocess.crop_of_square(sq, preprocess.CENTER_CROP, S, s, mean),
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
        ds = ds.filter(_index_filter(indices))
    ds = ds.map(_square(target.data), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.map(_center(target.data), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _index_filter(indices):
    indices = np.asarray(indices, np.int64)
    mask = np.zeros(int(indices.max()) + 2 if len(indices) else 1, bool)
    mask[indices] = True
    mask = tf.constant(mask)
    last = mask.shape[0] - 1  # always False: where every larger index is sent
    return lambda i, e, y: tf.gather(mask, tf.minimum(i, last))


def feature_layers(model: keras.Model) -> list[str]:
    """Layers whose output can be tapped as features (all but the input)."""
    return [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def check_feature_layer(model: keras.Model, layer: str):
    """Raises UsageError unless `layer` names a layer of `model`."""
    names = feature_layers(model)
    if layer not in names:
        raise UsageError(
            f"config.transfer.feature_layer={layer!r} is not a layer of the source model: "
            f"choose one of {', '.join(names)}"
        )


def extract_features(model: keras.Model, layer: str, dataset) -> dict[str, np.ndarray]:
    """Activations of `layer` (flattened) for every image of a (indices, images, labels)
    batched dataset, in inference mode.

    Returns:
      {'features': float32 (N, D), 'labels': int64 (N,) or (N, C), 'indices': int64 (N,)}.
    """
    tap = keras.Model(model.inputs, model.get_layer(layer).output)

    @tf.function(reduce_retracing=True)
    def forward(images):
        f = tap(images, training=False)
        return tf.reshape(f, [tf.shape(f)[0], -1])

    feats, labels, indices = [], [], []
    for i, images, y in tqdm.tqdm(dataset, desc=f"{layer} features", unit="batch"):
        feats.append(forward(images).numpy().astype(np.float32))
        labels.append(y.numpy())
        indices.append(i.numpy())
    if not feats:
        raise UsageError("the target split holds no readable images")
    return {
        "features": np.concatenate(feats),
        "labels": np.concatenate(labels).astype(np.int64),
        "indices": np.concatenate(indices).astype(np.int64),
    }


def cache_key(checkpoint: str, layer: str, data, split: str) -> str:
    """A key naming the features of (source checkpoint, layer, target data, split).

    The checkpoint is identified by path, modification time and size, so retraining (or
    resuming) the source gives new keys; a folder target by its list of files and labels.
    """
    st = os.stat(checkpoint)
    identity = {
        "version": CACHE_VERSION,
        "checkpoint": [os.path.abspath(checkpoint), st.st_mtime_ns, st.st_size],
        "layer": layer,
        "split": split,
        "data": {k: workdirs.config_json(data).get(k) for k in _DATA_IDENTITY},
        "data_dir": inputs._data_dir(data),
    }
    if data.source == "folder":
        listing = [inputs._folder_split(data.folder, part) for part in split.split("+")]
        identity["files"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(
    workdir: str, model: keras.Model, layer: str, target: Target, split: str, batch_size: int
) -> tuple[dict[str, np.ndarray], str, bool]:
    """Features of a target split, from `WORKDIR/transfer/cache/` or extracted and cached.

    Returns:
      (arrays as from `extract_features`, cache file path, True if it was a cache hit).
    """
    key = cache_key(workdirs.checkpoint_path(workdir), layer, target.data, split)
    path = os.path.join(workdir, MODE, "cache", f"{key}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("features", "labels", "indices")}
        logging.info(
            "Feature cache hit: %s (%s %s, %d images x %d %s features)",
            path,
            target.data.name or target.data.folder,
            split,
            *arrays["features"].shape,
            layer,
        )
        return arrays, path, True
    logging.info("Feature cache miss: extracting %s features of %s into %s", layer, split, path)
    arrays = extract_features(model, layer, center_crops(target, split, batch_size))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)  # uncompressed: read back often, rarely shrinks much
    os.replace(tmp, path)
    return arrays, path, False


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def _class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    if labels.ndim == 2:
        return [np.flatnonzero(labels[:, c]) for c in range(num_classes)]
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def class_orders(labels: np.ndarray, num_classes: int, seed: int, draw: int) -> list[np.ndarray]:
    """Per class, the positions of its images in a seeded random order of draw `draw`."""
    rng = np.random.default_rng([seed, draw])
    return [rng.permutation(m) for m in _class_members(labels, num_classes)]


def sample_per_class(orders: list[np.ndarray], n: int) -> np.ndarray:
    """Sorted positions of the first `n` images of every class's order (their union when
    an image has several labels). n = 0: all of them."""
    chosen = [order if n == 0 else order[:n] for order in orders]
    return np.unique(np.concatenate(chosen)).astype(np.int64)


def held_out(labels: np.ndarray, orders, max_n: int, cap: int, seed: int, draw: int) -> np.ndarray:
    """Sorted positions never among a draw's training images (the first `max_n` of each
    class's order), at most `cap` per class (0 = all; single-label only)."""
    used = sample_per_class(orders, max_n)
    rest = np.setdiff1d(np.arange(len(labels)), used)
    return cap_per_class(labels, rest, cap, seed, draw)


def cap_per_class(labels: np.ndarray, positions, cap: int, seed: int, draw: int) -> np.ndarray:
    """At most `cap` seeded positions per class from `positions` (cap 0 or multi-label:
    all of them)."""
    positions = np.asarray(positions, np.int64)
    if cap <= 0 or labels.ndim == 2:
        return np.sort(positions)
    rng = np.random.default_rng([seed, draw, 1])
    keep = [
        rng.permutation(positions[labels[positions] == c])[:cap]
        for c in np.unique(labels[positions])
    ]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def check_counts(labels: np.ndarray, class_names, per_class, held_out_test: bool):
    """Raises UsageError if a class has fewer images than the largest N needs."""
    counts = [len(m) for m in _class_members(labels, len(class_names))]
    need = max(per_class) + (1 if held_out_test else 0)  # 0 (all) needs nothing
    fewest = int(np.argmin(counts))
    if counts[fewest] < need:
        largest = counts[fewest] - (1 if held_out_test else 0)
        raise UsageError(
            f"class {class_names[fewest]!r} has {counts[fewest]} training images, fewer than "
            f"N={max(per_class)} per class{' plus 1 to test' if held_out_test else ''}: "
            f"use config.transfer.per_class values <= {largest}"
        )


# ----------------------------------------------------------------------------------------
# Classifiers and metrics
# ----------------------------------------------------------------------------------------


def train_softmax(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    multi_label: bool,
    steps: int = 300,
    learning_rate: float = 0.01,
    weight_decay: float = 1e-4,
):
    """A linear classifier on fixed features: full-batch Adam from zero weights.

    Args:
      x: float32 (N, D) features; y: int64 (N,) labels, or (N, C) 0/1 for multi-label.
      multi_label: per-class sigmoid cross-entropy instead of the softmax.
      weight_decay: L2 penalty on the weights.

    Returns:
      A function mapping features (M, D) to class scores (M, C) (logits).
    """
    scale = np.float32(1.0 / max(float(np.sqrt(np.mean(np.square(x)))), 1e-12))
    y = np.asarray(y, np.float32 if multi_label else np.int64)
    w, b = _fit_linear(
        tf.constant(x * scale, tf.float32),
        tf.constant(y),
        num_classes,
        multi_label,
        tf.constant(int(steps)),
        tf.constant(float(learning_rate)),
        tf.constant(float(weight_decay)),
    )
    w, b = w.numpy(), b.numpy()
    return lambda features: (np.asarray(features, np.float32) * scale) @ w + b


@tf.function(reduce_retracing=True)
def _fit_linear(x, y, num_classes: int, multi_label: bool, steps, learning_rate, weight_decay):
    """Full-batch Adam (default betas) on a linear layer from zero weights."""
    if multi_label:
        data_loss = lambda z: tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, z))  # noqa: E731
    else:
        data_loss = lambda z: tf.reduce_mean(  # noqa: E731
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)
        )
    params = [tf.zeros([tf.shape(x)[1], num_classes]), tf.zeros([num_classes])]
    m = [tf.zeros_like(p) for p in params]
    v = [tf.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in tf.range(1, steps + 1):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = data_loss(x @ params[0] + params[1])
            loss += weight_decay * tf.reduce_sum(tf.square(params[0]))
        grads = tape.gradient(loss, params)
        t = tf.cast(step, tf.float32)
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
        v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
        lr = learning_rate * tf.sqrt(1 - b2**t) / (1 - b1**t)
        params = [p - lr * mi / (tf.sqrt(vi) + eps) for p, mi, vi in zip(params, m, v)]
    return params


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of one class (PASCAL VOC 2010+): the area under the precision-
    recall curve whose precision is made monotone (at each recall, the best precision at
    that or any higher recall). Images are ranked by score; ties keep input order.

    Returns:
      AP in [0, 1], or NaN if there is no positive.
    """
    positives = np.asarray(positives, bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = positives[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    # Recall rises by 1/P exactly at the positives, so the area sums their envelope.
    return float(envelope[hits].sum() / hits.sum())


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, multi_label: bool) -> dict:
    """The target's metric from class scores (N, C).

    Returns:
      Single-label: {'metric': mean per-class accuracy %, 'accuracy': overall %,
      'per_class': [% per class, NaN if absent]}; multi-label: {'metric': mAP %,
      'per_class': [AP % per class, NaN without positives]}.
    """
    num_classes = scores.shape[1]
    if multi_label:
        ap = [100 * average_precision(scores[:, c], labels[:, c]) for c in range(num_classes)]
        return {"metric": float(np.nanmean(ap)), "per_class": ap}
    pred = np.argmax(scores, axis=1)
    per_class = [
        100 * float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else float("nan")
        for c in range(num_classes)
    ]
    return {
        "metric": float(np.nanmean(per_class)),
        "accuracy": 100 * float(np.mean(pred == labels)),
        "per_class": per_class,
    }


# ----------------------------------------------------------------------------------------
# From scratch
# ----------------------------------------------------------------------------------------


def encoded_images(target: Target, split: str, indices) -> tuple[np.ndarray, np.ndarray]:
    """The encoded bytes and labels of the given record indices of a split, in record
    order: one pass over the split; the images are decoded only when used."""
    ds = records(target, split).filter(_index_filter(indices))
    images, labels = [], []
    for _, e, y in ds.as_numpy_iterator():
        images.append(e)
        labels.append(y)
    return np.array(images, dtype=object), np.stack(labels)


class ScratchTrainer:
    """The source architecture trained from scratch on some target images.

    One model, one training and one test pipeline are built per target; every run
    re-initializes the model (weights, optimizer state, dropout seeds) and swaps the
    images the pipelines read (Python generators), so nothing is traced twice: at small N
    tracing, not the few SGD steps, would dominate. Training takes a random one of the 10
    crops of each image per step (the paper's augmentation) in batches of
    `scratch.batch_size`, for `scratch.epochs` passes over the images (small sets repeat
    within a batch). Evaluation: the center crop.
    """

    def __init__(self, source_config, target: Target):
        from zf_tf.core import model as model_lib

        self._build = model_lib.build_model
        self.target = target
        self.settings = source_config.transfer.scratch
        self.batch = int(self.settings.batch_size)
        self.model_config = ml_collections.ConfigDict(workdirs.config_json(source_config)["model"])
        self.model_config.num_classes = target.num_classes
        self.model = self._fresh(0)
        train = source_config.train
        loss = (
            keras.losses.BinaryCrossentropy(from_logits=True)
            if target.multi_label
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        self.model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=train.learning_rate, momentum=train.momentum
            ),
            loss=loss,
        )
        self._logits = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        self._run = None  # (images, labels, test images, seed) of the current run
        data = target.data
        S, s, mean = data.resize_size, data.crop_size, tuple(data.mean)
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
            .map(
                lambda e, y, k: (preprocess.train_crop(e, k, S, s, mean), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .batch(self.batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        self.test_ds = (
            tf.data.Dataset.from_generator(
                lambda: iter(self._run[2]), output_signature=tf.TensorSpec([], tf.string)
            )
            .map(
                lambda e: preprocess.center_crop(e, S, s, mean), num_parallel_calls=tf.data.AUTOTUNE
            )
            .batch(self.batch)
        )

    def _train_stream(self):
        """Endless (image, label, crop index) in a seeded order, reshuffled every pass."""
        images, labels, _, seed = self._run
        rng = np.random.default_rng(seed)
        while True:
            for i in rng.permutation(len(labels)):
                yield images[i], labels[i], np.int32(rng.integers(10))

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
        self.model.fit(self.train_ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        return np.concatenate([self._logits(x).numpy() for x in self.test_ds])


# ----------------------------------------------------------------------------------------
# Tables and figure
# ----------------------------------------------------------------------------------------


def _cell(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def _n_label(n: int) -> str:
    return "all" if n == 0 else str(n)


def results_table(results: dict) -> str:
    """Table 4/5-style markdown: one row per method, one column per images-per-class.

    Args:
      results: with 'per_class' [N...], 'metric_name', 'feature_layer', 'transfer' and
        optionally 'scratch': {str(N): {'mean', 'std'}}.
    """
    header = [f"{results['metric_name']} % (mean ± std over {results['draws']} draws)"]
    header += [f"{_n_label(n)}/class" for n in results["per_class"]]
    rows = []
    for key, name in (
        ("transfer", f"Pretrained ZFNet features ({results['feature_layer']}) + new softmax"),
        ("scratch", "Same architecture trained from scratch"),
    ):
        if results.get(key):
            rows.append([name] + [_cell(**_ms(results[key][str(n)])) for n in results["per_class"]])
    return outputs.markdown_table(header, rows)


def _ms(entry: dict) -> dict:
    return {"mean": entry["mean"], "std": entry["std"]}


def ap_table(class_names, transfer_ap, scratch_ap=None) -> str:
    """Table 6-style markdown: AP % per class (columns) for transfer (and scratch), mean last.

    Args:
      transfer_ap, scratch_ap: AP % per class (NaN: no positive test image, shown '-').
    """
    header = ["AP %"] + list(class_names) + ["mean"]

    def row(name, ap):
        cells = ["-" if np.isnan(a) else f"{a:.1f}" for a in ap]
        return [name] + cells + [f"{np.nanmean(ap):.1f}"]

    rows = [row("Pretrained features", transfer_ap)]
    if scratch_ap is not None:
        rows.append(row("From scratch", scratch_ap))
    return outputs.markdown_table(header, rows)


def plot(results: dict, path: str) -> np.ndarray:
    """Fig. 9-style plot: the metric against training images per class, transfer and from
    scratch, with one-standard-deviation error bars. Returns the PNG as uint8 (H, W, 3)."""
    plt = outputs.pyplot()
    per_class = results["per_class"]
    all_x = results.get("all_per_class", max(per_class) * 2)
    xs = [all_x if n == 0 else n for n in per_class]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (
        ("transfer", f"pretrained {results['feature_layer']} + softmax", "o-"),
        ("scratch", "from scratch", "s--"),
    ):
        if not results.get(key):
            continue
        means = [results[key][str(n)]["mean"] for n in per_class]
        stds = [results[key][str(n)]["std"] for n in per_class]
        ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=label)
    if results["metric_name"] == "mean per-class accuracy":
        ax.axhline(100 / len(results["class_names"]), color="gray", ls=":", label="chance")
    ax.set_xticks(xs, [_n_label(n) for n in per_class])
    ax.set_xlabel("Training images per class")
    ax.set_ylabel(f"{results['metric_name']} (%)")
    ax.set_title(f"Transfer to {results['target']} ({results['draws']} draws)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = outputs.save_figure(fig, path)
    plt.close(fig)
    return image


# ----------------------------------------------------------------------------------------
# The mode
# ----------------------------------------------------------------------------------------


def _json_safe(value):
    """NaN (a class without test positives) as null: strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def run(config, workdir: str, model: keras.Model, overwrite: bool = False) -> dict:
    """Transfer from `model` (trained in `workdir`) to the target of `config.transfer`.

    Args:
      config: the source run's config with the command line's `transfer` section.
      workdir: the source workdir: outputs go to WORKDIR/transfer/<name>/.
      model: the source model (its checkpoint identifies the feature cache).
      overwrite: replace existing outputs.

    Returns:
      The results dict (also written as JSON), with 'paths' to the outputs.
    """
    target = resolve_target(config)
    t = config.transfer
    layer = t.feature_layer
    check_feature_layer(model, layer)
    _source_overlap_warning(config, target)
    paths = outputs.reserve(
        workdir,
        os.path.join(MODE, t.name),
        [f"{layer}.{e}" for e in ("json", "md", "png")],
        overwrite,
    )
    per_class = [int(n) for n in t.per_class]
    data = target.data
    timings = {}
    start = time.perf_counter()
    train, train_cache, train_hit = cached_features(
        workdir, model, layer, target, data.train_split, t.batch_size
    )
    caches = {"train": {"path": train_cache, "hit": train_hit}}
    test = None
    if not target.held_out:
        test, test_cache, test_hit = cached_features(
            workdir, model, layer, target, data.test_split, t.batch_size
        )
        caches["test"] = {"path": test_cache, "hit": test_hit}
    timings["features_s"] = time.perf_counter() - start
    check_counts(train["labels"], target.class_names, per_class, target.held_out)

    transfer = {n: [] for n in per_class}
    scratch = {n: [] for n in per_class}
    transfer_ap = {n: [] for n in per_class}
    scratch_ap = {n: [] for n in per_class}
    timings["softmax_s"] = timings["scratch_s"] = 0.0
    trainer = ScratchTrainer(config, target) if t.scratch.epochs else None
    test_sizes = []
    bar = tqdm.tqdm(total=t.draws * len(per_class), desc=f"transfer to {t.name}", unit="fit")
    for draw in range(t.draws):
        orders = class_orders(train["labels"], target.num_classes, t.seed, draw)
        if target.held_out:
            test_pos = held_out(
                train["labels"], orders, max(per_class), t.test_per_class, t.seed, draw
            )
            test_set, test_split = train, data.train_split
        else:
            test_pos = cap_per_class(
                test["labels"], np.arange(len(test["labels"])), t.test_per_class, t.seed, draw
            )
            test_set, test_split = test, data.test_split
        test_sizes.append(len(test_pos))
        test_labels = test_set["labels"][test_pos]
        if trainer:
            # Every N's images are among the largest N's (nested draws): one pass each.
            pool = sample_per_class(orders, 0 if 0 in per_class else max(per_class))
            pool_images, _ = encoded_images(target, data.train_split, train["indices"][pool])
            test_images, _ = encoded_images(target, test_split, test_set["indices"][test_pos])
        for n in per_class:
            train_pos = sample_per_class(orders, n)
            tic = time.perf_counter()
            classify = train_softmax(
                train["features"][train_pos],
                train["labels"][train_pos],
                target.num_classes,
                target.multi_label,
                int(t.softmax.steps),
                float(t.softmax.learning_rate),
                float(t.softmax.weight_decay),
            )
            result = evaluate_scores(
                classify(test_set["features"][test_pos]), test_labels, target.multi_label
            )
            timings["softmax_s"] += time.perf_counter() - tic
            transfer[n].append(result["metric"])
            transfer_ap[n].append(result["per_class"])
            if trainer:
                tic = time.perf_counter()
                scores = trainer.fit_predict(
                    pool_images[np.searchsorted(pool, train_pos)],
                    train["labels"][train_pos],
                    test_images,
                    seed=t.seed * 1000 + draw * 100 + per_class.index(n),
                )
                result = evaluate_scores(scores, test_labels, target.multi_label)
                timings["scratch_s"] += time.perf_counter() - tic
                scratch[n].append(result["metric"])
                scratch_ap[n].append(result["per_class"])
            bar.update()
            bar.set_postfix(draw=draw, n=n, transfer=f"{transfer[n][-1]:.1f}")
    bar.close()

    results = {
        "target": t.name,
        "source_workdir": os.path.abspath(workdir),
        "feature_layer": layer,
        "feature_dim": int(train["features"].shape[1]),
        "metric_name": "mean AP" if target.multi_label else "mean per-class accuracy",
        "class_names": target.class_names,
        "per_class": per_class,
        "draws": int(t.draws),
        "seed": int(t.seed),
        "held_out_test": target.held_out,
        "num_train_images": int(len(train["labels"])),
        "num_test_images": int(np.mean(test_sizes)),
        "all_per_class": float(len(train["labels"]) / target.num_classes),
        "transfer": {str(n): _summary(transfer[n]) for n in per_class},
        "scratch": {str(n): _summary(scratch[n]) for n in per_class} if t.scratch.epochs else {},
        "scratch_epochs": int(t.scratch.epochs),
        "cache": caches,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    text = (
        f"Transfer to {t.name}: {results['metric_name']} %, {layer} features of the model "
        f"in {workdir}; test: {results['num_test_images']} images.\n\n"
    )
    text += results_table(results)
    if target.multi_label:
        n = per_class[-1]
        mean_ap = lambda aps: np.nanmean(np.asarray(aps, np.float64), axis=0)  # noqa: E731
        results["per_class_ap"] = {
            "per_class": n,
            "transfer": mean_ap(transfer_ap[n]).tolist(),
            "scratch": mean_ap(scratch_ap[n]).tolist() if t.scratch.epochs else None,
        }
        text += f"\nAP per class at {_n_label(n)} images per class (mean over draws):\n\n"
        text += ap_table(
            target.class_names,
            results["per_class_ap"]["transfer"],
            results["per_class_ap"]["scratch"],
        )
    outputs.save_text(paths[f"{layer}.md"], text)
    image = plot(results, paths[f"{layer}.png"])
    outputs.write_tensorboard(workdir, MODE, f"{t.name}/{layer}", image)
    results["paths"] = paths
    outputs.save_text(paths[f"{layer}.json"], json.dumps(_json_safe(results), indent=2) + "\n")
    logging.info("Transfer results in %s", os.path.dirname(paths[f"{layer}.md"]))
    print(text)
    return results


def run_mode(config, workdir: str, opts) -> dict:
    """`--mode=transfer` (cli.MODES): the workdir's trained model is the source.

    Returns:
      The results of `run`.
    """
    _check_section(config)
    return run(config, workdir, workdirs.load_model(workdir), opts.overwrite)
