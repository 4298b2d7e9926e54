"""`--mode=correspondence`: does the model treat the same object part alike across images?
(Zeiler & Fergus 2014, Sec. 4.2, Table 1.)

N images of one class (paper: 5 dogs). In each image the same named part (paper: left eye,
right eye, nose) is occluded with gray (the data mean colour, `Pixels.fill`: 0 in the
mean-subtracted model input), and so are random regions of the same size. For a layer l
(paper: 5 and 7) and image i, eps_i = x_i - x~_i is the change of the flattened feature
vector the occlusion causes (layers `config.analysis.correspondence.layers`; by default the model's
last conv layer and its penultimate dense layer, ZFNet's conv5 and fc7). The paper's score is
Delta_l = sum_{i != j} H(sign(eps_i), sign(eps_j)), H the Hamming distance. Lower = the
occlusion changes the features in the same direction in every image = more consistent.

Precisely, as computed here (and reported in correspondence.md / .json):
- sign() is three-valued (-1, 0, +1): ReLU features are often 0 with and without the
  occlusion, and such positions agree. |eps| <= SIGN_RTOL * max|x_i| counts as 0, so that
  float rounding (batch-size-dependent kernels differ by ~1e-7) never counts as a sign.
- h_ij = H(sign(eps_i), sign(eps_j)) / D, D the feature vector length: the fraction of
  positions whose signs differ; Delta_l / (N (N-1) D) is the mean of h_ij over ordered pairs.
- An occluded part: mean and (population) standard deviation of h_ij over the N (N-1)
  ordered pairs i != j (each unordered pair counted twice, which changes neither).
- Random: `random_draws` seeded draws; in each, every image gets one region whose height and
  width are the mean of that image's part boxes (rounded), its center uniform inside the
  image's annotated region (the object box for the embedded dataset, the bounding box of
  all its parts for --parts), shifted to lie inside the crop. Per draw the mean of h_ij over
  the pairs; reported: mean and standard deviation of that across draws.
The paper's values, at layer 5: about 0.07 for eyes and nose, 0.1 for random regions.

Parts come from `--parts=FILE.json`, `{image_path: {part_name: [y0, x0, y1, x1]}}`, boxes
in the original photo's pixels (end exclusive), paths relative to the JSON's folder; each
photo is used as the model's center crop (`load_photo`) and its boxes mapped with
`zf_tf.pipelines.examples.crop_geometry`. Without --parts on the embedded dataset, the first N
images of class `config.analysis.correspondence.label` are used with the four corner
quarters of their ground-truth object box as parts (`embedded_subjects`).

Outputs in `WORKDIR/correspondence/`: correspondence.md (Table 1 form), correspondence.json
and correspondence.png (the images with their part boxes); the figure also goes to
TensorBoard (`WORKDIR/logs/correspondence`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
import tqdm

from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core import graph
from zf_tf.core.errors import UsageError, op_message
from zf_tf.pipelines import examples, inputs, preprocess

MODE = "correspondence"
SIGN_RTOL = 1e-5
QUARTERS = ("top_left", "top_right", "bottom_left", "bottom_right")
OUTPUTS = ("correspondence.md", "correspondence.json", "correspondence.png")


@dataclasses.dataclass
class Subjects:
    """The images of a correspondence experiment and their part boxes, in crop pixels."""

    images: np.ndarray  # float32 (N, s, s, 3) model inputs (`preprocess.pixels(config.data)`)
    names: list[str]  # (N,) image names for tables and figures
    parts: tuple[str, ...]  # (P,) part names
    boxes: np.ndarray  # int32 (N, P, 4) y0, x0, y1, x1 (end exclusive) in crop pixels
    regions: np.ndarray  # int32 (N, 4) where random regions are centered


# ----------------------------------------------------------------------------------------
# Parts: from a JSON file, or from the embedded dataset's object boxes.
# ----------------------------------------------------------------------------------------


def _box(value, where: str) -> list[float]:
    ok = (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok or not (value[0] < value[2] and value[1] < value[3]):
        raise UsageError(
            f"{where}: a box must be [y0, x0, y1, x1] with y0 < y1, x0 < x1; got {value}"
        )
    return [float(v) for v in value]


def load_parts(path: str) -> tuple[list[tuple[str, dict[str, list[float]]]], tuple[str, ...]]:
    """Reads and checks a parts JSON file (without opening the images).

    Args:
      path: `{image_path: {part_name: [y0, x0, y1, x1]}}`; relative image paths are taken
        from the JSON file's folder.

    Returns:
      ([(absolute image path, {part: box})] in file order, part names in the first image's
      order).

    Raises:
      UsageError: missing or unreadable file, bad JSON or layout, fewer than 2 images, or an
        image lacking a part that another image names.
    """
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise UsageError(f"cannot read --parts file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--parts file {path} is not valid JSON: {e}") from None
    layout = "expected {image_path: {part_name: [y0, x0, y1, x1]}}"
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--parts file {path}: {layout}")
    folder = os.path.dirname(os.path.abspath(path))
    items = []
    for image, boxes in data.items():
        if not isinstance(boxes, dict) or not boxes:
            raise UsageError(f"--parts file {path}, image {image}: {layout}")
        parsed = {
            name: _box(box, f"--parts file {path}, image {image}, part {name}")
            for name, box in boxes.items()
        }
        items.append((os.path.join(folder, image), parsed))
    if len(items) < 2:
        raise UsageError(f"--parts file {path} names 1 image; at least 2 are needed")
    names = tuple(items[0][1])
    every = [*names, *sorted(set().union(*(set(b) for _, b in items)) - set(names))]
    for image, (_, boxes) in zip(data, items):
        missing = [n for n in every if n not in boxes]
        if missing:
            raise UsageError(
                f"--parts file {path}: image {image} has no part {missing[0]!r} "
                "(every image must name the same parts)"
            )
    return items, names


def load_photo(path: str, config) -> tuple[np.ndarray, tuple[int, int]]:
    """A photo as the model's center crop, the geometry `examples.pixel_box_to_crop` assumes.

    Returns:
      (float32 (s, s, 3) model input crop, (height, width) of the original).

    Raises:
      UsageError: the file cannot be read or decoded.
    """
    d = config.data
    try:
        image = preprocess.decode_rgb(tf.io.read_file(path))
        pixels = preprocess.pixels(d)
        crop = preprocess.ten_crops_of_image(image, d.resize_size, d.crop_size, pixels)
        return crop[preprocess.CENTER_CROP].numpy(), tuple(int(v) for v in image.shape[:2])
    except (tf.errors.OpError, ValueError) as e:
        raise UsageError(f"cannot read image {path}: {op_message(e)}") from None


def json_subjects(config, path: str, num: int = 0) -> Subjects:
    """The images and parts of a --parts JSON file (the first `num` images if num > 0).

    Raises:
      UsageError: as `load_parts`, an unreadable image, a box outside its image, or a part
        that falls completely outside the model's center crop.
    """
    items, names = load_parts(path)
    items = items[: num if num > 0 else None]
    if len(items) < 2:
        raise UsageError(f"--num_images={num}: at least 2 images are needed")
    S, s = config.data.resize_size, config.data.crop_size
    images, boxes, regions = [], [], []
    for image_path, image_parts in items:
        crop, (h, w) = load_photo(image_path, config)
        row = []
        for name in names:
            y0, x0, y1, x1 = image_parts[name]
            if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
                raise UsageError(
                    f"--parts: box {name} {[y0, x0, y1, x1]} of {image_path} lies outside the "
                    f"{h}x{w} image (need 0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w})"
                )
            box = examples.pixel_box_to_crop(image_parts[name], h, w, S, s)
            if box[2] <= box[0] or box[3] <= box[1]:
                raise UsageError(
                    f"--parts: part {name} of {image_path} lies outside the model's center crop"
                )
            row.append(box)
        row = np.stack(row)
        images.append(crop)
        boxes.append(row)
        regions.append([*row[:, :2].min(axis=0), *row[:, 2:].max(axis=0)])
    return Subjects(
        images=np.stack(images).astype(np.float32),
        names=[os.path.basename(p) for p, _ in items],
        parts=names,
        boxes=np.stack(boxes).astype(np.int32),
        regions=np.asarray(regions, np.int32),
    )


def quarter_boxes(box) -> np.ndarray:
    """The four corner quarters (QUARTERS order) of a box, all of the same size.

    Each is floor(h/2) x floor(w/2), anchored at its corner of the box (for odd sizes the
    middle row/column belongs to no quarter).

    Returns:
      int32 (4, 4) y0, x0, y1, x1.
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    hh, hw = (y1 - y0) // 2, (x1 - x0) // 2
    return np.array(
        [
            [y0, x0, y0 + hh, x0 + hw],
            [y0, x1 - hw, y0 + hh, x1],
            [y1 - hh, x0, y1, x0 + hw],
            [y1 - hh, x1 - hw, y1, x1],
        ],
        np.int32,
    )


