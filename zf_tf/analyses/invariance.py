"""`--mode=invariance`: how features and the prediction change under image transformations
(Zeiler & Fergus 2014, Fig. 5).

A few images are vertically translated, scaled about their center and rotated about their
center by the amounts in `config.analysis.invariance`. For every image and amount we measure
the Euclidean distance between the feature vectors of the original and of the transformed
image at layer 1 and layer 7 (`config.analysis.invariance.layers`; by default the model's
first conv layer and its penultimate dense layer, `graph.penultimate_dense`: ZFNet's conv1
and fc7, outputs flattened), and the softmax probability of the true class. Where the labels
are not classes of the model (a model brought along with --model, or unlabeled images), the
probability of the class the model predicts on the untransformed image instead, and the
outputs say so.

Transforms act on the model input (the normalized center crop), bilinearly, with the area
uncovered by the transform filled with the data mean colour, i.e. gray (`Pixels.fill`: 0 in
the paper's mean-subtracted input). Conventions, in pixel
index coordinates (pixel centers at integers, the image center at ((s-1)/2, (s-1)/2)):
- translation t: the content moves DOWN by t * s pixels (t < 0: up);
- scale f: zoom about the center; f > 1 enlarges the content, f < 1 shrinks it;
- rotation a degrees: COUNTERCLOCKWISE as displayed (y down), so 90 degrees equals
  `np.rot90(image)` exactly.

Outputs in `WORKDIR/invariance/`: invariance.csv (one row per image, transform and amount),
invariance.npz (the same arrays), invariance.png (3x3 plots like Fig. 5) and
invariance_examples.png (the transformed copies of the first image); both figures also go
to TensorBoard (`WORKDIR/logs/invariance`).
"""

from __future__ import annotations

import csv
import dataclasses
import io

import keras
import numpy as np
import tqdm

from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core import graph
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples as examples_lib
from zf_tf.pipelines import inputs, preprocess

MODE = "invariance"
TRANSFORMS = ("translation", "scale", "rotation")
IDENTITY = {"translation": 0.0, "scale": 1.0, "rotation": 0.0}
AXIS_LABELS = {
    "translation": "vertical shift (fraction of the crop side, + = down)",
    "scale": "scale factor (zoom about the center)",
    "rotation": "rotation (degrees, counterclockwise)",
}
CSV_HEADER = ("image", "label", "transform", "amount", "dist_layer1", "dist_layer7", "p_true")
# Where the labels are not the model's classes: the class predicted on the original image.
CSV_HEADER_PREDICTED = (
    "image",
    "predicted",
    "transform",
    "amount",
    "dist_layer1",
    "dist_layer7",
    "p_predicted",
)


def transform_matrix(kind: str, amount: float, size: int) -> np.ndarray:
    """The projective map from output to input pixel coordinates of one transform.

    Args:
      kind: one of TRANSFORMS.
      amount: shift as a fraction of `size`, zoom factor, or degrees (see module docstring).
      size: image side s in pixels (square images).

    Returns:
      float64 (8,) [a0, a1, a2, b0, b1, b2, 0, 0]: output pixel (y, x) samples the input at
      x_in = a0 x + a1 y + a2, y_in = b0 x + b1 y + b2 (`keras.ops.image.affine_transform`).
    """
    c = (size - 1) / 2.0
    if kind == "translation":
        return np.array([1, 0, 0, 0, 1, -amount * size, 0, 0], np.float64)
    if kind == "scale":
        if amount <= 0:
            raise UsageError(f"scale factors must be positive; got {amount}")
        inv = 1.0 / amount
        return np.array([inv, 0, c - inv * c, 0, inv, c - inv * c, 0, 0], np.float64)
    if kind == "rotation":
        a = np.deg2rad(amount)
        # Snap cos/sin of multiples of 90 degrees so such rotations stay exact pixel moves.
        cos, sin = np.round(np.cos(a), 12), np.round(np.sin(a), 12)
        # input = R(a) (output - center) + center, with R(a) = [[cos, -sin], [sin, cos]] in (x, y).
        return np.array(
            [cos, -sin, c - cos * c + sin * c, sin, cos, c - sin * c - cos * c, 0, 0], np.float64
        )
    raise UsageError(f"unknown transform {kind!r}: valid transforms: {', '.join(TRANSFORMS)}")


