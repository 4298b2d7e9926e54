"""The Python API: look inside an in-memory Keras convnet, from a notebook.

Every function takes a `keras.Model` (Sequential or functional, channels-last, square RGB
input: ZFNet, a `keras.applications` network, your own) and numpy images already
preprocessed for it (N, H, W, 3), and returns numpy arrays; nothing is written. Bad input
raises `zf_tf.UsageError` (a ValueError) with the one line the command line prints.

    >>> import keras, numpy as np, zf_tf
    >>> model = keras.Sequential([
    ...     keras.Input((32, 32, 3)),
    ...     keras.layers.Conv2D(8, 5, activation="relu", name="c1"),
    ...     keras.layers.MaxPooling2D(2, name="p1"),
    ...     keras.layers.Conv2D(16, 3, activation="relu", name="c2"),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(10, name="logits"),
    ... ])
    >>> images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    >>> out = zf_tf.projections(model, images, "c2", units=[0, 3])
    >>> out["projection"].shape            # (images, units, H, W, 3)
    (4, 2, 32, 32, 3)
    >>> best = zf_tf.top_k(model, images, ["c1", "c2"], k=2)
    >>> best["c2"].image.shape             # (k, units): which image, per unit
    (2, 16)
    >>> zf_tf.attribution(model, images, [1, 2, 3, 4], "gradcam").shape
    (4, 32, 32)
    >>> zf_tf.occlusion(model, images[:1], [3], size=0.25, stride=0.125).shape
    (1, 32, 32)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from configs import default
from zf_tf.analyses import attribution as attribution_lib
from zf_tf.analyses import sources
from zf_tf.core import deconv, graph, topk
from zf_tf.core.errors import UsageError

METHODS = attribution_lib.METHODS
# SmoothGrad's samples and noise, the occluder, batch sizes: the command line's defaults.
_SETTINGS = attribution_lib.map_settings(default.get_config())


def _images(model, images) -> np.ndarray:
    """Checks the model (channels-last, square RGB) and the images against it."""
    shape = graph.input_shape(model)
    sources.check_layout(model, shape, f"model {model.name!r}")
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or (None not in shape[:2] and images.shape[1:] != tuple(shape)):
        raise UsageError(
            f"images must be (N, {shape[0]}, {shape[1]}, 3) model inputs for {model.name!r}; "
            f"got {images.shape}"
        )
    return images


def _layer(model, layer: str, valid: list[str], what: str) -> str:
    if layer not in valid:
        raise UsageError(f"layer {layer!r} is not valid {what}: choose one of {', '.join(valid)}")
    return layer


def projections(model, images, layer: str, units=None, batch_size: int = 64) -> dict:
    """Deconvnet projections (Zeiler & Fergus Fig. 2) of chosen units of every image: each
    unit's strongest activation in the image, taken down to pixel space.

    Args:
      model: the convnet.
      images: (N, H, W, 3) model inputs.
      layer: a conv, pool or activation layer of the model.
      units: its feature maps to project (default: all).
      batch_size: projections per call.

    Returns:
      dict: 'projection' (N, U, H, W, 3) float32; 'activation', 'y', 'x' (N, U) where each
      unit is strongest; 'units' (U,); 'form' ('explicit' deconvnet Model, or the 'rule'
      form through DAGs); 'way_down' (what the rule did at each activation below, as
      `deconv.way_down`).
    """
    images = _images(model, images)
    _layer(model, layer, deconv.valid_layers(model), "for a projection")
    num_maps = int(graph.find(model, layer).output.shape[-1])
    units = list(range(num_maps)) if units is None else [int(u) for u in units]
    if not units or min(units) < 0 or max(units) >= num_maps:
        raise UsageError(f"units must be in 0..{num_maps - 1} (layer {layer!r}); got {units}")
    try:
        deconvnet = deconv.build_deconvnet(model, layer)
    except NotImplementedError as e:
        raise UsageError(f"layer {layer!r}: {e}") from None
    n, u = len(images), len(units)
    out = deconv.project(
        deconvnet,
        images,
        np.repeat(np.arange(n), u).astype(np.int32),
        np.tile(units, n).astype(np.int32),
        batch_size=batch_size,
    )
    return {
        "projection": out["projection"].reshape(n, u, *images.shape[1:]),
        **{key: out[key].reshape(n, u) for key in ("activation", "y", "x")},
        "units": np.asarray(units),
        "form": deconv.projection_form(model, layer)[0],
        "way_down": deconv.way_down(model, layer),
    }


def top_k(model, images, layers, k: int = 9, batch_size: int = 32) -> dict:
    """The k images (of `images`, or of a tf.data.Dataset of image batches) that excite each
    unit of each layer most, in one pass: {layer: TopK} with (k, units) arrays `activation`,
    `image` (index in the images), `y`, `x` (where, in the layer's maps)."""
    layers = [layers] if isinstance(layers, str) else list(layers)
    valid = graph.spatial_layers(model)
    for layer in layers:
        _layer(model, layer, valid, "for a scan")
    if isinstance(images, (np.ndarray, list, tuple)):
        import tensorflow as tf

        images = _images(model, images)
        if k > len(images):
            raise UsageError(f"k={k} exceeds the {len(images)} images")
        images = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return topk.scan_layers(model, layers, images, k=k)


def attribution(model, images, classes, method: str = "gradcam", layer: str = "", seed=0):
    """Attribution maps (N, H, W) float32 of the logit of `classes` (N,) for each image, by
    `method` (one of METHODS: the deconvnet and guided backprop by their backward rules,
    saliency, SmoothGrad, Grad-CAM, Grad-CAM++, Score-CAM, occlusion). `layer`: the CAM
    methods' conv layer ('' = the last)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}: valid methods: {', '.join(METHODS)}")
    images = _images(model, images)
    classes = _classes(model, classes, len(images))
    if layer:
        _layer(model, layer, graph.conv_layers(model), "for a CAM")
    settings = dataclasses.replace(_SETTINGS, cam_layer=layer, occluder_fill=(0.0, 0.0, 0.0))
    return attribution_lib.method_maps(model, images, classes, method, settings, seed)


def occlusion(
    model,
    images,
    classes,
    size: float = _SETTINGS.occluder_size,
    stride: float = _SETTINGS.occluder_stride,
    fill=0.0,
):
    """Zeiler & Fergus Fig. 7 as maps: how much the probability of `classes` (N,) drops
    while a square of side `size` (a fraction of the image side, moved by `stride`) filled
    with `fill` (the model input of a gray pixel: 0 for mean-subtracted inputs) covers each
    place; (N, H, W) float32, p(image) - p(occluded), each pixel the mean over the squares
    covering it. The mode's full analysis (strongest feature maps too): --mode=occlusion."""
    if not (0 < size <= 1 and 0 < stride <= 1):
        raise UsageError(
            f"size and stride are fractions of the image side in (0, 1]; got {size}, {stride}"
        )
    images = _images(model, images)
    classes = _classes(model, classes, len(images))
    return attribution_lib.occlusion_maps(model, images, classes, size, stride, fill=fill)


def _classes(model, classes, n: int) -> np.ndarray:
    classes = np.asarray(classes, np.int64).reshape(-1)
    num = graph.num_outputs(model)
    if len(classes) != n or classes.min(initial=0) < 0 or classes.max(initial=0) >= num:
        raise UsageError(f"classes must be {n} class ids in 0..{num - 1}; got {classes.tolist()}")
    return classes


__all__ = ["METHODS", "attribution", "occlusion", "projections", "top_k"]
