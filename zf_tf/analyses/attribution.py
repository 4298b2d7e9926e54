"""`--mode=attribution`: the deconvnet next to later attribution methods, and a pointing game.

Zeiler & Fergus explain a class decision with two tools: deconvnet projections (Sec. 2.1) and
occlusion (Sec. 4.2, Fig. 7). Later work added many more. This mode computes, for the same
images and the same class (the true class by default, `config.analysis.attribution.target`
= 'true' | 'predicted'; always the predicted class where the labels are not classes of the
model: a model brought along with --model, or unlabeled images), one (s, s) map per method:

  deconvnet        d logit_c / d image where every ReLU back-propagates ReLU(upstream) and
                   contrast normalization back-propagates as the identity (the deconvnet's
                   way down, `rules.rule_forward`), run through the dense layers too
  guided_backprop  d logit_c / d image where every ReLU back-propagates
                   upstream * (forward input > 0) * (upstream > 0) (Springenberg et al.)
  saliency         |d logit_c / d image| (Simonyan et al.; tf-keras-vis Saliency)
  smoothgrad       saliency averaged over noisy copies (Smilkov et al.; tf-keras-vis)
  gradcam          Grad-CAM on the CAM layer (Selvaraju et al.; tf-keras-vis)
  gradcam++        Grad-CAM++ on the CAM layer (Chattopadhyay et al.; tf-keras-vis)
  scorecam         Score-CAM on the CAM layer: one forward pass per map (Wang et al.)
  occlusion        p_c(image) - p_c(occluded image) under a sliding gray square (Fig. 7 (d)),
                   each pixel the mean over the squares covering it (`analyses.occlusion`)

Gradient maps (deconvnet, guided, saliency, smoothgrad) are reduced over RGB by the maximum
absolute value per pixel, as tf-keras-vis does for saliency. The classifier's output already
is logits, so the gradient methods differentiate the class logit (no softmax to remove);
Score-CAM weighs its masked inputs by the softmax probability, as the library does. The CAM
layer is `config.analysis.attribution.cam_layer`, by default the model's last conv layer
(ZFNet's conv5).
All maps are raw (not min-max normalized); the figure scales each map for display.

Pointing game (Zhang et al. 2016, strict: no tolerance margin) on annotated data (the
embedded dataset's boxes): a method's point is its map's maximum (argmax pixel, the first in
row-major order on ties); a hit when the point lies inside the object's box. Baselines:
chance = the mean box area fraction (the hit rate of a uniformly random point) and the
crop's center pixel (s // 2, s // 2) as the point.

Outputs in `WORKDIR/attribution/`: attribution.npz (maps of the shown images), attribution.png
(rows images, columns methods, heat maps over the faded image, the point marked),
pointing_game.md / pointing_game.json (annotated data only), and a TensorBoard image in
`WORKDIR/logs/attribution`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf
import tqdm

from zf_tf import outputs
from zf_tf.analyses import base, occlusion
from zf_tf.core import graph, rules
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples as examples_lib
from zf_tf.pipelines import inputs, preprocess

MODE = "attribution"
METHODS = (
    "deconvnet",
    "guided_backprop",
    "saliency",
    "smoothgrad",
    "gradcam",
    "gradcam++",
    "scorecam",
    "occlusion",
)
TITLES = {
    "deconvnet": "deconvnet",
    "guided_backprop": "guided backprop",
    "saliency": "saliency",
    "smoothgrad": "SmoothGrad",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "occlusion": "occlusion",
}
CAM_METHODS = ("gradcam", "gradcam++", "scorecam")
TARGETS = ("true", "predicted")
OUTPUTS = ("attribution.npz", "attribution.png", "pointing_game.md", "pointing_game.json")
IMAGES_PER_BATCH = 16  # images per call of each method (the pointing game runs many)
TOLERANCE_AT_224 = 15  # the pointing game's tolerance (Zhang et al. 2016), px at 224
SCORECAM_BYTES = 256 << 20  # Score-CAM holds (maps x images) masked copies at once
POINTING_DEFINITION = (
    "a hit when the map's maximum (argmax pixel, first in row-major order on ties) lies inside "
    "the object's bounding box; with tolerance: at most 15 px (at 224 px, scaled to the crop) "
    "from the box, Zhang et al. 2016; chance = mean fraction of the crop counted as a hit; "
    "center = the crop's center pixel (s // 2, s // 2) as the point"
)


# ---------------------------------------------------------------------------------------------
# Maps (arrays only)
# ---------------------------------------------------------------------------------------------


def max_abs_channels(grads) -> np.ndarray:
    """(N, H, W, C) gradients -> (N, H, W) max over channels of |g| (tf-keras-vis' reduction)."""
    return np.max(np.abs(np.asarray(grads, np.float32)), axis=-1)


_RULE_FNS = weakref.WeakKeyDictionary()


def rule_gradients(model: keras.Model, inputs, classes, rule: str) -> np.ndarray:
    """d logits[n, classes[n]] / d inputs[n] through the model under a ReLU backward rule.

    Args:
      model: the classifier (logits output), or any model `rules.rule_forward` can run.
      inputs: (N, ...) float array of model inputs.
      classes: (N,) the class whose logit each input explains.
      rule: 'deconvnet', 'guided' or 'gradient' (`rules.BACKWARD_RULES`).

    Returns:
      float32 array of the shape of `inputs`.
    """
    per_model = _RULE_FNS.setdefault(model, {})
    fn = per_model.get(rule)
    if fn is None:
        shape = tuple(model.inputs[0].shape[1:])
        top = graph.output_layer(model)
        # Weakly: the function is a value of the model's weak key (a strong reference from
        # it would keep the model alive for ever).
        net = weakref.ref(model)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, *shape], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ]
        )
        def fn(x, c):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = rules.rule_forward(net(), x, top, rule)
                score = tf.gather(logits, c, axis=1, batch_dims=1)
            return tf.cast(tape.gradient(score, x), tf.float32)

        per_model[rule] = fn
    inputs = np.asarray(inputs, np.float32)
    classes = np.asarray(classes, np.int32).reshape(-1)
    return fn(tf.constant(inputs), tf.constant(classes)).numpy()


