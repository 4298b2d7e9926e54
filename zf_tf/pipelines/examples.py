"""A handful of examples of a split as numpy arrays, for the analyses.

The images are what the model sees at evaluation: the unflipped center crop of the S x S
center square (`preprocess.ten_crops` index 4, the evaluation pipeline's geometry). Where
the dataset has object annotations (the embedded `zf_shapes` dataset: `bbox` and `mask`),
they come along mapped into crop pixels, so analyses can ask "is this on the object?"
(occlusion, pointing game, correspondence). Labels are the model's: with `data.classes`
only those classes, relabelled 0..k-1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from zf_tf.pipelines import inputs, preprocess


@dataclasses.dataclass
class Examples:
    """N examples; `boxes`/`masks` are None when the dataset has no annotations."""

    images: np.ndarray  # float32 (N, s, s, 3): model input (`preprocess.pixels(config.data)`)
    labels: np.ndarray  # int64 (N,)
    indices: np.ndarray  # int64 (N,): position of each example in the split
    boxes: np.ndarray | None = None  # int32 (N, 4): y0, x0, y1, x1 (exclusive) in crop pixels
    masks: np.ndarray | None = None  # bool (N, s, s): object pixels in the crop

    def __len__(self) -> int:
        return len(self.labels)


def crop_geometry(height: int, width: int, resize_size: int, crop_size: int):
    """(scale, dy, dx): original pixel (y, x) lands at crop pixel (y*scale - dy, x*scale - dx).

    The center square of side min(h, w) is resized to S and the center s x s cropped.
    """
    side = min(height, width)
    scale = resize_size / side
    cy, cx = preprocess.crop_offsets(resize_size, crop_size)[preprocess.CENTER_CROP]
    return scale, (height - side) // 2 * scale + cy, (width - side) // 2 * scale + cx


def pixel_box_to_crop(box, height: int, width: int, resize_size: int, crop_size: int):
    """A box [y0, x0, y1, x1) in original pixels as int32 crop pixels of the center crop,
    rounded outwards (so it covers the region) and clipped to the crop."""
    scale, dy, dx = crop_geometry(height, width, resize_size, crop_size)
    y0, x0, y1, x1 = (float(v) for v in box)
    out = np.array(
        [
            np.floor(y0 * scale - dy),
            np.floor(x0 * scale - dx),
            np.ceil(y1 * scale - dy),
            np.ceil(x1 * scale - dx),
        ]
    )
    return np.clip(out, 0, crop_size).astype(np.int32)


def box_to_crop(bbox, height: int, width: int, resize_size: int, crop_size: int) -> np.ndarray:
    """A normalized [ymin, xmin, ymax, xmax] box as integer crop pixels, clipped to the crop."""
    pixels = np.asarray(bbox, np.float64) * [height, width, height, width]
    return pixel_box_to_crop(pixels, height, width, resize_size, crop_size)


def _mask_to_crop(mask: np.ndarray, resize_size: int, crop_size: int) -> np.ndarray:
    h, w = mask.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    square = tf.image.resize(
        tf.cast(mask[y : y + side, x : x + side], tf.float32), (resize_size, resize_size)
    ).numpy()[..., 0]
    cy, cx = preprocess.crop_offsets(resize_size, crop_size)[preprocess.CENTER_CROP]
    return square[cy : cy + crop_size, cx : cx + crop_size] >= 0.5 * mask.max()


def load_examples(config, split: str, num: int, label: int | None = None) -> Examples:
    """The first `num` examples of a split (only those of class `label`, if given).

    Args:
      config: experiment ConfigDict (uses `config.data`).
      split: split name.
      num: how many; fewer if the split (or class) has fewer.
      label: keep only this class (a model label: with `data.classes`, 0..k-1).

    Returns:
      Examples, with boxes and masks where the source has them (the embedded dataset:
      `Source.annotated`); `indices` count the
      examples of the selected classes.

    Raises:
      DataError: no such split (naming the valid ones).
    """
    data = config.data
    inputs.check_split(data, split)
    S, s, pixels = data.resize_size, data.crop_size, preprocess.pixels(data)
    annotated = inputs.source(data).annotated(data, split)
    # Positions are counted before decoding, so an image that fails to decode (dropped)
    # leaves a gap in `indices` instead of shifting every later example's index.
    records = inputs.encoded_records(data, split) if annotated is None else annotated
    ds = records.enumerate()
    if label is not None:
        ds = ds.filter(lambda i, ex: tf.equal(tf.cast(ex[1], tf.int64), label))
    if annotated is None:
        ds = ds.map(
            lambda i, ex: (
                i,
                (preprocess.decode_rgb(ex[0]), ex[1], tf.zeros(4), tf.zeros((1, 1, 1), tf.uint8)),
            )
        ).ignore_errors()
    images, labels, indices, boxes, masks = [], [], [], [], []
    for i, (image, y, bbox, mask) in ds.take(num).as_numpy_iterator():
        h, w = image.shape[:2]
        images.append(preprocess.ten_crops_of_image(image, S, s, pixels)[preprocess.CENTER_CROP])
        labels.append(y)
        indices.append(i)
        if annotated is not None:
            boxes.append(box_to_crop(bbox, h, w, S, s))
            masks.append(_mask_to_crop(mask, S, s))
    n = len(labels)
    if label is None and n and indices[-1] + 1 > n:
        logging.warning(
            "%d of the first %d %s images could not be decoded and were left out",
            indices[-1] + 1 - n,
            indices[-1] + 1,
            split,
        )
    return Examples(
        images=np.stack([np.asarray(x) for x in images]).astype(np.float32)
        if n
        else np.zeros((0, s, s, 3), np.float32),
        labels=np.asarray(labels, np.int64),
        indices=np.asarray(indices, np.int64),
        boxes=np.stack(boxes) if boxes else None,
        masks=np.stack(masks) if masks else None,
    )
