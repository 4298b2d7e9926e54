"""`--mode=occlusion`: occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2, Fig. 7).

A gray square slides over the image (the dataset's mean color: `Pixels.fill` in the model
input, 0 with the paper's mean subtraction). For every occluder position the model is run on
the occluded copy and we record, as maps over occluder positions:
  (b) the total activation (sum over the map) of the feature map of a conv layer
      (`config.analysis.occlusion.layer`; default the model's last conv layer, ZFNet's conv5,
      the paper's layer 5) that is strongest (highest maximum activation) on the unoccluded
      image,
  (d) the probability of the correct class (softmax of the logits); where the labels are not
      classes of the model (a model brought along with --model, or unlabeled images), of the
      class the model predicts on the unoccluded image instead, and the outputs say so,
  (e) the most probable class.
(c) is that feature map's deconvnet projection on the unoccluded image, next to the same map's
strongest projections from other images of the split (a top-k scan).

Copies are built inside a tf.function (a `tf.where` with a square mask) and forwarded many at
a time through one two-output model (the tapped layer and the logits), so each occluded batch
costs one forward pass for (b), (d) and (e).

On annotated data (the embedded dataset's object masks) the mode also measures how often the
correct-class probability is lowest with the occluder on the object. "On the object": the
occluder square at the position of minimum probability covers at least half of the smaller of
(occluder area, object mask area) in object pixels. Chance level: the mean, over images, of
the fraction of occluder positions that count as on the object.

Outputs in `WORKDIR/occlusion/`: occlusion.npz (all arrays), occlusion.png (Fig. 7-like,
one row per image), occlusion.json (per-image summary and the on-object fraction), and a
TensorBoard image in `WORKDIR/logs/occlusion`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import keras
import numpy as np
import tensorflow as tf
import tqdm

from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core import deconv, graph, topk
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples as examples_lib
from zf_tf.pipelines import inputs, preprocess

MODE = "occlusion"
OUTPUTS = ("occlusion.npz", "occlusion.png", "occlusion.json")
OTHER_IMAGES = 3  # top projections of the same feature map from other images, column (c)
FIGURE_ROWS = 8  # images drawn in occlusion.png (all are in the npz/json)
ON_OBJECT_DEFINITION = (
    "the occluder square at the position of lowest correct-class probability covers object-mask "
    "pixels numbering at least half of min(occluder area, mask area); chance = mean over images "
    "of the fraction of occluder positions meeting the same test"
)


# ---------------------------------------------------------------------------------------------
# Occluder geometry and batched occlusion (public: the attribution code uses these too)
# ---------------------------------------------------------------------------------------------


def _offsets(length: int, size_px: int, stride_px: int) -> np.ndarray:
    """Top-left offsets along one axis; the last one puts the square at the far border."""
    offsets = list(range(0, length - size_px + 1, stride_px))
    if offsets[-1] != length - size_px:
        offsets.append(length - size_px)
    return np.asarray(offsets, np.int32)


def occluder_grid(crop_size: int, size: float, stride: float):
    """Occluder side, step and positions for a crop.

    Args:
      crop_size: side of the (square) model input, in pixels.
      size: occluder side as a fraction of `crop_size`, in (0, 1].
      stride: step between positions as a fraction of `crop_size`, > 0.

    Returns:
      (size_px, stride_px, ys, xs): side and step in pixels (rounded to nearest, at least
      1 px, the side at most `crop_size`); ys, xs int32 top-left offsets along each axis:
      range(0, crop_size - size_px + 1, stride_px), plus crop_size - size_px when not already
      there, so the square reaches every border.

    Raises:
      ValueError: size not in (0, 1] or stride not > 0.
    """
    if not 0 < size <= 1:
        raise ValueError(f"occluder size must be a fraction of the crop in (0, 1]; got {size}")
    if not stride > 0:
        raise ValueError(f"occluder stride must be a positive fraction of the crop; got {stride}")
    size_px = min(crop_size, max(1, math.floor(size * crop_size + 0.5)))
    stride_px = max(1, math.floor(stride * crop_size + 0.5))
    offsets = _offsets(crop_size, size_px, stride_px)
    return size_px, stride_px, offsets, offsets.copy()


@tf.function(reduce_retracing=True)
def _occlude(image, ys, xs, size, fill):
    """Copies of `image` (H, W, C), copy i with a square of side `size` at (ys[i], xs[i])
    filled with the colour `fill` (C,)."""
    h, w, c = tf.shape(image)[0], tf.shape(image)[1], tf.shape(image)[2]
    # Pixels as (H, W*C) rows so the select broadcasts along the batch axis only: 4x faster
    # on CPU than a (B, H, W, 1) mask against (1, H, W, C), which broadcasts the channels.
    rows = tf.range(h)[None, :]
    cols = tf.repeat(tf.range(w), c)[None, :]
    in_rows = (rows >= ys[:, None]) & (rows < ys[:, None] + size)  # (B, H)
    in_cols = (cols >= xs[:, None]) & (cols < xs[:, None] + size)  # (B, W*C)
    square = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W*C)
    # tf.where, not a multiply: exactly `fill` (a multiply by 0 gives -0.0 for negative pixels).
    fill_row = tf.reshape(tf.tile(tf.cast(fill, image.dtype), [w]), [1, 1, w * c])
    copies = tf.where(square, fill_row, tf.reshape(image, [1, h, w * c]))
    return tf.reshape(copies, [-1, h, w, c])


def _to_numpy(out):
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    return np.asarray(out)


def occluded_outputs(
    fn, image, size_px: int, stride_px: int, batch_size: int = 128, ys=None, xs=None, fill=0.0
):
    """Applies `fn` to every occluded copy of one image, many copies per call.

    Args:
      fn: callable mapping a float32 (B, H, W, 3) batch (a tf.Tensor; np.asarray works on it)
        to an array (B, ...) or a dict of such arrays (numpy or tf.Tensor).
      image: (H, W, 3) model input.
      size_px: occluder side in pixels.
      stride_px: step between positions in pixels (used when ys/xs are not given).
      batch_size: at most this many copies per call of `fn`. The positions are split into
        equal chunks (sizes differ by at most 1) so no call is a small remainder.
      ys, xs: top-left offsets along each axis; default: `occluder_grid`'s positions.
      fill: the occluder's model-input value, a scalar or one per channel: the mean colour,
        `preprocess.Pixels.fill` (0 with the paper's mean subtraction).

    Returns:
      An array (len(ys), len(xs), ...) of `fn`'s per-copy outputs, or a dict of them.
    """
    image = np.asarray(image, np.float32)
    if ys is None:
        ys = _offsets(image.shape[0], size_px, stride_px)
    if xs is None:
        xs = _offsets(image.shape[1], size_px, stride_px)
    ys, xs = np.asarray(ys, np.int32), np.asarray(xs, np.int32)
    grid = (len(ys), len(xs))
    pos_y, pos_x = np.repeat(ys, len(xs)), np.tile(xs, len(ys))
    total = pos_y.shape[0]
    chunks = max(1, -(-total // max(1, batch_size)))
    bounds = np.linspace(0, total, chunks + 1).round().astype(int)
    image_t, size_t = tf.constant(image), tf.constant(size_px, tf.int32)
    fill_t = tf.constant(np.broadcast_to(np.asarray(fill, np.float32), image.shape[-1:]))
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        copies = _occlude(
            image_t, tf.constant(pos_y[lo:hi]), tf.constant(pos_x[lo:hi]), size_t, fill_t
        )
        parts.append(_to_numpy(fn(copies)))
    if isinstance(parts[0], dict):
        return {
            k: np.concatenate([p[k] for p in parts]).reshape(*grid, *parts[0][k].shape[1:])
            for k in parts[0]
        }
    return np.concatenate(parts).reshape(*grid, *parts[0].shape[1:])


def _coverage(offsets, size_px: int, length: int) -> np.ndarray:
    """(n, length) 0/1: does the square at offsets[i] cover pixel j along this axis."""
    pixels = np.arange(length)[None, :]
    offsets = np.asarray(offsets)[:, None]
    return ((pixels >= offsets) & (pixels < offsets + size_px)).astype(np.float64)


def pixel_map(values, ys, xs, size_px: int, crop_size: int) -> np.ndarray:
    """A (gh, gw) map over occluder positions as a (crop_size, crop_size) pixel map.

    Args:
      values: (len(ys), len(xs)) one value per occluder position.
      ys, xs: the positions' top-left offsets.
      size_px: occluder side in pixels.
      crop_size: image side in pixels.

    Returns:
      float64 (crop_size, crop_size): each pixel the mean of the values of all positions whose
      square covers it (NaN where none does, possible only when stride > size).
    """
    cy, cx = _coverage(ys, size_px, crop_size), _coverage(xs, size_px, crop_size)
    total = cy.T @ np.asarray(values, np.float64) @ cx
    count = np.outer(cy.sum(0), cx.sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ---------------------------------------------------------------------------------------------
# The analysis (arrays only)
# ---------------------------------------------------------------------------------------------


def forward_fn(model: keras.Model, layer: str = ""):
    """One two-output forward pass per batch: per-map sums and maxima of `layer` ('' = the
    model's last conv layer), and the softmax probabilities.

    Returns:
      fn(images (B, H, W, 3)) -> {'map_sum': (B, F), 'map_max': (B, F), 'probs': (B, C)}
      (numpy float32).
    """
    tap = graph.tap(model, [layer or graph.last_conv(model), graph.output_layer(model)])

    @tf.function(reduce_retracing=True)
    def forward(images):
        fmap, logits = tap(images, training=False)
        fmap = tf.cast(fmap, tf.float32)
        return {
            "map_sum": tf.reduce_sum(fmap, axis=[1, 2]),
            "map_max": tf.reduce_max(fmap, axis=[1, 2]),
            "probs": tf.nn.softmax(tf.cast(logits, tf.float32)),
        }

    return lambda images: {k: v.numpy() for k, v in forward(images).items()}


def occlusion_maps(
    model: keras.Model,
    images,
    labels,
    layer: str,
    size_px: int,
    ys,
    xs,
    batch_size: int = 128,
    progress=None,
    fill=0.0,
    predicted: bool = False,
) -> dict:
    """Maps (b), (d), (e) over occluder positions for each image.

    Args:
      model: the classifier (logits output).
      images: (N, s, s, 3) model inputs.
      labels: (N,) correct classes.
      layer: conv layer whose strongest map (b) follows ('' = the model's last).
      size_px, ys, xs: occluder side and positions (`occluder_grid`).
      batch_size: occluded copies per forward pass.
      progress: optional callable(1) after each image.
      fill: the occluder's model-input value (`occluded_outputs`).
      predicted: (d) follows the class predicted on the unoccluded image, not `labels`
        (labels that are not the model's classes).

    Returns:
      dict of numpy arrays: feature (N,) the map with the highest maximum on the unoccluded
      image; clean_activation (N,) its total activation there; clean_probs (N, C); classes
      (N,) the class (d) follows (`labels`, or the predicted ones); activation_map
      (N, gh, gw) its total activation per occluder position; prob_map (N, gh, gw) that
      class' probability; class_map (N, gh, gw) most probable class.
    """
    fn = forward_fn(model, layer)
    images = np.asarray(images, np.float32)
    n_images = len(images)
    clean = fn(tf.constant(images)) if n_images else None
    out = {"activation_map": [], "prob_map": [], "class_map": []}
    feature = np.argmax(clean["map_max"], axis=1) if clean is not None else np.zeros(0, np.int64)
    if predicted and n_images:
        classes = np.argmax(clean["probs"], axis=1)
    else:
        classes = np.asarray(labels, np.int64).reshape(-1)
    for n, image in enumerate(images):
        res = occluded_outputs(fn, image, size_px, 0, batch_size, ys=ys, xs=xs, fill=fill)
        out["activation_map"].append(res["map_sum"][..., feature[n]])
        out["prob_map"].append(res["probs"][..., int(classes[n])])
        out["class_map"].append(np.argmax(res["probs"], axis=-1))
        if progress:
            progress(1)
    grid = (len(images), len(ys), len(xs))
    maps = {k: np.stack(v) if v else np.zeros(grid, np.float32) for k, v in out.items()}
    maps["class_map"] = maps["class_map"].astype(np.int32)
    idx = np.arange(len(images))
    return {
        "feature": feature.astype(np.int32),
        "clean_activation": clean["map_sum"][idx, feature] if n_images else np.zeros(0),
        "clean_probs": clean["probs"] if n_images else np.zeros((0, 0), np.float32),
        "classes": classes.astype(np.int32),
        **maps,
    }


def feature_projections(
    model: keras.Model,
    layer: str,
    images,
    features,
    dataset=None,
    indices=None,
    others: int = OTHER_IMAGES,
    progress=None,
) -> dict:
    """Column (c): each image's feature map projected to pixel space at its maximum, and the
    same map's strongest projections from other images of `dataset`.

    Args:
      model: the classifier.
      layer: conv layer ('' = the model's last).
      images: (N, s, s, 3) model inputs.
      features: (N,) feature map per image.
      dataset: callable returning a fresh dataset of (images, labels) batches (scan order =
        split order), or None to skip the other images.
      indices: (N,) the images' positions in that dataset (to exclude the image itself).
      others: how many other images per feature map.
      progress: optional callable(num_images) during the scan.

    Returns:
      dict: projection (N, s, s, 3), projection_activation (N,), others_projection
      (N, others, s, s, 3) (zeros where missing), others_index (N, others) positions in the
      dataset (-1: missing), others_activation (N, others).
    """
    layer = layer or graph.last_conv(model)
    images = np.asarray(images, np.float32)
    n, features = len(images), np.asarray(features, np.int32)
    others_index = np.full((n, others), -1, np.int64)
    picks = []  # (image row, slot, dataset index, y, x)
    if dataset is not None and n and others:
        best = topk.scan(model, layer, dataset(), k=others + 1, progress=progress)
        for row in range(n):
            f, slot = features[row], 0
            for rank in range(best.k):
                i = int(best.image[rank, f])
                if i < 0 or (indices is not None and i == int(indices[row])) or slot == others:
                    continue
                picks.append((row, slot, i, int(best.y[rank, f]), int(best.x[rank, f])))
                others_index[row, slot] = i
                slot += 1
    gathered = topk.gather_images(dataset(), [p[2] for p in picks]) if picks else {}
    order = sorted(gathered)
    pool = np.concatenate([images, np.stack([gathered[i] for i in order])]) if order else images
    where = {i: n + k for k, i in enumerate(order)}
    dn = deconv.build_deconvnet(model, layer)
    result = deconv.project(
        dn,
        pool,
        np.concatenate([np.arange(n), [where[p[2]] for p in picks]]).astype(np.int32),
        np.concatenate([features, [features[p[0]] for p in picks]]).astype(np.int32),
        np.concatenate([np.full(n, -1), [p[3] for p in picks]]).astype(np.int32),
        np.concatenate([np.full(n, -1), [p[4] for p in picks]]).astype(np.int32),
    )
    others_projection = np.zeros((n, others, *images.shape[1:]), np.float32)
    others_activation = np.zeros((n, others), np.float32)
    for m, (row, slot, _, _, _) in enumerate(picks):
        others_projection[row, slot] = result["projection"][n + m]
        others_activation[row, slot] = result["activation"][n + m]
    return {
        "projection": result["projection"][:n],
        "projection_activation": result["activation"][:n],
        "others_projection": others_projection,
        "others_index": others_index,
        "others_activation": others_activation,
    }


def on_object(prob_map, masks, ys, xs, size_px: int) -> dict:
    """Is the correct-class probability lowest with the occluder on the object?

    Definition (module doc): the square at a position is "on the object" when the object mask
    pixels it covers number at least half of min(square area, mask area).

    Args:
      prob_map: (N, gh, gw) correct-class probability per occluder position.
      masks: (N, s, s) bool object masks.
      ys, xs: positions' top-left offsets.
      size_px: occluder side.

    Returns:
      dict: on_object_map (N, gh, gw) bool per position; argmin (N, 2) grid index of the
      lowest probability (first in row-major order on ties); on_object (N,) bool at argmin;
      valid (N,) bool, mask not empty; fraction (over valid images) and chance (mean over
      valid images of the fraction of on-object positions), NaN if none is valid; overlap
      (N, gh, gw) object pixels under each square, and touch_fraction / touch_chance, the
      same two numbers for the looser test "the square touches the object" (overlap > 0),
      a diagnostic that tells near misses (the square on the object's edge) from far ones.
    """
    masks = np.asarray(masks, bool)
    n = masks.shape[0]
    cum = np.zeros((n, masks.shape[1] + 1, masks.shape[2] + 1), np.int64)
    cum[:, 1:, 1:] = masks.cumsum(1).cumsum(2)  # summed-area table: overlap of every square
    y0, x0 = np.asarray(ys)[:, None], np.asarray(xs)[None, :]
    y1, x1 = y0 + size_px, x0 + size_px
    overlap = cum[:, y1, x1] - cum[:, y0, x1] - cum[:, y1, x0] + cum[:, y0, x0]
    area = masks.sum(axis=(1, 2))
    need = 0.5 * np.minimum(size_px * size_px, area)[:, None, None]
    valid = area > 0
    on_map = (overlap >= need) & valid[:, None, None]
    flat = np.asarray(prob_map).reshape(n, -1).argmin(axis=1)
    argmin = np.stack(np.unravel_index(flat, on_map.shape[1:]), axis=1).astype(np.int32)
    hit = on_map.reshape(n, -1)[np.arange(n), flat]
    touch_map = (overlap > 0) & valid[:, None, None]
    touch = touch_map.reshape(n, -1)[np.arange(n), flat]
    any_valid = bool(valid.any())

    def rates(at_min, per_position):
        if not any_valid:
            return float("nan"), float("nan")
        return float(at_min[valid].mean()), float(per_position[valid].mean(axis=(1, 2)).mean())

    fraction, chance = rates(hit, on_map)
    touch_fraction, touch_chance = rates(touch, touch_map)
    return {
        "on_object_map": on_map,
        "argmin": argmin,
        "on_object": hit,
        "valid": valid,
        "fraction": fraction,
        "chance": chance,
        "overlap": overlap.astype(np.int32),
        "touch_fraction": touch_fraction,
        "touch_chance": touch_chance,
    }


def analyse(
    model: keras.Model,
    examples,
    layer: str,
    size: float,
    stride: float,
    batch_size: int = 128,
    dataset=None,
    others: int = OTHER_IMAGES,
    progress=None,
    scan_progress=None,
    fill=0.0,
    predicted: bool = False,
) -> dict:
    """The whole Fig. 7 analysis of some examples, as arrays.

    Args:
      model: the classifier.
      examples: `zf_tf.pipelines.examples.Examples`.
      layer: conv layer for (b) and (c) ('' = the model's last).
      size, stride: occluder side and step as fractions of the crop side.
      batch_size: occluded copies per forward pass.
      dataset: callable giving the split's (images, labels) batches for (c)'s other images
        (None: none).
      others: other images per feature map in (c).
      progress, scan_progress: optional callables for the image loop and the scan.
      fill: the occluder's model-input value (`occluded_outputs`).
      predicted: (d) and the on-object test follow the class predicted on the unoccluded
        image instead of the label (`occlusion_maps`).

    Returns:
      dict of numpy arrays: images, labels, indices, ys, xs, size_px, stride_px, and those of
      `occlusion_maps` and `feature_projections`; with masks, also masks, boxes and those of
      `on_object` (fraction and chance as 0-d arrays).
    """
    s = examples.images.shape[1]
    layer = layer or graph.last_conv(model)
    size_px, stride_px, ys, xs = occluder_grid(s, size, stride)
    arrays = {
        "images": examples.images,
        "labels": examples.labels,
        "indices": examples.indices,
        "ys": ys,
        "xs": xs,
        "size_px": np.int32(size_px),
        "stride_px": np.int32(stride_px),
    }
    arrays.update(
        occlusion_maps(
            model,
            examples.images,
            examples.labels,
            layer,
            size_px,
            ys,
            xs,
            batch_size,
            progress,
            fill,
            predicted,
        )
    )
    arrays.update(
        feature_projections(
            model,
            layer,
            examples.images,
            arrays["feature"],
            dataset,
            examples.indices,
            others,
            scan_progress,
        )
    )
    if examples.masks is not None:
        arrays["masks"], arrays["boxes"] = examples.masks, examples.boxes
        arrays.update(
            {
                k: np.asarray(v)
                for k, v in on_object(arrays["prob_map"], examples.masks, ys, xs, size_px).items()
            }
        )
    return arrays


def summarize(arrays: dict, layer: str, split: str, class_names=None, target: str = "true") -> dict:
    """The per-image summary and the on-object result written to occlusion.json.

    `target` is 'true' (the probabilities are of the label's class) or 'predicted' (of the
    class predicted on the unoccluded image, `arrays['classes']`): then 'class', 'prob' and
    'positions_misclassified' refer to that class, and 'label' is the data's label only.
    """

    def name(c):
        c = int(c)
        return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)

    rows = []
    for n in range(len(arrays["labels"])):
        label, probs = int(arrays["labels"][n]), arrays["clean_probs"][n]
        explained = int(arrays["classes"][n]) if "classes" in arrays else label
        prob_map, act = arrays["prob_map"][n], arrays["activation_map"][n]
        gy, gx = np.unravel_index(int(prob_map.argmin()), prob_map.shape)
        row = {
            "index": int(arrays["indices"][n]),
            "label": label,
            "class": name(explained),
            "prob": float(probs[explained]),
            "predicted": name(probs.argmax()),
            "min_prob": float(prob_map.min()),
            "min_prob_at": [int(arrays["ys"][gy]), int(arrays["xs"][gx])],
            "positions_misclassified": float((arrays["class_map"][n] != explained).mean()),
            "feature": int(arrays["feature"][n]),
            "activation": float(arrays["clean_activation"][n]),
            "min_activation": float(act.min()),
            "other_images": [int(i) for i in arrays["others_index"][n] if i >= 0],
        }
        if "on_object" in arrays:
            row["on_object"] = bool(arrays["on_object"][n]) if arrays["valid"][n] else None
            row["on_object_positions"] = float(arrays["on_object_map"][n].mean())
        rows.append(row)
    result = None
    if "on_object" in arrays:
        valid = arrays["valid"]
        result = {
            "definition": ON_OBJECT_DEFINITION,
            "fraction": float(arrays["fraction"]),
            "chance": float(arrays["chance"]),
            "hits": int(arrays["on_object"][valid].sum()),
            "num_images": int(valid.sum()),
            # Diagnostic, not the measure: the square at the minimum touches the object at all.
            "touching": {
                "fraction": float(arrays["touch_fraction"]),
                "chance": float(arrays["touch_chance"]),
            },
        }
    return {
        "layer": layer,
        "split": split,
        "target": target,
        "occluder_px": int(arrays["size_px"]),
        "stride_px": int(arrays["stride_px"]),
        "grid": [len(arrays["ys"]), len(arrays["xs"])],
        "num_images": len(rows),
        "on_object": result,
        "images": rows,
    }


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _edges(offsets, size_px: int) -> np.ndarray:
    """Cell edges around the occluder centers (midpoints; half a step beyond the ends)."""
    centers = np.asarray(offsets, np.float64) + size_px / 2 - 0.5
    if len(centers) == 1:
        return np.array([centers[0] - size_px / 2, centers[0] + size_px / 2])
    mid = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


def render(
    arrays: dict,
    path: str,
    pixels,
    class_names=None,
    rows: int = FIGURE_ROWS,
    dpi: int = 80,
    target: str = "true",
):
    """Draws the Fig. 7-like figure (one row per image, columns a-e) and saves it as PNG.

    `pixels` (`preprocess.Pixels`) turns the model inputs back into RGB. `target`: 'true'
    (column (d) is the correct class' probability) or 'predicted' (the probability of the
    class predicted on the unoccluded image, `arrays['classes']`).

    Returns:
      The figure as a uint8 (H, W, 3) array.
    """
    plt = outputs.pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    n = min(rows, len(arrays["labels"]))
    s = arrays["images"].shape[1]
    size_px = int(arrays["size_px"])
    ey, ex = _edges(arrays["ys"], size_px), _edges(arrays["xs"], size_px)
    num_classes = arrays["clean_probs"].shape[1]
    base = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    colors = [base(c % base.N) for c in range(num_classes)]
    class_cmap = ListedColormap(colors)
    name = (lambda c: class_names[c]) if class_names else str
    fig = plt.figure(figsize=(15, 2.7 * n + 0.4))
    outer = fig.add_gridspec(n, 5, width_ratios=[1, 1.15, 1.4, 1.15, 1.5], wspace=0.25)
    predicted = target == "predicted"
    titles = [
        "(a) input",
        "(b) total activation",
        "(c) projection | other images",
        "(d) p(predicted class)" if predicted else "(d) p(correct class)",
        "(e) most probable class",
    ]
    mark = " (unoccluded)" if predicted else " (true)"
    for r in range(n):
        image = outputs.display(arrays["images"][r], pixels)
        gray = image.mean(-1)
        label = int(arrays["classes"][r] if "classes" in arrays else arrays["labels"][r])
        ax = fig.add_subplot(outer[r, 0])
        ax.imshow(image, interpolation="nearest")
        if "masks" in arrays:
            ax.contour(arrays["masks"][r], levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(f"{titles[0]}{', predicted' if predicted else ''}: {name(label)}", fontsize=8)
        ax.axis("off")
        # (b) and (d): maps drawn at the occluder centers over the faded image.
        for col, key, cmap, title in (
            (1, "activation_map", "viridis", f"{titles[1]}, map {arrays['feature'][r]}"),
            (3, "prob_map", "jet", titles[3]),
        ):
            ax = fig.add_subplot(outer[r, col])
            ax.imshow(gray, cmap="gray", alpha=0.35, extent=(-0.5, s - 0.5, s - 0.5, -0.5))
            mesh = ax.pcolormesh(ex, ey, arrays[key][r], cmap=cmap, alpha=0.85, shading="flat")
            if key == "prob_map":
                mesh.set_clim(0, 1)
                gy, gx = np.unravel_index(int(arrays[key][r].argmin()), arrays[key][r].shape)
                ax.add_patch(
                    Rectangle(
                        (arrays["xs"][gx] - 0.5, arrays["ys"][gy] - 0.5),
                        size_px,
                        size_px,
                        fill=False,
                        edgecolor="white",
                        linewidth=1.2,
                    )
                )
            ax.set_xlim(-0.5, s - 0.5)
            ax.set_ylim(s - 0.5, -0.5)
            fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        # (c): the projection on this image, and a column of other images' projections.
        k = arrays["others_projection"].shape[1]
        inner = outer[r, 2].subgridspec(max(k, 1), 2, width_ratios=[3, 1], wspace=0.05, hspace=0.05)
        ax = fig.add_subplot(inner[:, 0])
        ax.imshow(outputs.stretch(arrays["projection"][r]), interpolation="nearest")
        ax.set_title(f"(c) map {arrays['feature'][r]}: projection | others", fontsize=8)
        ax.axis("off")
        for j in range(k):
            ax = fig.add_subplot(inner[j, 1])
            ax.axis("off")
            if arrays["others_index"][r, j] >= 0:
                ax.imshow(outputs.stretch(arrays["others_projection"][r, j]))
        # (e): categorical map of the most probable class.
        ax = fig.add_subplot(outer[r, 4])
        classes = arrays["class_map"][r]
        ax.imshow(gray, cmap="gray", alpha=0.35, extent=(-0.5, s - 0.5, s - 0.5, -0.5))
        ax.pcolormesh(
            ex, ey, classes, cmap=class_cmap, vmin=-0.5, vmax=num_classes - 0.5, alpha=0.85
        )
        ax.set_xlim(-0.5, s - 0.5)
        ax.set_ylim(s - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        present = sorted(set(np.unique(classes).tolist()) | {label})
        handles = [
            Patch(color=colors[c], label=name(c) + (mark if c == label else "")) for c in present
        ]
        ax.legend(
            handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )
        ax.set_title(titles[4], fontsize=8)
    fig.suptitle(
        "Occlusion sensitivity (Zeiler & Fergus Fig. 7)"
        + (": (d) and (e) follow the class predicted on the unoccluded image" if predicted else ""),
        fontsize=10,
        y=1 - 0.15 / fig.get_figheight(),
    )
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.93, top=1 - 0.7 / height, bottom=0.1 / height)
    return outputs.save_figure(fig, path, dpi=dpi)


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=occlusion` (config.analysis.occlusion and the request)."""

    layer: str  # conv layer of (b) and (c); '' = the model's last conv layer (`resolve`)
    size: float  # occluder side, fraction of the crop side
    stride: float  # its step, fraction of the crop side
    split: str
    num_images: int
    batch_size: int  # occluded copies per forward pass
    pixels: preprocess.Pixels  # the model inputs' normalization (occluder colour, display)
    class_names: tuple
    classes: tuple = ()  # label ids the images are drawn from; () = the split's first images
    # The split's labels are the model's classes (`resolve`); False: (d) follows the class
    # predicted on the unoccluded image.
    labels: bool = True

    @property
    def target(self) -> str:
        """The class (d) follows: 'true' or 'predicted'."""
        return "true" if self.labels else "predicted"


PREDICTED_NOTE = (
    "the labels of {split!r} are not classes of this model (a model brought along, or "
    "unlabeled images): (d) is the probability of the class predicted on the unoccluded image"
)


def settings(config, request) -> Settings:
    """Raises UsageError: bad occluder geometry; DataError: unknown split. The layer is
    checked against the model by `resolve`."""
    cfg = config.analysis.occlusion
    try:
        occluder_grid(config.data.crop_size, cfg.size, cfg.stride)
    except ValueError as e:
        raise UsageError(f"config.analysis.occlusion: {e}") from None
    split = base.analysis_split(config)
    inputs.check_split(config.data, split)
    return Settings(
        layer=str(cfg.layer),
        size=float(cfg.size),
        stride=float(cfg.stride),
        split=split,
        num_images=base.integer(config, MODE),
        batch_size=int(config.analysis.batch_size),
        pixels=preprocess.pixels(config.data),
        class_names=tuple(base.class_names(config)),
        classes=base.class_ids(config, "analysis.occlusion.classes", tuple(cfg.classes)),
    )


def resolve(s: Settings, model, source) -> Settings:
    """The layer ('' = the model's last conv layer) checked against the model; whether the
    labels are the model's classes (else the predicted class is explained, with class
    names 'class <i>' for the model's outputs).

    Raises:
      UsageError: the layer is not a conv layer of the model (naming them), the deconvnet
        cannot project it, or the model is not a classifier.
    """
    try:
        num_classes = graph.num_outputs(model)
        layer = s.layer or graph.last_conv(model)
    except ValueError as e:
        raise UsageError(f"--mode=occlusion: {e}") from None
    base.check_layer(layer, graph.conv_layers(model), "config.analysis.occlusion.layer=")
    try:
        deconv.projection_form(model, layer)  # (c): a fused activation the rules cannot reach
    except NotImplementedError as e:
        raise UsageError(f"config.analysis.occlusion.layer={layer}: {e}") from None
    labels = source is None or source.labels_apply(s.split)
    names = s.class_names if labels else tuple(f"class {i}" for i in range(num_classes))
    return dataclasses.replace(s, layer=layer, labels=labels, class_names=names)


@dataclasses.dataclass
class Data:
    """The examples to occlude and the split's batches for column (c)'s scan."""

    examples: examples_lib.Examples
    dataset: object  # callable -> tf.data.Dataset of (images, labels) center crops
    total: int  # images in the split


def load(config, s: Settings, model) -> Data:
    examples = base.load_examples(config, s.split, s.num_images, s.classes)
    return Data(
        examples=examples,
        dataset=lambda: inputs.build_inputs(config, s.split, mode="center"),
        total=inputs.check_split(config.data, s.split),
    )


def compute(model, data: Data, s: Settings) -> dict:
    """`analyse` with progress bars; adds 'summary' (the occlusion.json dict)."""
    with (
        tqdm.tqdm(total=data.total, desc=f"scan {s.layer} on {s.split}", unit="img") as scan_bar,
        tqdm.tqdm(total=len(data.examples), desc="occlusion", unit="img") as bar,
    ):
        arrays = analyse(
            model,
            data.examples,
            s.layer,
            s.size,
            s.stride,
            s.batch_size,
            dataset=data.dataset,
            progress=bar.update,
            scan_progress=scan_bar.update,
            fill=s.pixels.fill,
            predicted=not s.labels,
        )
    summary = summarize(arrays, s.layer, s.split, s.class_names, s.target)
    if not s.labels:
        summary["note"] = PREDICTED_NOTE.format(split=s.split)
    return {"arrays": arrays, "summary": summary}


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """occlusion.npz, occlusion.json, occlusion.png; the figure for TensorBoard."""
    arrays, summary = result["arrays"], result["summary"]
    outputs.save_npz(paths["occlusion.npz"], **arrays)
    outputs.save_text(paths["occlusion.json"], json.dumps(summary, indent=1))
    figure = render(arrays, paths["occlusion.png"], s.pixels, list(s.class_names), target=s.target)
    lines = [] if s.labels else [f"Note: {summary['note']}"]
    if summary["on_object"]:
        r = summary["on_object"]
        which = "correct" if s.labels else "predicted"
        lines.append(
            f"Lowest {which}-class probability with the occluder on the object: "
            f"{r['hits']}/{r['num_images']} images = {r['fraction']:.3f} "
            f"(chance {r['chance']:.3f}); touching the object: "
            f"{r['touching']['fraction']:.3f} (chance {r['touching']['chance']:.3f})"
        )
    return base.Report(images={f"{MODE}/{s.layer}": figure}, lines=lines, summary=summary)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
    resolve=resolve,
)