@contextlib.contextmanager
def _quiet_library():
    """tf-keras-vis passes the input as a list, which Keras 3 warns about on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*structure of `inputs`")
        yield


_QUIET_MODELS = weakref.WeakKeyDictionary()


def _quiet_predict(model: keras.Model) -> keras.Model:
    """The same network (shared layers and weights) whose `predict` is silent.

    Score-CAM calls `model.predict` without `verbose`, i.e. a progress bar (or a log line per
    step) for every image batch. Kept per model so Keras traces its predict step once.
    """
    quiet = _QUIET_MODELS.get(model)
    if quiet is None:
        quiet = keras.Model(model.inputs, model.outputs, name=f"{model.name}_quiet")
        quiet.predict = functools.partial(quiet.predict, verbose=0)
        _QUIET_MODELS[model] = quiet
    return quiet


@contextlib.contextmanager
def _numpy_seed(seed: int):
    """tf-keras-vis draws SmoothGrad's noise from numpy's global generator: seed it for
    reproducible maps and restore the caller's state afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def saliency_maps(
    model: keras.Model,
    images,
    classes,
    smooth_samples: int = 0,
    smooth_noise: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """Saliency (smooth_samples = 0) or SmoothGrad maps with tf-keras-vis.

    max over channels of |d logit_c / d image|; SmoothGrad averages |gradient| over
    `smooth_samples` copies with Gaussian noise of std smooth_noise * (max - min) of each image.

    Returns:
      float32 (N, H, W), not normalized.
    """
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.scores import CategoricalScore

    score = CategoricalScore([int(c) for c in classes])
    with _quiet_library(), _numpy_seed(seed):
        maps = Saliency(model, clone=False)(
            score,
            np.asarray(images, np.float32),
            smooth_samples=int(smooth_samples),
            smooth_noise=float(smooth_noise),
            normalize_map=False,
        )
    return np.asarray(maps, np.float32)


_CAM_MODELS = weakref.WeakKeyDictionary()
CAM_MARK = "cam_layer_output"  # the marker layer of `cam_model`