# Candidates read per wanted image when looking for objects that lie wholly inside the crop.
CANDIDATES_PER_IMAGE = 8


def embedded_subjects(config, split: str, num: int, label: int) -> Subjects:
    """`num` images of class `label` with their object box's quarters as parts.

    The first images (in split order) whose object lies wholly inside the crop are taken,
    since a quarter of a box clipped by the crop border is not the same part of the object;
    images with clipped objects fill up only if there are too few of those.

    Raises:
      UsageError: fewer than 2 such images, or an object box under 2 pixels on a side.
    """
    ex = examples.load_examples(config, split, num * CANDIDATES_PER_IMAGE, label=label)
    if len(ex) < 2:
        raise UsageError(
            f"split {split!r} has {len(ex)} images of class {label}; at least 2 are needed"
        )

    s = config.data.crop_size
    inside = (ex.boxes[:, :2] > 0).all(axis=1) & (ex.boxes[:, 2:] < s).all(axis=1)
    keep = np.sort(np.concatenate([np.flatnonzero(inside), np.flatnonzero(~inside)])[:num])
    ex = examples.Examples(ex.images[keep], ex.labels[keep], ex.indices[keep], ex.boxes[keep])
    boxes = np.stack([quarter_boxes(b) for b in ex.boxes])
    if np.any(boxes[..., 2] <= boxes[..., 0]) or np.any(boxes[..., 3] <= boxes[..., 1]):
        raise UsageError("an object box is too small to split into quarters")
    names = base.class_names(config)
    name = names[label] if label < len(names) else str(label)
    return Subjects(
        images=ex.images,
        names=[f"{split} #{i} ({name})" for i in ex.indices],
        parts=QUARTERS,
        boxes=boxes,
        regions=ex.boxes.astype(np.int32),
    )