def apply_transforms(images, matrices, fill=0.0) -> np.ndarray:
    """Applies one projective transform per image, bilinearly, filling with `fill`, in one call.

    `keras.ops.image.affine_transform` with the TensorFlow backend runs TF's
    ImageProjectiveTransformV3 kernel, which this function called directly before: measured
    bit-identical (max |difference| 0.0) on 4096 copies of 64x64x3 images (every translation,
    scale and rotation of a dense sweep), and tests/test_invariance.py checks it against a
    numpy bilinear oracle. Bilinear weights sum to 1, so a colour fill is a 0 fill of
    `images - fill`, plus `fill` (the kernel's fill value is one scalar).

    Args:
      images: float32 (N, H, W, C).
      matrices: (N, 8) from `transform_matrix`.
      fill: the uncovered area's value, a scalar or one per channel (`Pixels.fill`).

    Returns:
      float32 (N, H, W, C).
    """
    fill = np.asarray(fill, np.float32)
    out = keras.ops.image.affine_transform(
        np.asarray(images, np.float32) - fill,
        np.asarray(matrices, np.float32),
        interpolation="bilinear",
        fill_mode="constant",
        fill_value=0.0,
        data_format="channels_last",
    )
    return np.asarray(out) + fill


def sweeps(config) -> dict[str, tuple[float, ...]]:
    """{transform: amounts} from `config.analysis.invariance`."""
    c = config.analysis.invariance
    return {
        "translation": tuple(float(a) for a in c.translations),
        "scale": tuple(float(a) for a in c.scales),
        "rotation": tuple(float(a) for a in c.rotations),
    }


def transformed_copies(image: np.ndarray, sweep: dict, fill=0.0) -> tuple[np.ndarray, list]:
    """All transformed copies of one image, in one batched op (uncovered area: `fill`).

    Returns:
      (copies float32 (A, s, s, 3), [(transform, amount)] of length A), in `sweep` order.
    """
    keys = [(kind, a) for kind in sweep for a in sweep[kind]]
    size = image.shape[0]
    matrices = np.stack([transform_matrix(kind, a, size) for kind, a in keys])
    return apply_transforms(np.repeat(image[None], len(keys), axis=0), matrices, fill), keys


def _layer7_note(model, l7: str) -> str:
    """'' or what stands in for fc7: said when layer 7 is the model's default one
    (`graph.penultimate_dense`) and not called fc7."""
    try:
        default = graph.penultimate_dense(model)
    except ValueError:
        return ""
    if l7 == "fc7" or l7 != default:
        return ""
    if isinstance(graph.find(model, l7).layer, keras.layers.Dense):
        if l7.startswith("fc"):  # ZFNet without fc7 (a Table 3 ablation)
            return f"the model has no fc7: 'layer 7' is {l7}, its last fc layer"
        return f"'layer 7' is {l7}, the model's penultimate dense layer"
    return f"the model has no hidden dense layer: 'layer 7' is {l7}, which feeds its classifier"


def feature_layers(model, layers=("", "")) -> tuple[str, str, str]:
    """(layer-1 name, layer-7 name, note) of `layers`, '' = the model's default: its first
    conv layer for layer 1, its penultimate dense layer for layer 7 (ZFNet: conv1, fc7; fc6
    when a Table 3 ablation removes fc7); note: '' or which layer stands in for fc7.

    Raises:
      UsageError: the model has no such default layer, or lacks a named one (naming its
        feature layers).
    """
    try:
        l1 = layers[0] or graph.first_conv(model)
        l7 = layers[1] or graph.penultimate_dense(model)
    except ValueError as e:
        raise UsageError(f"--mode=invariance: {e}") from None
    known = {op.name for op in graph.ops_of(model)}
    for name in (l1, l7):
        if name not in known:
            raise UsageError(
                f"config.analysis.invariance.layers: no layer {name!r}; valid layers: "
                + ", ".join(graph.feature_layers(model))
            )
    return l1, l7, _layer7_note(model, l7)