def cam_model(model: keras.Model, layer: str) -> keras.Model:
    """The same network (shared layers and weights) with an identity layer CAM_MARK right
    after `layer`'s output, for tf-keras-vis: the library taps `model.get_layer(...).output`,
    which is not in the graph of a nested model or of one rebuilt on a fixed input size
    (`graph.fixed_input`); the marker's output always is. Kept per model and layer."""
    per_model = _CAM_MODELS.setdefault(model, {})
    found = per_model.get(layer)
    if found is None:
        mark = keras.layers.Identity(name=CAM_MARK)
        marked = []

        def call(lay, *args, **kwargs):
            out = lay(*args, **kwargs)
            if lay.name == layer and not marked:
                marked.append(lay)
                out = mark(out)
            return out

        x = keras.Input(tuple(model.inputs[0].shape[1:]), name="images")
        out, _ = graph.trace(model, x, call)
        if not marked:
            graph.find(model, layer)  # raises, naming the valid layers
        found = per_model[layer] = keras.Model(x, out, name=f"{model.name}_cam")
    return found


def cam_maps(
    model: keras.Model, images, classes, method: str, layer: str = "", batch_size: int = 128
) -> np.ndarray:
    """Grad-CAM, Grad-CAM++ or Score-CAM maps on conv layer `layer` ('' = the model's last
    conv layer) with tf-keras-vis.

    The CAM (ReLU of the weighted sum of `layer`'s maps) is upsampled to the image size by the
    library (linear spline zoom). Score-CAM runs `batch_size` masked images per forward pass.

    Returns:
      float32 (N, H, W), not normalized.
    """
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore

    marked = cam_model(model, layer or graph.last_conv(model))
    images = np.asarray(images, np.float32)
    score = CategoricalScore([int(c) for c in classes])
    where = dict(penultimate_layer=CAM_MARK, seek_penultimate_conv_layer=False)
    with _quiet_library():
        if method == "scorecam":
            maps = Scorecam(_quiet_predict(marked), clone=False)(
                score, images, batch_size=batch_size, normalize_cam=False, **where
            )
        else:
            cls = {"gradcam": Gradcam, "gradcam++": GradcamPlusPlus}[method]
            maps = cls(marked, clone=False)(score, images, normalize_cam=False, **where)
    return np.asarray(maps, np.float32)


_PROB_FNS = weakref.WeakKeyDictionary()


def probabilities_fn(model: keras.Model):
    """x (B, H, W, 3) -> softmax probabilities (B, C) as numpy; one trace per model."""
    fn = _PROB_FNS.get(model)
    if fn is None:
        shape = tuple(model.inputs[0].shape[1:])
        net = weakref.ref(model)  # weakly, as in `rule_gradients`

        @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.float32)])
        def fn(x):
            return tf.nn.softmax(tf.cast(net()(x, training=False), tf.float32))

        _PROB_FNS[model] = fn
    return lambda x: fn(tf.convert_to_tensor(x, tf.float32)).numpy()


def occlusion_maps(
    model: keras.Model,
    images,
    classes,
    size: float,
    stride: float,
    batch_size: int = 128,
    fill=0.0,
) -> np.ndarray:
    """The drop in class probability under a sliding gray square, as pixel maps.

    Args:
      model, images, classes: as for the other methods.
      size, stride: the square's side and step as fractions of the crop side
        (`config.analysis.occlusion`).
      batch_size: occluded copies per forward pass.
      fill: the square's model-input value, the mean colour (`preprocess.Pixels.fill`; 0
        with the paper's mean subtraction).

    Returns:
      float32 (N, H, W): p_c(image) - p_c(occluded), each pixel the mean over the squares
      that cover it (`occlusion.pixel_map`).
    """
    images = np.asarray(images, np.float32)
    crop = images.shape[1]
    size_px, stride_px, ys, xs = occlusion.occluder_grid(crop, size, stride)
    probs = probabilities_fn(model)
    clean = probs(tf.constant(images)) if len(images) else np.zeros((0, 1))
    out = np.zeros(images.shape[:3], np.float32)
    for n, (image, c) in enumerate(zip(images, classes)):
        c = int(c)
        occluded = occlusion.occluded_outputs(
            lambda x, c=c: probs(x)[:, c],
            image,
            size_px,
            stride_px,
            batch_size,
            ys=ys,
            xs=xs,
            fill=fill,
        )
        out[n] = occlusion.pixel_map(clean[n, c] - occluded, ys, xs, size_px, crop)
    return out