def random_boxes(subjects: Subjects, draws: int, seed: int, crop_size: int) -> np.ndarray:
    """Seeded random regions: per draw and image, a box of the image's mean part size whose
    center is uniform in the image's region, shifted inside the crop.

    Returns:
      int32 (draws, N, 4) y0, x0, y1, x1.
    """
    rng = np.random.default_rng(seed)
    sizes = np.rint((subjects.boxes[..., 2:] - subjects.boxes[..., :2]).mean(axis=1))
    sizes = np.clip(sizes.astype(np.int64), 1, crop_size)  # (N, 2) h, w
    out = np.zeros((draws, len(sizes), 4), np.int32)
    for d in range(draws):
        for n, ((h, w), (ry0, rx0, ry1, rx1)) in enumerate(zip(sizes, subjects.regions)):
            cy = rng.integers(ry0, max(ry1, ry0 + 1))
            cx = rng.integers(rx0, max(rx1, rx0 + 1))
            y0 = int(np.clip(cy - h // 2, 0, crop_size - h))
            x0 = int(np.clip(cx - w // 2, 0, crop_size - w))
            out[d, n] = [y0, x0, y0 + h, x0 + w]
    return out


# ----------------------------------------------------------------------------------------
# Compute.
# ----------------------------------------------------------------------------------------


def occlude(image: np.ndarray, boxes, fill=0.0) -> np.ndarray:
    """Copies of `image`, one per box, with that box set to `fill`: the gray of the mean
    colour in the model input (`preprocess.Pixels.fill`; 0 with the paper's mean subtraction),
    a scalar or one value per channel.

    Returns:
      float32 (len(boxes), s, s, 3).
    """
    out = np.repeat(np.asarray(image, np.float32)[None], len(boxes), axis=0)
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        out[k, y0:y1, x0:x1] = fill
    return out


def signs(eps: np.ndarray, scale) -> np.ndarray:
    """Three-valued sign of eps, with |eps| <= SIGN_RTOL * scale counted as 0.

    Args:
      eps: (N, D) feature changes.
      scale: (N,) or scalar, e.g. max |x_i| of each original feature vector.
    """
    eps = np.asarray(eps, np.float64)
    tol = SIGN_RTOL * np.reshape(np.asarray(scale, np.float64), (-1,) + (1,) * (eps.ndim - 1))
    return np.where(np.abs(eps) <= tol, 0, np.sign(eps)).astype(np.int8)


def pair_hamming(sign: np.ndarray) -> np.ndarray:
    """Normalized Hamming distances between the signs of all ordered pairs i != j.

    Args:
      sign: (N, D) values in {-1, 0, 1}.

    Returns:
      float64 (N (N-1),) fraction of the D positions where sign_i != sign_j, pairs in the
      order (0,1), (0,2), ..., (1,0), (1,2), ...
    """
    sign = np.asarray(sign)
    n, d = sign.shape
    differ = np.count_nonzero(sign[:, None, :] != sign[None, :, :], axis=-1)  # (N, N)
    return (differ[~np.eye(n, dtype=bool)] / d).astype(np.float64)


def delta(sign: np.ndarray) -> tuple[float, float]:
    """The paper's Delta for one occluded part, normalized: mean and standard deviation of
    `pair_hamming(sign)` (mean = Delta_l / (N (N-1) D))."""
    values = pair_hamming(sign)
    return float(values.mean()), float(values.std())


def check_layers(model, layers):
    """Raises UsageError if the model lacks one of `layers`, naming its feature layers
    (`graph.feature_layers`; any layer of the model is accepted)."""
    names = {op.name for op in graph.ops_of(model)}
    bad = [name for name in layers if name not in names]
    if bad:
        raise UsageError(
            f"config.analysis.correspondence.layers: no layer {bad[0]!r}; valid layers: "
            + ", ".join(graph.feature_layers(model))
        )


def model_layers(model, layers) -> tuple[str, ...]:
    """`layers` with '' replaced by the model's own: the first by its last conv layer (the
    paper's layer 5), the others by its penultimate dense layer (layer 7), and checked.

    Raises:
      UsageError: no such default layer, or a named layer the model lacks.
    """
    try:
        filled = tuple(
            name or (graph.last_conv(model) if i == 0 else graph.penultimate_dense(model))
            for i, name in enumerate(layers)
        )
    except ValueError as e:
        raise UsageError(f"config.analysis.correspondence.layers: {e}") from None
    check_layers(model, filled)
    return filled


def _tap(model, layers):
    return graph.tap(model, list(layers), name="correspondence_tap")


def measure(
    model, subjects: Subjects, random: np.ndarray, layers=("", ""), batch_size: int = 128, fill=0.0
):
    """Occludes every part and random region and scores sign consistency per layer.

    Args:
      model: the classifier.
      subjects: images and part boxes.
      random: int (R, N, 4) random boxes (`random_boxes`).
      layers: layer names, e.g. ('conv5', 'fc7'); '' = the model's own (`model_layers`).
      batch_size: forward-pass batch (an image, its occluded copies; chunked).
      fill: the occluders' model-input value (`occlude`).

    Returns:
      {layer: {'parts': {part: float64 (N(N-1),) pair_hamming}, 'random': float64 (R,)
      mean pair_hamming per draw}}.
    """
    layers = model_layers(model, layers)
    tap = _tap(model, layers)
    n, num_parts = subjects.boxes.shape[:2]
    eps = {layer: [] for layer in layers}  # per layer: (N, P + R, D)
    scale = {layer: [] for layer in layers}
    for i in tqdm.tqdm(range(n), desc="correspondence", unit="img"):
        boxes = np.concatenate([subjects.boxes[i], random[:, i]])
        batch = np.concatenate([subjects.images[i][None], occlude(subjects.images[i], boxes, fill)])
        outs = {layer: [] for layer in layers}
        for start in range(0, len(batch), batch_size):
            chunk = tap(batch[start : start + batch_size], training=False)
            chunk = chunk if isinstance(chunk, (list, tuple)) else [chunk]
            for layer, o in zip(layers, chunk):
                outs[layer].append(np.asarray(o, np.float64).reshape(len(o), -1))
        for layer in layers:
            f = np.concatenate(outs[layer])
            eps[layer].append(f[0] - f[1:])
            scale[layer].append(np.abs(f[0]).max())
    result = {}
    for layer in layers:
        e = np.stack(eps[layer])  # (N, P + R, D)
        s = np.asarray(scale[layer])
        result[layer] = {
            "parts": {
                part: pair_hamming(signs(e[:, p], s)) for p, part in enumerate(subjects.parts)
            },
            "random": np.array(
                [pair_hamming(signs(e[:, num_parts + r], s)).mean() for r in range(len(random))],
                np.float64,
            ),
        }
    return result


def summarize(result: dict) -> dict:
    """{layer: {location: (mean, std)}}: parts over pairs, 'random' over draws."""
    out = {}
    for layer, r in result.items():
        out[layer] = {p: (float(v.mean()), float(v.std())) for p, v in r["parts"].items()}
        out[layer]["random"] = (float(r["random"].mean()), float(r["random"].std()))
    return out


def table(summary: dict) -> str:
    """A Table 1-style markdown table: rows = occluded location, columns = layers."""
    layers = list(summary)
    header = ["occluded location", *(f"Delta {layer} (mean ± std)" for layer in layers)]
    rows = [
        [loc, *(f"{summary[layer][loc][0]:.4f} ± {summary[layer][loc][1]:.4f}" for layer in layers)]
        for loc in summary[layers[0]]
    ]
    return outputs.markdown_table(header, rows)


# ----------------------------------------------------------------------------------------
# Render and the mode.
# ----------------------------------------------------------------------------------------


def plot(subjects: Subjects, random: np.ndarray, pixels, path: str, title: str) -> np.ndarray:
    """The images with their part boxes (colored) and draw 0's random box (dashed white);
    `pixels` (`preprocess.Pixels`) turns the model inputs back into RGB."""
    plt = outputs.pyplot()
    from matplotlib.patches import Rectangle

    n = len(subjects.images)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 3.0), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for i, ax in enumerate(axes[0]):
        ax.imshow(outputs.display(subjects.images[i], pixels), interpolation="nearest")
        ax.axis("off")
        ax.set_title(subjects.names[i], fontsize=7)
        boxes = [*subjects.boxes[i], random[0, i]] if len(random) else list(subjects.boxes[i])
        labels = [*subjects.parts, "random (draw 0)"]
        for k, (y0, x0, y1, x1) in enumerate(boxes):
            is_random = k == len(subjects.parts)
            corner, h, w = (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0
            if is_random:  # black dashes on white: visible on any background
                ax.add_patch(Rectangle(corner, w, h, fill=False, lw=1.6, ec="white"))
            ax.add_patch(
                Rectangle(
                    corner,
                    w,
                    h,
                    fill=False,
                    lw=1.2,
                    ls="--" if is_random else "-",
                    ec="black" if is_random else colors[k % len(colors)],
                    label=labels[k] if i == 0 else None,
                )
            )
    fig.legend(loc="lower center", ncol=len(subjects.parts) + 1, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    image = outputs.save_figure(fig, path)
    plt.close(fig)
    return image


DEFINITION = (
    "h_ij = fraction of positions where sign(eps_i) != sign(eps_j), eps = features of "
    "original minus occluded, sign three-valued with |eps| <= "
    f"{SIGN_RTOL} * max|x_i| as 0; parts: mean/std of h_ij over ordered pairs; "
    "random: mean over pairs per draw, then mean/std over draws"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=correspondence` (config.analysis.correspondence and the
    request)."""

    parts: str  # --parts JSON file; '' = the embedded dataset's object-box quarters
    split: str  # without --parts: the split whose images of class `label` are used
    num_images: int  # images compared; with --parts, 0 = every image of the file
    label: int  # without --parts: the class
    layers: tuple[str, ...]  # '' = the model's own (`resolve`: last conv, penultimate dense)
    random_draws: int
    seed: int  # of the random regions
    crop_size: int
    batch_size: int  # forward-pass batch of an image and its occluded copies
    pixels: preprocess.Pixels  # the model inputs' normalization (occluder colour, display)


def settings(config, request) -> Settings:
    """Raises UsageError: fewer than 2 images, no --parts on unlabeled images or on a dataset
    without object boxes, a bad --parts file (its layout; the images are read by `load`), a
    label that is not a class; DataError: an unknown split. The layers are checked against
    the model by `resolve`."""
    c = config.analysis.correspondence
    num = c.num_images or (0 if c.parts else 5)
    if isinstance(num, bool) or not isinstance(num, int) or num < 0 or num == 1:
        raise UsageError(f"--num_images={num}: correspondence compares pairs, use at least 2")
    split = base.analysis_split(config)
    if c.parts:
        load_parts(c.parts)
    elif _unlabeled(config, split):
        raise UsageError(
            f"--mode=correspondence compares images of one class (config.analysis."
            f"correspondence.label), but split {split!r} holds unlabeled images: give the "
            "images and their parts with --parts=FILE.json ({image_path: {part_name: "
            "[y0, x0, y1, x1]}})"
        )
    elif not inputs.source(config.data).has_boxes:
        raise UsageError(
            "--mode=correspondence on a dataset without object boxes needs "
            "--parts=FILE.json ({image_path: {part_name: [y0, x0, y1, x1]}})"
        )
    elif not 0 <= c.label < config.data.num_classes:
        raise UsageError(
            f"config.analysis.correspondence.label={c.label} is not a class: "
            f"choose 0..{config.data.num_classes - 1}"
        )
    else:
        inputs.check_split(config.data, split)
    return Settings(
        parts=str(c.parts),
        split=split,
        num_images=int(num),
        label=int(c.label),
        layers=tuple(c.layers),
        random_draws=int(c.random_draws),
        seed=int(config.seed),
        crop_size=int(config.data.crop_size),
        batch_size=int(config.analysis.batch_size),
        pixels=preprocess.pixels(config.data),
    )


def _unlabeled(config, split: str) -> bool:
    """A readable flat folder of unlabeled images (anything else is refused or checked on
    its own terms)."""
    try:
        return not inputs.is_labeled(config.data, split)
    except (OSError, ValueError):  # no such folder or split: "needs --parts" says enough
        return False


def resolve(s: Settings, model, source) -> Settings:
    """The layers ('' = the model's last conv layer, its penultimate dense layer) checked
    against the model.

    Raises:
      UsageError: a layer the model lacks (naming its feature layers), or no default one.
    """
    return dataclasses.replace(s, layers=model_layers(model, s.layers))


def load(config, s: Settings, model) -> Subjects:
    """The experiment's images and parts: --parts JSON, else the embedded dataset's class.

    Raises:
      UsageError: the model lacks a configured layer; as `json_subjects` /
        `embedded_subjects`.
    """
    check_layers(model, s.layers)
    if s.parts:
        return json_subjects(config, s.parts, s.num_images)
    return embedded_subjects(config, s.split, s.num_images, s.label)


def compute(model, subjects: Subjects, s: Settings) -> dict:
    """Random regions, `measure` and `summarize`.

    Returns:
      {'subjects': the Subjects, 'random': int (R, N, 4) random boxes, 'measure':
      measure()'s dict, 'summary': summarize()'s dict}.
    """
    random = random_boxes(subjects, s.random_draws, s.seed, s.crop_size)
    result = measure(model, subjects, random, s.layers, s.batch_size, s.pixels.fill)
    return {"subjects": subjects, "random": random, "measure": result, "summary": summarize(result)}


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """correspondence.md (printed too), correspondence.json, correspondence.png; the figure
    for TensorBoard."""
    subjects, random = result["subjects"], result["random"]
    measured, summary = result["measure"], result["summary"]
    n = len(subjects.images)
    text = (
        f"# Correspondence (paper Table 1): {n} images, parts {', '.join(subjects.parts)}\n\n"
        "Mean normalized Hamming distance between the feature sign changes of two images "
        f"(ordered pairs i != j; random: {len(random)} draws, mean ± std across draws). "
        "Lower = more consistent.\n\n" + table(summary)
    )
    outputs.save_text(paths["correspondence.md"], text)
    record = {
        "images": subjects.names,
        "parts": list(subjects.parts),
        "layers": list(s.layers),
        "boxes": subjects.boxes.tolist(),
        "random_boxes": random.tolist(),
        "summary": {
            layer: {loc: {"mean": m, "std": sd} for loc, (m, sd) in locs.items()}
            for layer, locs in summary.items()
        },
        "pair_hamming": {
            layer: {p: v.tolist() for p, v in r["parts"].items()} for layer, r in measured.items()
        },
        "random_per_draw": {layer: r["random"].tolist() for layer, r in measured.items()},
        "definition": DEFINITION,
    }
    outputs.save_text(paths["correspondence.json"], json.dumps(record, indent=1) + "\n")
    figure = plot(
        subjects,
        random,
        s.pixels,
        paths["correspondence.png"],
        f"Correspondence: occluded parts ({', '.join(subjects.parts)}) and a random region",
    )
    return base.Report(images={f"{MODE}/parts": figure}, lines=[text], summary=record)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
    resolve=resolve,
)
