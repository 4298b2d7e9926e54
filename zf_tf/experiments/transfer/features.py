"""Features of the target's images: the activations of one layer of the source model on
every center crop, extracted once and cached in `WORKDIR/transfer/cache/<key>.npz` under a
key naming the source checkpoint, the layer, the target data and the split.
"""

from __future__ import annotations

import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from zf_tf import outputs
from zf_tf.core.errors import UsageError
from zf_tf.experiments.transfer import images
from zf_tf.experiments.transfer.target import MODE, Target
from zf_tf.pipelines import folder, sources
from zf_tf.training import workdirs

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
    "preprocessing",
)


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
    def forward(crops):
        f = tap(crops, training=False)
        return tf.reshape(f, [tf.shape(f)[0], -1])

    feats, labels, indices = [], [], []
    for i, crops, y in tqdm.tqdm(dataset, desc=f"{layer} features", unit="batch"):
        feats.append(forward(crops).numpy().astype(np.float32))
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
        "data_dir": sources.data_dir(data),
    }
    if data.source == "folder":
        listing = [folder.split_files(data.folder, part) for part in split.split("+")]
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
    arrays = extract_features(model, layer, images.center_crops(target, split, batch_size))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Uncompressed: read back often, rarely shrinks much.
    outputs.save_npz(path, compressed=False, **arrays)
    return arrays, path, False