@dataclasses.dataclass(frozen=True)
class MapSettings:
    """What the methods' maps depend on besides the model, images and classes."""

    smoothgrad_samples: int  # noisy copies per SmoothGrad map
    smoothgrad_noise: float  # their noise std, fraction of each image's (max - min)
    cam_layer: str  # Grad-CAM, Grad-CAM++, Score-CAM; '' = the model's last conv layer
    occluder_size: float  # occlusion: the square's side, fraction of the crop side
    occluder_stride: float  # its step, fraction of the crop side
    batch_size: int  # occluded copies / Score-CAM masked images per forward pass
    occluder_fill: tuple = (0.0, 0.0, 0.0)  # occlusion: the square's model input (Pixels.fill)


def map_settings(config) -> MapSettings:
    """MapSettings from `config.analysis` (attribution, occlusion.size/stride, batch_size) and
    `config.data` (the occluder's colour: the data mean, normalized)."""
    a = config.analysis
    return MapSettings(
        smoothgrad_samples=int(a.attribution.smoothgrad_samples),
        smoothgrad_noise=float(a.attribution.smoothgrad_noise),
        cam_layer=str(a.attribution.cam_layer),
        occluder_size=float(a.occlusion.size),
        occluder_stride=float(a.occlusion.stride),
        batch_size=int(a.batch_size),
        occluder_fill=tuple(preprocess.pixels(config.data).fill.tolist()),
    )