def tap_model(model, layers=("", "")) -> keras.Model:
    """A Model: images -> [layer 1, layer 7, logits] (`feature_layers`); call it in inference
    mode (training=False: no dropout)."""
    l1, l7, _ = feature_layers(model, layers)
    return graph.tap(model, [l1, l7, graph.output_layer(model)], name="invariance_tap")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def measure(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    sweep: dict,
    batch_size: int = 128,
    fill=0.0,
    layers=("", ""),
    predicted: bool = False,
):
    """Feature distances and true-class probability of every transformed copy.

    Args:
      model: the classifier (logits output).
      images: float32 (N, s, s, 3) model inputs.
      labels: (N,) true classes.
      sweep: {transform: amounts}, as `sweeps(config)`.
      batch_size: forward-pass batch (the original and all its copies, chunked).
      fill: the model input of the mean colour, for uncovered areas (`Pixels.fill`).
      layers: (layer 1, layer 7) names, '' = the model's defaults (`feature_layers`).
      predicted: measure the probability of the class predicted on the original image
        instead of `labels` (labels that are not the model's classes).

    Returns:
      dict with, per transform `k`: `k/amounts` (A_k,), `k/dist_layer1`, `k/dist_layer7`,
      `k/p_true` (N, A_k) float64 (the probability of `classes`); `norm_layer1`,
      `norm_layer7` (N,): the originals' feature norms (to read distances relative to
      them); `classes` (N,) the class whose probability is measured; `layer1`, `layer7`
      (layer names), `note` ('' or which layer stands in for fc7) and `target` ('true' or
      'predicted').
    """
    l1, l7, note = feature_layers(model, layers)
    tap = tap_model(model, (l1, l7))
    rows = {key: [] for key in ("dist_layer1", "dist_layer7", "p_true")}
    norms = {"norm_layer1": [], "norm_layer7": []}
    classes = []
    for image, label in tqdm.tqdm(
        list(zip(images, labels)), desc="invariance", unit="img", disable=len(images) < 2
    ):
        copies, keys = transformed_copies(image, sweep, fill)
        batch = np.concatenate([image[None], copies])
        outs = [[], [], []]
        for start in range(0, len(batch), batch_size):
            chunk = tap(batch[start : start + batch_size], training=False)
            for o, c in zip(outs, chunk):
                o.append(np.asarray(c, np.float64).reshape(len(c), -1))
        f1, f7, logits = (np.concatenate(o) for o in outs)
        c = int(np.argmax(logits[0])) if predicted else int(label)
        classes.append(c)
        rows["dist_layer1"].append(np.linalg.norm(f1[1:] - f1[0], axis=1))
        rows["dist_layer7"].append(np.linalg.norm(f7[1:] - f7[0], axis=1))
        rows["p_true"].append(_softmax(logits[1:])[:, c])
        norms["norm_layer1"].append(np.linalg.norm(f1[0]))
        norms["norm_layer7"].append(np.linalg.norm(f7[0]))
    target = "predicted" if predicted else "true"
    result = {"layer1": l1, "layer7": l7, "note": note, "target": target}
    result.update({key: np.asarray(v, np.float64) for key, v in norms.items()})
    result["classes"] = np.asarray(classes, np.int64)
    start = 0
    for kind, amounts in sweep.items():
        stop = start + len(amounts)
        result[f"{kind}/amounts"] = np.asarray(amounts, np.float64)
        for key, per_image in rows.items():
            result[f"{kind}/{key}"] = np.stack(per_image)[:, start:stop]
        start = stop
    return result


