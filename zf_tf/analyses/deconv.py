"""`--mode=deconv`: top-k deconvnet projections over a dataset (paper Fig. 2), or the
strongest feature maps of one image, as PNG panels, an index JSON and TensorBoard images.

Outputs go to `WORKDIR/deconv/<layer>/`: `top<k>_<split>.png` + `top<k>_<split>.json`
for a dataset scan, `image_<name>.png` + `.json` for `--image`. Existing outputs are
never replaced unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf
import tqdm

from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core import deconv, graph, rules, topk
from zf_tf.core.errors import UsageError, op_message
from zf_tf.pipelines import inputs, preprocess

MODE = "deconv"
PROJECT_BATCH = 64  # deconvnet requests per projection call


def parse_features(features, key: str = "features") -> tuple[int, ...]:
    """Feature maps as a tuple of ints: `features` is a sequence of ints, or a comma list
    ('' and () -> ()).

    Raises:
      UsageError: an entry is not an integer >= 0 (naming `key`, e.g.
        'config.analysis.deconv.features').
    """
    items = features.split(",") if isinstance(features, str) else list(features)
    try:
        chosen = tuple(int(f) for f in items if str(f).strip())
        if any(isinstance(f, (bool, float)) for f in items) or min(chosen, default=0) < 0:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"{key}={features!r} (--features): give comma-separated integers >= 0, e.g. 0,5,17"
        ) from None
    return chosen


def select_features(num_maps: int, features, num_features: int, seed: int) -> list[int]:
    """Feature maps to show: the explicit ones (`parse_features`), else a seeded random
    subset (`num_features` <= 0 means all)."""
    if features:
        chosen = list(parse_features(features))
        bad = [f for f in chosen if not 0 <= f < num_maps]
        if bad:
            raise UsageError(f"--features {bad} out of range: the layer has maps 0..{num_maps - 1}")
        return chosen
    if num_features <= 0 or num_features >= num_maps:
        return list(range(num_maps))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_maps, size=num_features, replace=False).tolist())


def load_image(path: str, resize_size: int, crop_size: int, pixels) -> np.ndarray:
    """A photo file as the model's center-crop input (float32, normalized by `pixels`, a
    `preprocess.Pixels`).

    Raises:
      UsageError: the file cannot be read or decoded.
    """
    try:
        encoded = tf.io.read_file(path)
        return preprocess.center_crop(encoded, resize_size, crop_size, pixels).numpy()
    except (tf.errors.OpError, ValueError) as e:
        raise UsageError(f"cannot read image {path}: {op_message(e)}") from None


# ---------------------------------------------------------------------------------------------
# The analysis (arrays only)
# ---------------------------------------------------------------------------------------------


def top_k(
    model: keras.Model,
    dataset,
    layer: str,
    k: int,
    features=(),
    num_features: int = 16,
    seed: int = 0,
    progress=None,
    batch_size: int = PROJECT_BATCH,
) -> dict:
    """Each chosen feature map's top-k activations over a dataset, projected to pixel space.

    Args:
      model: the classifier.
      dataset: callable returning a fresh dataset of (images, labels) batches in a fixed
        order (read twice: the scan, then the winners' images).
      layer: conv layer.
      k: strongest activations kept per feature map.
      features, num_features, seed: which maps (`select_features`).
      progress: optional callable(num_images) during the scan.
      batch_size: projections per deconvnet call.

    Returns:
      dict: features [F] the maps shown; winners [{feature, rank, image, y, x, activation,
      box}] (image: position in the dataset; box: the receptive field (y0, x0, y1, x1) in
      the input), strongest first per map; projection (M, H, W, 3) float32 per winner;
      pool (P, H, W, 3) the winners' images and slot (M,) each winner's row in it;
      receptive_field (int).
    """
    dn = deconv.build_deconvnet(model, layer)
    best = topk.scan(model, layer, dataset(), k=k, progress=progress)
    chosen = select_features(best.activation.shape[1], features, num_features, seed)
    images = topk.gather_images(dataset(), best.image[:, chosen])
    order = sorted(images)
    where = {i: n for n, i in enumerate(order)}
    rows = best.records(chosen)
    slot = np.array([where[r["image"]] for r in rows], np.int32)
    pool = np.stack([images[i] for i in order])
    result = deconv.project(
        dn,
        pool,
        slot,
        np.array([r["feature"] for r in rows], np.int32),
        np.array([r["y"] for r in rows], np.int32),
        np.array([r["x"] for r in rows], np.int32),
        batch_size=batch_size,
    )
    for r in rows:
        r["box"] = [int(b) for b in graph.receptive_field(model, layer, r["y"], r["x"])]
    return {
        "features": chosen,
        "winners": rows,
        "projection": result["projection"],
        "pool": pool,
        "slot": slot,
        "receptive_field": int(graph.receptive_field_size(model, layer)),
    }


def strongest_maps(model: keras.Model, image: np.ndarray, layer: str, num: int) -> dict:
    """The `num` (<= 0: all) feature maps of `layer` with the highest maximum on one
    image, each projected at its maximum.

    Returns:
      dict: features [n] strongest first; projection (n, H, W, 3); activation, y, x (n,).
    """
    dn = deconv.build_deconvnet(model, layer)
    act = graph.tap(model, [layer])(image[None], training=False).numpy()
    act = act.reshape(act.shape[0], -1, act.shape[-1])[0]  # (h * w, C); global pools: (1, C)
    strength = act.reshape(-1, act.shape[-1]).max(axis=0)
    n = act.shape[-1] if num <= 0 else min(num, act.shape[-1])
    chosen = np.argsort(-strength)[:n].tolist()
    result = deconv.project(
        dn,
        image[None],
        np.zeros(n, np.int32),
        np.array(chosen, np.int32),
        np.full(n, -1, np.int32),
        np.full(n, -1, np.int32),
    )
    return {"features": chosen, **{k: np.asarray(result[k]) for k in result}}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def render_top_k(result: dict, s: Settings, path: str) -> np.ndarray:
    """The Fig. 2 panels (per map: projections | input patches, on receptive-field
    canvases) saved as PNG; returns the figure as uint8 (H, W, 3)."""
    k, side = s.top_k, min(result["receptive_field"], s.crop_size)
    rows = result["winners"]
    panels, titles = [], []
    for f in result["features"]:
        proj, patch = [], []
        for n in (n for n, r in enumerate(rows) if r["feature"] == f):
            box = rows[n]["box"]
            proj.append(outputs.field_patch(outputs.stretch(result["projection"][n]), box, side))
            image = outputs.display(result["pool"][result["slot"][n]], s.pixels)
            patch.append(outputs.field_patch(image, box, side))
        while len(proj) < k:  # fewer images than k in a tiny split
            proj.append(np.full((side, side, 3), 0.5, np.float32))
            patch.append(np.full((side, side, 3), 0.5, np.float32))
        g = int(np.ceil(np.sqrt(k)))
        left = outputs.tile(np.stack(proj), g, pad=2)
        right = outputs.tile(np.stack(patch), g, pad=2)
        gap = np.ones((left.shape[0], 6, 3), np.float32)
        panels.append(np.concatenate([left, gap, right], axis=1))
        titles.append(f"{s.layer} map {f}")
    return outputs.panel_figure(
        panels,
        titles,
        path,
        f"{s.layer}: top {k} activations on {s.split} (projection | input patch)",
    )


def render_image(result: dict, s: Settings, path: str) -> np.ndarray:
    """The input and its strongest maps' projections saved as PNG; returns the figure."""
    shown = [outputs.display(result["image"], s.pixels)]
    titles = ["input (center crop)"]
    for i, f in enumerate(result["features"]):
        shown.append(outputs.stretch(result["projection"][i]))
        titles.append(f"{s.layer} map {f}: {result['activation'][i]:.3g}")
    return outputs.panel_figure(shown, titles, path, f"{os.path.basename(s.image)}: {s.layer}")


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=deconv` (the request and the workdir's data/model config)."""

    layer: str
    image: str  # '' = a top-k scan of `split`; else the file whose strongest maps to show
    split: str  # the scanned split ('' with `image`)
    top_k: int
    features: tuple[int, ...]  # maps shown (() = a seeded subset of `num_features`)
    num_features: int  # seeded maps (scan) or strongest maps (image); <= 0: all
    seed: int
    pixels: preprocess.Pixels  # the model inputs' normalization (load and display images)
    crop_size: int
    resize_size: int

    @property
    def stem(self) -> str:
        """The output names' stem: `top<k>_<split>` or `image_<file name>`."""
        if self.image:
            return f"image_{os.path.splitext(os.path.basename(self.image))[0]}"
        return f"top{self.top_k}_{self.split}"


def settings(config, request: base.Request) -> Settings:
    """`config.analysis.deconv` checked. Raises UsageError: bad top_k, features or image
    file; DataError: unknown split. The layer and the features are checked against the
    model by `resolve`."""
    c = config.analysis.deconv
    if isinstance(c.top_k, bool) or not isinstance(c.top_k, int) or c.top_k < 1:
        raise UsageError(f"--top_k must be at least 1; got {c.top_k}")
    data = config.data
    s = Settings(
        layer=str(c.layer),
        image=str(c.image),
        split="" if c.image else base.analysis_split(config),
        top_k=int(c.top_k),
        features=parse_features(c.features, "config.analysis.deconv.features"),
        num_features=int(c.num_features),
        seed=int(config.seed),
        pixels=preprocess.pixels(data),
        crop_size=int(data.crop_size),
        resize_size=int(data.resize_size),
    )
    if s.image:
        load_image(s.image, s.resize_size, s.crop_size, s.pixels)  # readable: refused now if not
    else:
        total = inputs.check_split(data, s.split)
        if s.top_k > total:
            raise UsageError(
                f"--top_k={s.top_k} exceeds the {total} images of split {s.split!r}: "
                f"use at most {total}"
            )
    return s


def resolve(s: Settings, model, source) -> Settings:
    """The layer (default: the model's last conv layer) checked against the model, and the
    features against its width.

    Raises:
      UsageError: a layer that is not a conv, pool or activation layer of the model, or
        features out of range.
    """
    valid = deconv.valid_layers(model)
    layer = base.check_layer(s.layer or graph.conv_layers(model)[-1], valid)
    try:
        form, why = deconv.projection_form(model, layer)
    except NotImplementedError as e:
        raise UsageError(f"--layer={layer}: {e}") from None
    if form == "rule":
        print(f"{layer}: projections in the backward-rule form ({why})")
    print(rules.way_down_line(rules.way_down(model, layer)))
    if s.features and not s.image:
        num_maps = int(graph.find(model, layer).output.shape[-1])
        select_features(num_maps, s.features, s.num_features, s.seed)
    return dataclasses.replace(s, layer=layer)


def outputs_of(s: Settings):
    """WORKDIR/deconv/<layer>/<stem>.png and .json."""
    return os.path.join(MODE, s.layer), (f"{s.stem}.png", f"{s.stem}.json")


@dataclasses.dataclass
class Data:
    """What the projections are of: the split's batches (a scan) or one image."""

    dataset: object = None  # callable -> tf.data.Dataset of (images, labels) center crops
    total: int = 0  # images in the split
    image: np.ndarray | None = None  # (H, W, 3) model input of `--image`


def load(config, s: Settings, model) -> Data:
    if s.image:
        return Data(image=load_image(s.image, s.resize_size, s.crop_size, s.pixels))
    return Data(
        dataset=lambda: inputs.build_inputs(config, s.split, mode="center"),
        total=inputs.check_split(config.data, s.split),
    )


def compute(model, data: Data, s: Settings) -> dict:
    """`strongest_maps` of the image, or `top_k` over the split (with a progress bar);
    adds 'num_images' (scan) or 'image' (the model input)."""
    record = {"form": deconv.projection_form(model, s.layer)[0]}
    record["way_down"] = rules.way_down(model, s.layer)
    if data.image is not None:
        found = strongest_maps(model, data.image, s.layer, s.num_features)
        return {"image": data.image, **found, **record}
    with tqdm.tqdm(total=data.total, desc=f"scan {s.layer} on {s.split}", unit="img") as bar:
        result = top_k(
            model,
            data.dataset,
            s.layer,
            s.top_k,
            s.features,
            s.num_features,
            s.seed,
            progress=bar.update,
        )
    return {**result, "num_images": int(data.total), **record}


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """<stem>.png and <stem>.json; the figure for TensorBoard (deconv/<layer>/<stem>)."""
    png, index_path = paths[f"{s.stem}.png"], paths[f"{s.stem}.json"]
    if s.image:
        figure = render_image(result, s, png)
        rows = [
            {
                "feature": int(f),
                "activation": float(result["activation"][i]),
                "y": int(result["y"][i]),
                "x": int(result["x"][i]),
            }
            for i, f in enumerate(result["features"])
        ]
        index = {"image": s.image, "layer": s.layer, "strongest": rows}
        index |= {"form": result["form"], "way_down": result["way_down"]}
    else:
        figure = render_top_k(result, s, png)
        index = {
            "layer": s.layer,
            "split": s.split,
            "k": s.top_k,
            "num_images": result["num_images"],
            "receptive_field": result["receptive_field"],
            "features": result["features"],
            "winners": result["winners"],
            "form": result["form"],
            "way_down": result["way_down"],  # what the rule did at each activation below
        }
    outputs.save_text(index_path, json.dumps(index, indent=1))
    return base.Report(images={f"{MODE}/{s.layer}/{s.stem}": figure}, summary=index)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=outputs_of,
    load=load,
    compute=compute,
    render=render_outputs,
    resolve=resolve,
)
