"""`--mode=deconv`: top-k deconvnet projections over a dataset (paper Fig. 2), or the
strongest feature maps of one image, as PNG panels, an index JSON and TensorBoard images.

Outputs go to `WORKDIR/deconv/<layer>/`: `top<k>_<split>.png` + `top<k>_<split>.json`
for a dataset scan, `image_<name>.png` + `.json` for `--image`. Existing outputs are
never replaced unless `overwrite`.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf
import tqdm

from pipelines import inputs, preprocess
from zf_tf import outputs
from zf_tf.core import deconv, topk
from zf_tf.core.errors import UsageError


def select_features(num_maps: int, features: str, num_features: int, seed: int) -> list[int]:
    """Feature maps to show: an explicit comma list, else a seeded random subset
    (`num_features` <= 0 means all)."""
    if features:
        try:
            chosen = [int(f) for f in features.split(",") if f.strip()]
        except ValueError:
            raise UsageError(
                f"--features must be comma-separated integers; got {features!r}"
            ) from None
        bad = [f for f in chosen if not 0 <= f < num_maps]
        if bad:
            raise UsageError(f"--features {bad} out of range: the layer has maps 0..{num_maps - 1}")
        return chosen
    if num_features <= 0 or num_features >= num_maps:
        return list(range(num_maps))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_maps, size=num_features, replace=False).tolist())


def top_k_panels(
    config,
    workdir: str,
    model,
    layer: str,
    split: str,
    k: int = 9,
    features: str = "",
    num_features: int = 16,
    overwrite: bool = False,
    batch_size: int = 64,
) -> dict:
    """Scans a split for each feature map's top-k activations and renders Fig. 2 panels.

    Returns:
      {'png': path, 'json': path, 'features': [...], 'num_images': N}.
    """
    out_dir = os.path.join(workdir, "deconv", layer)
    png = os.path.join(out_dir, f"top{k}_{split}.png")
    index_path = os.path.join(out_dir, f"top{k}_{split}.json")
    outputs.check_free([png, index_path], overwrite)
    dn = deconv.build_deconvnet(model, layer)  # validates the layer name first

    def dataset():
        return inputs.build_inputs(config, split, mode="center")

    total = inputs.num_examples(config.data, split)
    with tqdm.tqdm(total=total, desc=f"scan {layer} on {split}", unit="img") as bar:
        best = topk.scan(model, layer, dataset(), k=k, progress=bar.update)
    chosen = select_features(best.activation.shape[1], features, num_features, config.seed)
    images = topk.gather_images(dataset(), best.image[:, chosen])
    order = sorted(images)
    slot = {i: n for n, i in enumerate(order)}
    rows = best.records(chosen)
    result = deconv.project(
        dn,
        np.stack([images[i] for i in order]),
        np.array([slot[r["image"]] for r in rows], np.int32),
        np.array([r["feature"] for r in rows], np.int32),
        np.array([r["y"] for r in rows], np.int32),
        np.array([r["x"] for r in rows], np.int32),
        batch_size=batch_size,
    )
    size = deconv.receptive_field_size(model, layer)
    side = min(size, config.data.crop_size)
    panels, titles = [], []
    for f in chosen:
        idx = [n for n, r in enumerate(rows) if r["feature"] == f]
        proj, patch = [], []
        for n in idx:
            r = rows[n]
            box = deconv.receptive_field(model, layer, r["y"], r["x"])
            r["box"] = [int(b) for b in box]
            p = outputs.stretch(result["projection"][n])
            proj.append(outputs.field_patch(p, box, side))
            img = outputs.display(images[r["image"]], config.data.mean)
            patch.append(outputs.field_patch(img, box, side))
        while len(proj) < k:  # fewer images than k in a tiny split
            proj.append(np.full((side, side, 3), 0.5, np.float32))
            patch.append(np.full((side, side, 3), 0.5, np.float32))
        g = int(np.ceil(np.sqrt(k)))
        left = outputs.tile(np.stack(proj), g, pad=2)
        right = outputs.tile(np.stack(patch), g, pad=2)
        gap = np.ones((left.shape[0], 6, 3), np.float32)
        panels.append(np.concatenate([left, gap, right], axis=1))
        titles.append(f"{layer} map {f}")
    os.makedirs(out_dir, exist_ok=True)
    figure = outputs.panel_figure(
        panels, titles, png, f"{layer}: top {k} activations on {split} (projection | input patch)"
    )
    index = {
        "layer": layer,
        "split": split,
        "k": k,
        "num_images": int(total),
        "receptive_field": size,
        "features": chosen,
        "winners": rows,
    }
    with open(index_path, "w") as fh:
        json.dump(index, fh, indent=1)
    outputs.write_tensorboard(workdir, "deconv", f"deconv/{layer}/top{k}_{split}", figure)
    print(f"Wrote {png} and {index_path}")
    return {"png": png, "json": index_path, "features": chosen, "num_images": int(total)}


def load_image(path: str, config) -> np.ndarray:
    """A photo file as the model's center-crop input (float32, mean subtracted)."""
    try:
        encoded = tf.io.read_file(path)
        image = preprocess.center_crop(
            encoded, config.data.resize_size, config.data.crop_size, config.data.mean
        )
        return image.numpy()
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise UsageError(f"cannot read image {path}: {message}") from None


def image_panels(
    config,
    workdir: str,
    model,
    layer: str,
    image_path: str,
    num_features: int = 9,
    overwrite: bool = False,
) -> dict:
    """Projects the `num_features` strongest feature maps of one image of any size.

    Returns:
      {'png': path, 'json': path, 'features': [...]}.
    """
    dn = deconv.build_deconvnet(model, layer)
    image = load_image(image_path, config)
    stem = os.path.splitext(os.path.basename(image_path))[0]
    out_dir = os.path.join(workdir, "deconv", layer)
    png = os.path.join(out_dir, f"image_{stem}.png")
    index_path = os.path.join(out_dir, f"image_{stem}.json")
    outputs.check_free([png, index_path], overwrite)
    tap = keras.Model(model.inputs, model.get_layer(layer).output)
    act = tap(image[None], training=False).numpy()[0]
    strength = act.reshape(-1, act.shape[-1]).max(axis=0)
    n = act.shape[-1] if num_features <= 0 else min(num_features, act.shape[-1])
    chosen = np.argsort(-strength)[:n].tolist()
    result = deconv.project(
        dn,
        image[None],
        np.zeros(n, np.int32),
        np.array(chosen, np.int32),
        np.full(n, -1, np.int32),
        np.full(n, -1, np.int32),
    )
    shown = [outputs.display(image, config.data.mean)]
    titles = ["input (center crop)"]
    for i, f in enumerate(chosen):
        shown.append(outputs.stretch(result["projection"][i]))
        titles.append(f"{layer} map {f}: {result['activation'][i]:.3g}")
    os.makedirs(out_dir, exist_ok=True)
    figure = outputs.panel_figure(shown, titles, png, f"{os.path.basename(image_path)}: {layer}")
    rows = [
        {
            "feature": int(f),
            "activation": float(result["activation"][i]),
            "y": int(result["y"][i]),
            "x": int(result["x"][i]),
        }
        for i, f in enumerate(chosen)
    ]
    with open(index_path, "w") as fh:
        json.dump({"image": image_path, "layer": layer, "strongest": rows}, fh, indent=1)
    outputs.write_tensorboard(workdir, "deconv", f"deconv/{layer}/image_{stem}", figure)
    print(f"Wrote {png} and {index_path}")
    return {"png": png, "json": index_path, "features": chosen}