def method_maps(
    model: keras.Model, images, classes, method: str, settings: MapSettings, seed: int = 0
) -> np.ndarray:
    """One method's maps (N, H, W) for images and the classes they explain.

    Args:
      model: the classifier (logits output).
      images: (N, s, s, 3) model inputs.
      classes: (N,) the class each image's map explains.
      method: one of METHODS.
      settings: MapSettings (`map_settings(config)`).
      seed: SmoothGrad's noise seed.

    Returns:
      float32 (N, s, s).
    """
    if method == "deconvnet":
        return max_abs_channels(rule_gradients(model, images, classes, "deconvnet"))
    if method == "guided_backprop":
        return max_abs_channels(rule_gradients(model, images, classes, "guided"))
    if method == "saliency":
        return saliency_maps(model, images, classes)
    if method == "smoothgrad":
        return saliency_maps(
            model, images, classes, settings.smoothgrad_samples, settings.smoothgrad_noise, seed
        )
    if method in ("gradcam", "gradcam++"):
        return cam_maps(model, images, classes, method, settings.cam_layer)
    if method == "scorecam":
        # Score-CAM keeps (maps x images) masked copies in memory: bound that per call.
        layer = settings.cam_layer or graph.last_conv(model)
        maps = int(graph.find(model, layer).output.shape[-1])
        per_call = max(1, SCORECAM_BYTES // max(1, maps * np.asarray(images[:1]).nbytes))
        parts = [
            cam_maps(
                model,
                images[i : i + per_call],
                classes[i : i + per_call],
                method,
                settings.cam_layer,
                settings.batch_size,
            )
            for i in range(0, len(images), per_call)
        ]
        return np.concatenate(parts) if parts else np.zeros(np.shape(images)[:3], np.float32)
    if method == "occlusion":
        return occlusion_maps(
            model,
            images,
            classes,
            settings.occluder_size,
            settings.occluder_stride,
            settings.batch_size,
            settings.occluder_fill,
        )
    raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")


def attribution_maps(
    model: keras.Model,
    images,
    classes,
    methods,
    settings: MapSettings,
    seed: int = 0,
    progress=None,
) -> dict[str, np.ndarray]:
    """Every method's maps for the images, IMAGES_PER_BATCH images at a time.

    Args:
      model: the classifier (logits output).
      images: (N, s, s, 3) model inputs.
      classes: (N,) the class each image's maps explain.
      methods: names from METHODS.
      settings: MapSettings (`map_settings(config)`).
      seed: SmoothGrad's noise seed for the first batch; seed + b for batch b.
      progress: optional callable(number of images done in this step).

    Returns:
      {method: float32 (N, s, s)}.
    """
    images = np.asarray(images, np.float32)
    classes = np.asarray(classes, np.int64)
    parts = {m: [] for m in methods}
    for b, start in enumerate(range(0, len(images), IMAGES_PER_BATCH)):
        sl = slice(start, start + IMAGES_PER_BATCH)
        for m in methods:
            parts[m].append(method_maps(model, images[sl], classes[sl], m, settings, seed + b))
        if progress:
            progress(len(images[sl]))
    empty = np.zeros(images.shape[:3], np.float32)
    return {m: np.concatenate(p).astype(np.float32) if p else empty for m, p in parts.items()}


# ---------------------------------------------------------------------------------------------
# Pointing game
# ---------------------------------------------------------------------------------------------


def pointing_points(maps) -> np.ndarray:
    """(N, H, W) maps -> (N, 2) int (y, x) of each map's maximum (first in row-major order on
    ties; NaN counts as lowest)."""
    maps = np.asarray(maps, np.float64)
    flat = np.where(np.isnan(maps), -np.inf, maps).reshape(len(maps), -1)
    idx = np.argmax(flat, axis=1)
    return np.stack(np.unravel_index(idx, maps.shape[1:]), axis=1).astype(np.int32)


def in_box(points, boxes, tolerance: float = 0) -> np.ndarray:
    """(N,) bool: point (y, x) inside box (y0, x0, y1, x1), the ends exclusive, or at most
    `tolerance` px from it (Euclidean distance to the box's nearest pixel)."""
    points, boxes = np.asarray(points), np.asarray(boxes)
    y, x = points[:, 0], points[:, 1]
    dy = np.maximum.reduce([boxes[:, 0] - y, np.zeros_like(y), y - (boxes[:, 2] - 1)])
    dx = np.maximum.reduce([boxes[:, 1] - x, np.zeros_like(x), x - (boxes[:, 3] - 1)])
    return dy.astype(np.float64) ** 2 + dx.astype(np.float64) ** 2 <= float(tolerance) ** 2


def tolerance_px(crop_size: int) -> int:
    """The pointing game's tolerance (Zhang et al. 2016: 15 px at 224), scaled to the crop."""
    return int(round(TOLERANCE_AT_224 * crop_size / 224))


def chance_level(boxes, crop_size: int, tolerance: float = 0) -> float:
    """Mean fraction of the crop's pixels that count as hits (the box, and with a tolerance
    the pixels within it): the expected hit rate of a uniformly random pixel."""
    boxes = np.asarray(boxes)
    if not len(boxes):
        return float("nan")
    yy, xx = np.mgrid[:crop_size, :crop_size]
    points = np.stack([yy.ravel(), xx.ravel()], axis=1)
    hits = [in_box(points, np.repeat(b[None], len(points), 0), tolerance).mean() for b in boxes]
    return float(np.mean(hits))


def _score(hit) -> dict:
    n = len(hit)
    return {
        "hits": int(np.sum(hit)),
        "images": n,
        "score": float(np.mean(hit)) if n else float("nan"),
    }


def pointing_game(maps: dict, boxes, crop_size: int) -> dict:
    """Scores each method's maps, plus the chance and center baselines, strictly (inside the
    box) and with Zhang et al.'s tolerance (`tolerance_px`).

    Args:
      maps: {method: (N, s, s)}.
      boxes: (N, 4) int y0, x0, y1, x1 (exclusive) in crop pixels.
      crop_size: s.

    Returns:
      {'methods': {method: {'hits', 'images', 'score'}}, 'chance': {'score'},
       'center': {'hits', 'images', 'score', 'point'}, 'points': {method: (N, 2) int},
       'hit': {method: (N,) bool}, 'tolerant': {'tolerance_px', 'methods', 'center',
       'chance'} (the same scores with the tolerance)}.
    """
    boxes = np.asarray(boxes)
    tol = tolerance_px(crop_size)
    result = {"methods": {}, "points": {}, "hit": {}}
    tolerant = {"tolerance_px": tol, "methods": {}}
    for method, m in maps.items():
        points = pointing_points(m)
        hit = in_box(points, boxes)
        result["points"][method], result["hit"][method] = points, hit
        result["methods"][method] = _score(hit)
        tolerant["methods"][method] = _score(in_box(points, boxes, tol))
    center = np.full((len(boxes), 2), crop_size // 2, np.int32)
    result["center"] = {**_score(in_box(center, boxes)), "point": [crop_size // 2] * 2}
    result["chance"] = {"score": chance_level(boxes, crop_size)}
    tolerant["center"] = _score(in_box(center, boxes, tol))
    tolerant["chance"] = {"score": chance_level(boxes, crop_size, tol)}
    result["tolerant"] = tolerant
    return result


def pointing_table(game: dict) -> str:
    """The pointing game as a markdown table (method, hits, images, score; then the hits and
    score with the tolerance)."""
    tol = game["tolerant"]
    row = lambda name, r, t: [
        name,
        r["hits"],
        r["images"],
        f"{r['score']:.3f}",
        t["hits"],
        f"{t['score']:.3f}",
    ]
    rows = [row(TITLES.get(m, m), r, tol["methods"][m]) for m, r in game["methods"].items()]
    rows.append(row("center pixel (baseline)", game["center"], tol["center"]))
    n = game["center"]["images"]
    rows.append(
        [
            "chance (mean box area)",
            "-",
            n,
            f"{game['chance']['score']:.3f}",
            "-",
            f"{tol['chance']['score']:.3f}",
        ]
    )
    within = f"within {tol['tolerance_px']} px"
    header = ["method", "hits", "images", "score", f"hits {within}", f"score {within}"]
    return outputs.markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def display_scale(m) -> np.ndarray:
    """A map scaled to [0, 1] for display: divided by its 99.5th percentile, negatives (e.g.
    occlusion raising the probability) and NaN shown as 0."""
    m = np.nan_to_num(np.asarray(m, np.float64), nan=0.0)
    top = np.percentile(m, 99.5)
    if not top > 0:
        top = m.max() if m.max() > 0 else 1.0
    return np.clip(m / top, 0, 1)


def render(arrays: dict, methods, path: str, pixels, class_names=None, target: str = "true"):
    """Rows images, columns input + methods: heat maps over the faded image, each map's
    maximum marked (green: inside the box, white: outside; cyan without boxes). `pixels`
    (`preprocess.Pixels`) turns the model inputs back into RGB.

    Returns:
      The figure as a uint8 (H, W, 3) array.
    """
    plt = outputs.pyplot()
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    n, s = arrays["images"].shape[:2]
    cols = 1 + len(methods)
    fig, axes = plt.subplots(n, cols, figsize=(1.45 * cols, 1.55 * n + 0.5), squeeze=False)
    name = (lambda c: class_names[c]) if class_names else str
    boxes = arrays.get("boxes")
    for r in range(n):
        image = outputs.display(arrays["images"][r], pixels)
        faded = 0.35 + 0.4 * image.mean(-1)
        c = int(arrays["classes"][r])
        for j in range(cols):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.imshow(image, interpolation="nearest")
                label = f"{name(c)} p={arrays['probs'][r]:.2f}"
                ax.set_ylabel(label, fontsize=7)
            else:
                m = methods[j - 1]
                ax.imshow(faded, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                heat = display_scale(arrays[m][r])
                ax.imshow(heat, cmap="jet", alpha=0.55 * heat + 0.15, vmin=0, vmax=1)
                (y, x) = pointing_points(arrays[m][r : r + 1])[0]
                color = "cyan"
                if boxes is not None:
                    color = "lime" if in_box([[y, x]], boxes[r : r + 1])[0] else "white"
                ax.plot(
                    [x],
                    [y],
                    marker="+",
                    color=color,
                    markersize=9,
                    mew=2,
                    path_effects=[withStroke(linewidth=3.5, foreground="black")],
                )
            if boxes is not None:
                y0, x0, y1, x1 = boxes[r]
                ax.add_patch(
                    Rectangle(
                        (x0 - 0.5, y0 - 0.5),
                        x1 - x0,
                        y1 - y0,
                        fill=False,
                        edgecolor="yellow",
                        linewidth=0.8,
                        linestyle="--",
                    )
                )
            ax.set_xlim(-0.5, s - 0.5)
            ax.set_ylim(s - 0.5, -0.5)
            if r == 0:
                ax.set_title("input" if j == 0 else TITLES.get(methods[j - 1]), fontsize=8)
    fig.suptitle(
        f"Attribution of the {target} class (+: map maximum, green inside the box, white outside;"
        " dashed: object box)",
        fontsize=9,
    )
    top = 1 - 0.2 / fig.get_figheight()  # room for the suptitle above the column titles
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2, rect=(0, 0, 1, top))
    return outputs.save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=attribution` (config.analysis.attribution and the request)."""

    methods: tuple[str, ...]
    target: str  # 'true' or 'predicted'
    split: str
    num_images: int  # shown in the figure and the npz
    pointing_images: int  # scored by the pointing game (annotated data only)
    annotated: bool  # the data has object boxes (the embedded dataset)
    maps: MapSettings
    seed: int  # SmoothGrad's noise
    crop_size: int
    pixels: preprocess.Pixels  # the model inputs' normalization (to display them)
    class_names: tuple
    # The split's labels are the model's classes (`resolve`); False: the target is
    # 'predicted' whatever the config says, and the outputs say why.
    labels: bool = True

    @property
    def total_images(self) -> int:
        """Images whose maps are computed: the shown ones, and the pointing game's."""
        return max(self.num_images, self.pointing_images) if self.annotated else self.num_images


PREDICTED_NOTE = (
    "the labels of {split!r} are not classes of this model (a model brought along, or "
    "unlabeled images): the maps explain the predicted class"
)


def settings(config, request) -> Settings:
    """Raises UsageError: a bad method list, target, SmoothGrad sample count or occluder;
    DataError: an unknown split. The CAM layer is checked against the model by `resolve`."""
    att = config.analysis.attribution
    methods = tuple(att.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(
            f"config.analysis.attribution.methods: {bad[0] if bad else 'empty'!r} is not a "
            f"method: choose from {', '.join(METHODS)}"
        )
    if att.target not in TARGETS:
        raise UsageError(
            f"config.analysis.attribution.target={att.target!r} is not valid: "
            f"choose one of {', '.join(TARGETS)}"
        )
    if "smoothgrad" in methods and att.smoothgrad_samples < 1:
        raise UsageError("config.analysis.attribution.smoothgrad_samples must be >= 1")
    maps = map_settings(config)
    if "occlusion" in methods:
        try:
            occlusion.occluder_grid(config.data.crop_size, maps.occluder_size, maps.occluder_stride)
        except ValueError as e:
            raise UsageError(f"config.analysis.occlusion: {e}") from None
    split = base.analysis_split(config)
    inputs.check_split(config.data, split)
    return Settings(
        methods=methods,
        target=str(att.target),
        split=split,
        num_images=base.integer(config, MODE),
        pointing_images=int(att.pointing_images),
        annotated=inputs.source(config.data).has_boxes,
        maps=maps,
        seed=int(config.seed),
        crop_size=int(config.data.crop_size),
        pixels=preprocess.pixels(config.data),
        class_names=tuple(base.class_names(config)),
    )


def cam_layer(model, methods, layer: str) -> str:
    """The CAM methods' layer ('' = the model's last conv layer), checked where one of
    `methods` uses it.

    Raises:
      UsageError: not a conv layer of the model (naming them).
    """
    convs = graph.conv_layers(model)
    cam = layer or (convs[-1] if convs else "")
    if set(methods) & set(CAM_METHODS):
        base.check_layer(
            cam, convs, "config.analysis.attribution.cam_layer=", none="the model has no conv layer"
        )
    return cam


def resolve(s: Settings, model, source) -> Settings:
    """The CAM layer ('' = the model's last conv layer) checked against the model's conv
    layers where a CAM method uses it; where the labels are not the model's classes, the
    target 'predicted' and class names 'class <i>' for the model's outputs.

    Raises:
      UsageError: a CAM layer that is not a conv layer of the model (naming them), or a
        model that is not a classifier.
    """
    try:
        num_classes = graph.num_outputs(model)
    except ValueError as e:
        raise UsageError(f"--mode=attribution: {e}") from None
    cam = cam_layer(model, s.methods, s.maps.cam_layer)
    labels = source is None or source.labels_apply(s.split)
    return dataclasses.replace(
        s,
        maps=dataclasses.replace(s.maps, cam_layer=cam),
        target=s.target if labels else "predicted",
        labels=labels,
        class_names=s.class_names if labels else tuple(f"class {i}" for i in range(num_classes)),
    )


def load(config, s: Settings, model) -> examples_lib.Examples:
    return base.load_examples(config, s.split, s.total_images)


def pointing_summary(game: dict, examples, classes, s: Settings) -> dict:
    """What pointing_game.json holds: the definition, the settings, the scores, the points."""
    size_px, stride_px, _, _ = occlusion.occluder_grid(
        s.crop_size, s.maps.occluder_size, s.maps.occluder_stride
    )
    summary = {
        "definition": POINTING_DEFINITION,
        "split": s.split,
        "target": s.target,
        "num_images": len(examples),
        "cam_layer": s.maps.cam_layer,
        "occluder_px": size_px,
        "occluder_stride_px": stride_px,
        "smoothgrad": {"samples": s.maps.smoothgrad_samples, "noise": s.maps.smoothgrad_noise},
        "methods": game["methods"],
        "center": game["center"],
        "chance": game["chance"],
        "tolerant": game["tolerant"],
        "images": {
            "index": examples.indices.tolist(),
            "label": examples.labels.tolist(),
            "class": np.asarray(classes).tolist(),
            "box": examples.boxes.tolist(),
            "points": {m: p.tolist() for m, p in game["points"].items()},
        },
    }
    if not s.labels:
        summary["note"] = PREDICTED_NOTE.format(split=s.split)
    return summary


def compute(model, examples: examples_lib.Examples, s: Settings) -> dict:
    """Every method's maps of every loaded image, and the pointing game on annotated data.

    Returns:
      {'arrays': what attribution.npz holds besides `methods` (the shown images: images,
      labels, indices, classes, probs, one map per method, boxes if annotated), 'game':
      `pointing_game`'s dict or None, 'summary': pointing_game.json's dict or None}.
    """
    probs = np.concatenate(
        [
            probabilities_fn(model)(tf.constant(examples.images[i : i + 256]))
            for i in range(0, len(examples), 256)
        ]
    )
    classes = examples.labels if s.target == "true" else probs.argmax(axis=1)
    with tqdm.tqdm(total=len(examples), desc="attribution", unit="img") as bar:
        maps = attribution_maps(
            model, examples.images, classes, s.methods, s.maps, s.seed, bar.update
        )
    shown = slice(0, min(s.num_images, len(examples)))
    arrays = {
        "images": examples.images[shown],
        "labels": examples.labels[shown],
        "indices": examples.indices[shown],
        "classes": np.asarray(classes[shown], np.int64),
        "probs": probs[np.arange(len(examples)), classes][shown].astype(np.float32),
        **{m: v[shown] for m, v in maps.items()},
    }
    game = summary = None
    if examples.boxes is not None:
        arrays["boxes"] = examples.boxes[shown]
        game = pointing_game(maps, examples.boxes, s.crop_size)
        summary = pointing_summary(game, examples, classes, s)
    return {"arrays": arrays, "game": game, "summary": summary}


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """attribution.npz, attribution.png, and on annotated data pointing_game.md (printed too)
    and pointing_game.json; the figure for TensorBoard."""
    arrays = result["arrays"]
    outputs.save_npz(paths["attribution.npz"], methods=np.array(s.methods), **arrays)
    figure = render(
        arrays, s.methods, paths["attribution.png"], s.pixels, list(s.class_names), s.target
    )
    report = base.Report(images={f"{MODE}/{s.target}_class": figure}, summary=result["summary"])
    if not s.labels:
        report.lines.append(f"Note: {PREDICTED_NOTE.format(split=s.split)}")
    if result["game"] is None:
        report.lines.append("No object boxes in this dataset: pointing game skipped.")
        return report
    table = pointing_table(result["game"])
    header = (
        f"Pointing game, {s.split} split, {result['summary']['num_images']} images, "
        f"{s.target} class.\nDefinition: {POINTING_DEFINITION}.\n\n"
    )
    outputs.save_text(paths["pointing_game.md"], header + table)
    outputs.save_text(paths["pointing_game.json"], json.dumps(result["summary"], indent=1))
    report.lines.append(table)
    return report


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
    resolve=resolve,
)