def csv_text(result: dict, labels, indices, class_names) -> str:
    """invariance.csv: one row per image, transform and amount (header CSV_HEADER; with
    `result['target']` 'predicted', CSV_HEADER_PREDICTED: the class predicted on the
    original image and its probability)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if result.get("target") == "predicted":
        writer.writerow(CSV_HEADER_PREDICTED)
        labels = result["classes"]
    else:
        writer.writerow(CSV_HEADER)
    for kind in TRANSFORMS:
        if f"{kind}/amounts" not in result:
            continue
        for n, (label, index) in enumerate(zip(labels, indices)):
            for a, amount in enumerate(result[f"{kind}/amounts"]):
                writer.writerow(
                    [
                        int(index),
                        class_names[int(label)],
                        kind,
                        f"{amount:g}",
                        f"{result[f'{kind}/dist_layer1'][n, a]:.6g}",
                        f"{result[f'{kind}/dist_layer7'][n, a]:.6g}",
                        f"{result[f'{kind}/p_true'][n, a]:.6g}",
                    ]
                )
    return buf.getvalue()


def plot(result: dict, legend: list[str], path: str, title: str) -> np.ndarray:
    """The 3x3 grid of Fig. 5 (rows: transforms; columns: layer-1 distance, layer-7
    distance, P(true class)), one line per image. Returns the PNG as uint8 (H, W, 3)."""
    plt = outputs.pyplot()
    columns = (
        ("dist_layer1", f"layer 1 ({result['layer1']}) distance"),
        ("dist_layer7", f"layer 7 ({result['layer7']}) distance"),
        ("p_true", f"P({'predicted' if result.get('target') == 'predicted' else 'true'} class)"),
    )
    fig, axes = plt.subplots(3, 3, figsize=(11, 9), squeeze=False)
    for r, kind in enumerate(TRANSFORMS):
        amounts = result[f"{kind}/amounts"]
        for c, (key, name) in enumerate(columns):
            ax = axes[r, c]
            for n, values in enumerate(result[f"{kind}/{key}"]):
                ax.plot(amounts, values, marker="o", markersize=3, label=legend[n])
            ax.set_xlabel(AXIS_LABELS[kind], fontsize=8)
            ax.set_ylabel(name, fontsize=8)
            ax.tick_params(labelsize=7)
            if key == "p_true":
                ax.set_ylim(-0.03, 1.03)
            if kind == "rotation":
                ax.set_xticks(amounts[:: max(1, len(amounts) // 7)])
            ax.grid(alpha=0.3)
    axes[0, 2].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    image = outputs.save_figure(fig, path, dpi=90)  # keeps the PNG small enough for docs
    plt.close(fig)
    return image


def example_strip(image: np.ndarray, sweep: dict, pixels, path: str, title: str) -> np.ndarray:
    """The transformed copies of one image, one row per transform, as a PNG; `pixels`
    (`preprocess.Pixels`): the fill colour and the way back to RGB."""
    plt = outputs.pyplot()
    width = max(len(a) for a in sweep.values())
    fig, axes = plt.subplots(
        len(sweep), width, figsize=(1.0 * width, 1.2 * len(sweep) + 0.4), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r, (kind, amounts) in enumerate(sweep.items()):
        copies, _ = transformed_copies(image, {kind: amounts}, pixels.fill)
        for c, (copy, amount) in enumerate(zip(copies, amounts)):
            axes[r, c].imshow(outputs.display(copy, pixels), interpolation="nearest")
            axes[r, c].set_title(f"{kind[:5]} {amount:g}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = outputs.save_figure(fig, path)
    plt.close(fig)
    return out


OUTPUTS = ("invariance.csv", "invariance.npz", "invariance.png", "invariance_examples.png")


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=invariance` (config.analysis.invariance and the request)."""

    split: str
    num_images: int
    translations: tuple[float, ...]  # vertical shifts, fractions of the crop side
    scales: tuple[float, ...]  # zoom factors
    rotations: tuple[float, ...]  # degrees, counterclockwise
    batch_size: int  # forward-pass batch of an image and its copies
    pixels: preprocess.Pixels  # the model inputs' normalization (fill colour, display)
    class_names: tuple
    layers: tuple[str, str] = ("", "")  # layer 1, layer 7; '' = the model's (`resolve`)
    # The split's labels are the model's classes (`resolve`); False: the probability of the
    # class predicted on the untransformed image.
    labels: bool = True

    def sweep(self) -> dict[str, tuple[float, ...]]:
        """{transform: amounts}, as `sweeps(config)`."""
        return {"translation": self.translations, "scale": self.scales, "rotation": self.rotations}


PREDICTED_NOTE = (
    "the labels of {split!r} are not classes of this model (a model brought along, or "
    "unlabeled images): the probabilities are of the class predicted on the untransformed image"
)


