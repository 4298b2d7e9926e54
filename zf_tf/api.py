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
    >>> checks = zf_tf.sanity(model, images, [1, 2, 3, 4], methods=["saliency"], steps=4)
    >>> len(checks["similarity"]["cascade"]["saliency"])  # one per randomized layer
    3
    >>> import tempfile
    >>> site = zf_tf.atlas(model, images, tempfile.mkdtemp(), k=2, preprocessing="tf")
    >>> site["units"]                      # c1's 8 units and c2's 16
    24
    >>> pictures = zf_tf.featvis(model, "c2", units=[0, 1], steps=8, preprocessing="tf")
    >>> pictures["image"].shape            # (units, H, W, 3) RGB in [0, 1]
    (2, 32, 32, 3)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from zf_tf.analyses import atlas as atlas_lib
from zf_tf.analyses import atlas_site, base, sources
from zf_tf.analyses import attribution as attribution_lib
from zf_tf.analyses import sanity as sanity_lib
from zf_tf.configs import default
from zf_tf.core import deconv, graph, rules, topk
from zf_tf.core import featvis as featvis_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples as examples_lib
from zf_tf.pipelines import preprocess

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
    return base.check_layer(layer, valid, "layer ", problem=f"is not valid {what}")


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
      `rules.way_down`).
    """
    images = _images(model, images)
    _layer(model, layer, deconv.valid_layers(model), "for a projection")
    num_maps = int(graph.find(model, layer).output.shape[-1])
    units = _units(units, num_maps, layer)
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
        "way_down": rules.way_down(model, layer),
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


def sanity(
    model,
    images,
    classes,
    methods=METHODS,
    projection_layer: str = "",
    projection_units: int = 8,
    steps: int = 20,
    fill=0.0,
    seed: int = 0,
) -> dict:
    """The sanity checks of --mode=sanity on these images: how much each method's maps of
    `classes` (N,) change when the model's weights are re-drawn from the top layer down
    (cascade) and one layer at a time (independent), and when another class is explained
    (Adebayo et al. 2018); the deconvnet projections of the `projection_units` most active
    units of `projection_layer` ('' = the last conv) through the same cascade; and each
    method's deletion and insertion curves in `steps` steps, pixels replaced by `fill` (the
    model input of a gray pixel). The model itself is not changed (a copy is randomized).

    Returns:
      dict: 'layers' (the weight layers, from the output down); 'similarity' {'cascade',
      'independent': {method: [per step {'spearman', 'spearman_abs', 'ssim', 'hog'}]},
      'class': {method: {...}}}, with 'projection' among the methods when units are
      projected; 'faithfulness' {method or 'random': {'deletion', 'insertion': (N, steps +
      1) class probabilities}}; 'original' {method: (N, H, W) maps}; 'others' (N,): the
      other class each image's maps were compared with.
    """
    images = _images(model, images)
    classes = _classes(model, classes, len(images))
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(
            f"methods: {bad[0] if bad else 'none'!r} is not a method: choose from "
            f"{', '.join(METHODS)}"
        )
    if len(images) < 2:
        raise UsageError(f"the sanity checks need at least 2 images; got {len(images)}")
    if not isinstance(steps, int) or steps < 2:
        raise UsageError(f"steps={steps!r}: give an integer of at least 2")
    if not isinstance(projection_units, int) or projection_units < 0:
        raise UsageError(f"projection_units={projection_units!r}: give 0 or more")
    fill = tuple(float(v) for v in np.broadcast_to(np.asarray(fill, np.float32), (3,)))
    s = sanity_lib.Settings(
        methods=methods,
        split="images",
        num_images=len(images),
        maps=dataclasses.replace(_SETTINGS, cam_layer="", occluder_fill=fill),
        seed=int(seed),
        pixels=None,
        num_classes=0,
        steps=steps,
        projection_layer=projection_layer,
        projection_units=projection_units,
    )
    s = sanity_lib.resolve(s, model, None)
    data = sanity_lib.Data(examples_lib.Examples(images, classes, np.arange(len(images))))
    result = sanity_lib.compute(model, data, s)
    keys = ("layers", "similarity", "faithfulness", "original", "others")
    return {key: result[key] for key in keys}


def atlas(
    model,
    images,
    folder: str,
    labels=None,
    class_names=(),
    layers=None,
    k: int = 9,
    preprocessing: str = "raw",
    mean=(0.0, 0.0, 0.0),
    batch_size: int = 32,
) -> dict:
    """Writes the atlas of --mode=atlas for these images into `folder`: an offline web site
    (folder/index.html) with a page per layer and per unit: each unit's top-k images, their
    deconvnet projections beside the input patches. Scans and projections are cached in
    folder/cache: a second call with the same model and images (another layer added, or
    after a kill) computes only what is missing; the site is replaced atomically.

    Args:
      model: the convnet.
      images: (N, H, W, 3) model inputs.
      folder: where the site goes (created).
      labels: (N,) class ids of the images (shown under each patch), or None.
      class_names: names of those ids.
      layers: conv, pool or activation layers (default: every conv layer).
      k: images kept per unit.
      preprocessing: how the images were made from 0..255 RGB pixels, for showing them:
        one of zfnet (minus `mean`), caffe, tf, torch, raw (keras.applications' modes).
      mean: the RGB mean subtracted by 'zfnet'.
      batch_size: images per forward pass.

    Returns:
      dict: what folder/atlas.json records: 'units', 'files', 'bytes', the largest page.
    """
    images = _images(model, images)
    n = len(images)
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    if labels.shape != (n,):
        raise UsageError(f"labels must be {n} class ids; got shape {labels.shape}")
    if not 1 <= k <= n:
        raise UsageError(f"k={k}: give 1 to {n} (the number of images)")
    pixels = _pixels(preprocessing, mean)
    digest = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    digest.update(labels.tobytes())
    layers = () if layers is None else (layers,) if isinstance(layers, str) else tuple(layers)
    s = atlas_lib.Settings(
        layers=layers,
        split="images",
        top_k=int(k),
        num_images=n,
        pixels=pixels,
        crop_size=int(images.shape[1]),
        resize_size=int(images.shape[1]),
        cache_dir=os.path.join(folder, "cache"),
        data={"source": "arrays", "name": digest.hexdigest()[:12], "preprocessing": pixels.kind},
        description=f"Keras model {model.name!r}",
    )
    s = atlas_lib.resolve(s, model, None)

    def dataset(context=None):
        import tensorflow as tf

        slices = (images, labels, np.arange(n, dtype=np.int64))
        return tf.data.Dataset.from_tensor_slices(slices).batch(batch_size)

    data = atlas_lib.Data(dataset=dataset, class_names=list(class_names))
    result = atlas_lib.compute(model, data, s)
    os.makedirs(folder, exist_ok=True)
    return atlas_site.write(folder, result, s)


def featvis(
    model,
    layer: str,
    units=None,
    steps: int = 256,
    objective: str = "channel",
    negative: bool = False,
    seed: int = 0,
    preprocessing: str = "raw",
    mean=(0.0, 0.0, 0.0),
    color_images=None,
    batch_size: int = 32,
    strategy=None,
) -> dict:
    """Each unit's own picture, as --mode=featvis makes it: an image optimized for `steps`
    Adam steps to maximize the unit's `objective` ('channel': the mean of its map;
    'neuron': the centre of its map), or to minimize it with `negative`; 1/f Fourier
    basis, decorrelated colour, random jitter, scale and rotation at each step (Lucid's
    recipe); `batch_size` units at a time, each from its own seed (seed, unit).

    Args:
      model: the convnet.
      layer: a layer with (N, h, w, F) or (N, F) outputs.
      units: its units (default: all).
      preprocessing, mean: how the model's inputs are made from 0..255 RGB pixels (as in
        `atlas`): the optimized RGB image goes through it.
      color_images: RGB images in [0, 1] (N, H, W, 3) whose colour covariance decorrelates
        the colour (the model's training images); None: ImageNet's.
      strategy: a tf.distribute strategy (the model made in its scope) whose replicas
        share each batch's units; the images are the same as without it.

    Returns:
      dict: 'image' (U, S, S, 3) float32 RGB in [0, 1]; 'value' and 'start' (U,): the
      unit's objective on its image and on the random start; 'units' (U,).
    """
    if objective not in featvis_lib.OBJECTIVES:
        raise UsageError(
            f"objective={objective!r}: choose one of {', '.join(featvis_lib.OBJECTIVES)}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps!r}: give an integer of at least 1")
    size = graph.input_shape(model)
    sources.check_layout(model, size, f"model {model.name!r}")
    if None in size[:2]:
        raise UsageError(
            f"model {model.name!r} takes any image size: give it one, e.g. build it on "
            "keras.Input((224, 224, 3))"
        )
    valid = featvis_lib.valid_layers(model)
    shape = graph.find(model, _layer(model, layer, valid, "for a picture")).output.shape
    if objective == "neuron" and len(shape) != 4:
        raise UsageError(f"layer {layer!r}: the neuron objective needs spatial maps")
    units = _units(units, int(shape[-1]), layer)
    pixels = _pixels(preprocessing, mean)
    color = None
    if color_images is not None:
        color = featvis_lib.color_sqrt(featvis_lib.color_covariance(color_images))
    params = featvis_lib.Params(
        steps=steps, objective=objective, negative=bool(negative), seed=int(seed)
    )
    to_input = lambda x: pixels.normalize(x * 255.0)  # noqa: E731
    optimizer = featvis_lib.Optimizer(model, layer, to_input, params, color)
    parts = [
        optimizer.run(units[i : i + batch_size], strategy=strategy)
        for i in range(0, len(units), batch_size)
    ]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "value", "start")}
    return {**out, "units": np.asarray(units)}


def _units(units, num_maps: int, layer: str) -> list[int]:
    """The chosen units of a layer with `num_maps` maps (None: all), checked."""
    units = list(range(num_maps)) if units is None else [int(u) for u in units]
    if not units or min(units) < 0 or max(units) >= num_maps:
        raise UsageError(f"units must be in 0..{num_maps - 1} (layer {layer!r}); got {units}")
    return units


def _pixels(preprocessing: str, mean) -> preprocess.Pixels:
    """How the model's inputs were made from 0..255 RGB pixels, checked."""
    try:
        return preprocess.Pixels(str(preprocessing), tuple(mean))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _classes(model, classes, n: int) -> np.ndarray:
    classes = np.asarray(classes, np.int64).reshape(-1)
    num = graph.num_outputs(model)
    if len(classes) != n or classes.min(initial=0) < 0 or classes.max(initial=0) >= num:
        raise UsageError(f"classes must be {n} class ids in 0..{num - 1}; got {classes.tolist()}")
    return classes