def settings(config, request) -> Settings:
    """Raises UsageError: a non-positive scale factor, layers not a pair; DataError: an
    unknown split. The layers are checked against the model by `resolve`."""
    layers = tuple(str(n) for n in config.analysis.invariance.get("layers", ("", "")))
    if len(layers) != 2:
        raise UsageError(
            f"config.analysis.invariance.layers={layers}: give 2 names (layer 1, layer 7; "
            "'' = the model's own)"
        )
    sweep = sweeps(config)
    for kind, amounts in sweep.items():
        for amount in amounts:
            transform_matrix(kind, amount, config.data.crop_size)  # UsageError if bad
    split = base.analysis_split(config)
    inputs.check_split(config.data, split)
    return Settings(
        split=split,
        num_images=base.integer(config, MODE),
        translations=sweep["translation"],
        scales=sweep["scale"],
        rotations=sweep["rotation"],
        batch_size=int(config.analysis.batch_size),
        pixels=preprocess.pixels(config.data),
        class_names=tuple(base.class_names(config)),
        layers=layers,
    )


def resolve(s: Settings, model, source) -> Settings:
    """The layers ('' = the model's first conv layer, its penultimate dense layer) checked
    against the model; whether the labels are the model's classes (else the predicted class'
    probability, with class names 'class <i>' for the model's outputs).

    Raises:
      UsageError: a layer the model lacks (naming its feature layers), no default layer, or
        a model that is not a classifier.
    """
    l1, l7, _ = feature_layers(model, s.layers)
    try:
        num_classes = graph.num_outputs(model)
    except ValueError as e:
        raise UsageError(f"--mode=invariance: {e}") from None
    labels = source is None or source.labels_apply(s.split)
    names = s.class_names if labels else tuple(f"class {i}" for i in range(num_classes))
    return dataclasses.replace(s, layers=(l1, l7), labels=labels, class_names=names)


def load(config, s: Settings, model) -> examples_lib.Examples:
    return base.load_examples(config, s.split, s.num_images)


def compute(model, examples: examples_lib.Examples, s: Settings) -> dict:
    """`measure` on the examples.

    Returns:
      {'measure': measure()'s dict, 'labels', 'indices' (N,), 'example': the first image
      (s, s, 3), whose transformed copies invariance_examples.png shows}.
    """
    return {
        "measure": measure(
            model,
            examples.images,
            examples.labels,
            s.sweep(),
            s.batch_size,
            s.pixels.fill,
            s.layers,
            predicted=not s.labels,
        ),
        "labels": examples.labels,
        "indices": examples.indices,
        "example": examples.images[0],
    }


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """invariance.csv, invariance.npz, invariance.png, invariance_examples.png; both figures
    for TensorBoard; a note when a layer stands in for fc7, and one when the probabilities
    are of the predicted class."""
    measured, labels, indices = result["measure"], result["labels"], result["indices"]
    names = list(s.class_names)
    outputs.save_text(paths["invariance.csv"], csv_text(measured, labels, indices, names))
    arrays = {k.replace("/", "_"): v for k, v in measured.items() if isinstance(v, np.ndarray)}
    outputs.save_npz(
        paths["invariance.npz"],
        labels=labels,
        indices=indices,
        layers=np.array([measured["layer1"], measured["layer7"]]),
        note=np.array(measured["note"]),
        target=np.array(measured["target"]),
        **arrays,
    )
    shown = measured["classes"] if not s.labels else labels
    legend = [f"{s.split} #{i}: {names[int(y)]}" for i, y in zip(indices, shown)]
    if not s.labels:
        legend = [f"{entry} (predicted)" for entry in legend]
    title = f"Invariance on {len(labels)} {s.split} images (paper Fig. 5)"
    if measured["note"]:
        title += f"\n{measured['note']}"
    grid = plot(measured, legend, paths["invariance.png"], title)
    strip = example_strip(
        result["example"],
        s.sweep(),
        s.pixels,
        paths["invariance_examples.png"],
        f"transformed copies of {legend[0]} (gray = mean colour fill)",
    )
    lines = [f"Note: {measured['note']}"] if measured["note"] else []
    if not s.labels:
        lines.append(f"Note: {PREDICTED_NOTE.format(split=s.split)}")
    return base.Report(images={f"{MODE}/curves": grid, f"{MODE}/examples": strip}, lines=lines)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
    resolve=resolve,
)
