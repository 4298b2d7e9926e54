"""`--mode=filters`: ZFNet's layer 1 (7x7, stride 2) against AlexNet's (11x11, stride 4), as in
paper Fig. 6.

The paper chose the smaller, denser first layer after visualizing AlexNet's: its 11x11/4
filters are a mix of very high and very low frequencies with little in between, some are
dead, and the large stride aliases the second layer's features. This mode puts the two
side by side for the workdir's model and a comparison model trained with
`--config.model.layer1=alexnet` (`--compare=DIR`, default `WORKDIR/ablate/alexnet_layer1`):

- the layer-1 filters (each stretched to [0, 1] on its own);
- layer-2 projections: for a seeded set of conv2 maps, the strongest activation over the
  validation split projected to pixel space by the deconvnet, cropped to its receptive field;
- dead layer-1 filters, by two criteria: (i) near-zero weights, RMS below
  `rms_threshold` times the layer's largest filter RMS; (ii) never active, the filter's
  maximum conv1 activation (after ReLU) over the split at most `active_epsilon`.

Outputs in `WORKDIR/filters/`: `filters.png` (one row per model: layer-1 filters, layer-2
projections), `filters.json` (dead filters per model and criterion, layer-1 kernel/stride,
per-filter RMS and maximum activation, the layer-2 winners) and a TensorBoard image.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import tqdm

from pipelines import inputs
from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core import deconv, topk
from zf_tf.core.errors import UsageError
from zf_tf.training import workdirs

MODE = "filters"
OUTPUTS = ("filters.png", "filters.json")
COMPARE_DEFAULT = os.path.join("ablate", "alexnet_layer1")  # where --mode=ablate trains it
# For configs without an `analysis.filters` section (configs/zfnet_imagenet.py).
DEFAULTS = {"rms_threshold": 0.01, "active_epsilon": 1e-6, "layer2_features": 16}


def layer1_geometry(model: keras.Model) -> dict:
    """conv1's kernel size, stride and number of filters."""
    conv1 = model.get_layer("conv1")
    return {
        "kernel": int(conv1.kernel_size[0]),
        "stride": int(conv1.strides[0]),
        "filters": int(conv1.filters),
    }


def dead_filters(
    model: keras.Model,
    dataset,
    rms_threshold: float = 0.01,
    active_epsilon: float = 1e-6,
    progress=None,
) -> dict:
    """Dead layer-1 filters of a model, by weight RMS and by activity on a dataset.

    Args:
      model: the classifier.
      dataset: batches of (images, labels) or images: the images to check activity on.
      rms_threshold: a filter is dead by weight if its RMS is below this fraction of the
        layer's largest filter RMS (all are dead if every filter is exactly zero).
      active_epsilon: a filter is never active if its largest conv1 output (after ReLU)
        over the whole dataset is at most this.
      progress: optional callable(num_images) per batch.

    Returns:
      {'rms': (F,) float64 per-filter RMS, 'max_activation': (F,) float32,
       'dead_rms': sorted int indices, 'never_active': sorted int indices}.
    """
    rms = outputs.filter_rms(model)["conv1"]
    top = rms.max()
    dead_rms = np.flatnonzero(rms < rms_threshold * top) if top > 0 else np.arange(len(rms))
    best = topk.scan(model, "conv1", dataset, k=1, progress=progress)
    max_activation = np.where(best.image[0] >= 0, best.activation[0], 0.0).astype(np.float32)
    return {
        "rms": rms,
        "max_activation": max_activation,
        "dead_rms": dead_rms.tolist(),
        "never_active": np.flatnonzero(max_activation <= active_epsilon).tolist(),
    }


def conv2_features(model: keras.Model, num: int, seed: int) -> list[int]:
    """A seeded subset of `num` conv2 maps (all if fewer); the same for equal widths."""
    maps = int(model.get_layer("conv2").output.shape[-1])
    if num <= 0 or num >= maps:
        return list(range(maps))
    rng = np.random.default_rng([int(seed), 2])
    return sorted(rng.choice(maps, size=num, replace=False).tolist())


def layer2_projections(model: keras.Model, dataset, features, progress=None) -> dict:
    """The strongest activation of each chosen conv2 map over a dataset, projected.

    Args:
      model: the classifier.
      dataset: (images, labels) batches in a fixed order (read twice: scan, then gather).
      features: conv2 map indices.
      progress: optional callable(num_images) per batch of the scan.

    Returns:
      {'cells': (F, side, side, 3) float32 in [0, 1], the projections cropped to their
       receptive field and stretched; 'winners': [{feature, image, y, x, activation, box}]}.
    """
    best = topk.scan(model, "conv2", dataset, k=1, progress=progress)
    chosen = np.asarray(features, np.int32)
    image = best.image[0, chosen]
    found = topk.gather_images(dataset, image)
    order = sorted(found)
    slot = {i: n for n, i in enumerate(order)}
    result = deconv.project(
        deconv.build_deconvnet(model, "conv2"),
        np.stack([found[i] for i in order]),
        np.array([slot[int(i)] for i in image], np.int32),
        chosen,
        best.y[0, chosen],
        best.x[0, chosen],
    )
    crop = int(model.inputs[0].shape[1])
    side = min(deconv.receptive_field_size(model, "conv2"), crop)
    cells, winners = [], []
    for n, f in enumerate(chosen):
        y, x = int(result["y"][n]), int(result["x"][n])
        box = deconv.receptive_field(model, "conv2", y, x)
        cells.append(outputs.field_cell(result["projection"][n], box, side))
        winners.append(
            {
                "feature": int(f),
                "image": int(image[n]),
                "y": y,
                "x": x,
                "activation": float(result["activation"][n]),
                "box": [int(b) for b in box],
            }
        )
    return {"cells": np.stack(cells).astype(np.float32), "winners": winners}


def scan_dataset(config, split: str, num_images: int = 0):
    """(center-crop batches of a split in a fixed order, number of images); the first
    `num_images` only if > 0. Built once and iterated several times (cached squares)."""
    ds = inputs.build_inputs(config, split, mode="center")
    total = inputs.num_examples(config.data, split)
    if num_images > 0:
        ds = ds.unbatch().take(num_images).batch(int(config.train.eval_batch_size))
        total = min(total, num_images)
    return ds, int(total)


def analyse(
    model: keras.Model,
    dataset,
    total: int,
    features,
    rms_threshold: float = DEFAULTS["rms_threshold"],
    active_epsilon: float = DEFAULTS["active_epsilon"],
    name: str = "",
):
    """Dead filters, layer-1 filters and layer-2 projections of one model.

    Args:
      model: the classifier.
      dataset, total: from `scan_dataset`.
      features: conv2 map indices to project.
      rms_threshold, active_epsilon: the dead-filter criteria (`dead_filters`).
      name: for the progress bar.

    Returns:
      A dict: the `dead_filters` result plus 'geometry', 'kernel' (conv1 kernel),
      'layer2' (`layer2_projections`), 'num_images'.
    """
    with tqdm.tqdm(total=2 * total, desc=f"filters: {name}", unit="img") as bar:
        dead = dead_filters(
            model,
            dataset,
            rms_threshold,
            active_epsilon,
            progress=bar.update,
        )
        layer2 = layer2_projections(model, dataset, features, progress=bar.update)
    return {
        **dead,
        "geometry": layer1_geometry(model),
        "kernel": model.get_layer("conv1").get_weights()[0],
        "layer2": layer2,
        "num_images": total,
    }


def _row_title(label: str, result: dict) -> str:
    g = result["geometry"]
    return (
        f"{label}: layer 1 {g['kernel']}x{g['kernel']}/{g['stride']}, {g['filters']} filters; "
        f"dead: {len(result['dead_rms'])} by RMS, {len(result['never_active'])} never active"
    )


def render(rows: list[tuple[str, dict]], path: str, title: str) -> np.ndarray:
    """Fig. 6-like figure: one row per model, columns: layer-1 filters, layer-2 projections.

    Returns:
      The saved figure as uint8 (H, W, 3).
    """
    plt = outputs.pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 5 * len(rows)), squeeze=False)
    for (label, result), (left, right) in zip(rows, axes):
        zoom = max(1, 56 // result["geometry"]["kernel"])  # similar on-screen filter size
        left.imshow(outputs.filter_grid(result["kernel"], zoom=zoom), interpolation="nearest")
        left.set_title(f"{label}: layer-1 filters", fontsize=9)
        cells = result["layer2"]["cells"]
        tiled = outputs.tile(cells, int(np.ceil(np.sqrt(len(cells)))), pad=2)
        right.imshow(tiled, interpolation="nearest")
        right.set_title(f"{label}: layer-2 projections (top-1 per map)", fontsize=9)
        for ax in (left, right):
            ax.axis("off")
        left.text(
            0.0, -0.04, _row_title(label, result), transform=left.transAxes, fontsize=8, va="top"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return outputs.save_figure(fig, path, dpi=80)


def summary_json(
    rows: list[tuple[str, str, dict]], split: str, rms_threshold: float, active_epsilon: float
) -> dict:
    """The JSON record: per model, dead filters per criterion, geometry, RMS, winners."""
    models = {}
    for label, workdir, r in rows:
        models[label] = {
            "workdir": workdir,
            "layer1": {**r["geometry"]},
            "dead": {
                "rms": {"count": len(r["dead_rms"]), "indices": r["dead_rms"]},
                "never_active": {"count": len(r["never_active"]), "indices": r["never_active"]},
            },
            "rms": [float(v) for v in r["rms"]],
            "max_activation": [float(v) for v in r["max_activation"]],
            "layer2_winners": r["layer2"]["winners"],
        }
    return {
        "split": split,
        "num_images": rows[0][2]["num_images"],
        "criteria": {
            "rms": f"filter RMS < {rms_threshold} x the layer's largest",
            "never_active": f"max conv1 activation over the split <= {active_epsilon}",
        },
        "models": models,
    }


def compare_workdir(workdir: str, compare: str) -> str:
    """The comparison workdir (`--compare`, default WORKDIR/ablate/alexnet_layer1), checked.

    Raises:
      UsageError: it has no trained model; names the command that trains one.
    """
    compare = compare or os.path.join(workdir, COMPARE_DEFAULT)
    if not os.path.exists(workdirs.checkpoint_path(compare)):
        raise UsageError(
            f"no AlexNet-style layer-1 model in {compare}: train one with `python main.py "
            f"--mode=train --config.model.layer1=alexnet --workdir={compare}` "
            "(or pass --compare=DIR)"
        )
    return compare


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=filters` (config.analysis.filters and the request)."""

    workdir: str
    compare: str  # the AlexNet-style layer-1 workdir, checked to hold a model
    split: str
    num_images: int  # the first images of the split only (0: all)
    rms_threshold: float
    active_epsilon: float
    layer2_features: int
    seed: int
    layer1: str  # this workdir's config.model.layer1 (its row label)


def settings(config, request) -> Settings:
    """Raises UsageError: no model in the comparison workdir; DataError: unknown split."""
    compare = compare_workdir(request.workdir, request.compare)
    split = request.split or config.data.eval_split
    inputs.check_split(config.data, split)
    s = outputs.analysis_settings(config, MODE, DEFAULTS)
    return Settings(
        workdir=request.workdir,
        compare=compare,
        split=split,
        num_images=max(0, int(request.num_images or 0)),
        rms_threshold=float(s["rms_threshold"]),
        active_epsilon=float(s["active_epsilon"]),
        layer2_features=int(s["layer2_features"]),
        seed=int(config.seed),
        layer1=str(config.model.layer1),
    )


@dataclasses.dataclass
class Data:
    """The comparison model and the images each model scans."""

    other: keras.Model
    other_layer1: str  # the comparison workdir's config.model.layer1
    dataset: object  # this workdir's center-crop batches (`scan_dataset`)
    total: int
    other_dataset: object  # the same, unless the comparison model's input differs
    other_total: int


def load(config, s: Settings, model) -> Data:
    other = workdirs.load_model(s.compare)
    other_config = workdirs.load_config(s.compare, config)
    dataset, total = scan_dataset(config, s.split, s.num_images)
    # Both models see the same images (this workdir's data), unless their inputs differ.
    if other.inputs[0].shape[1:] == model.inputs[0].shape[1:]:
        other_dataset, other_total = dataset, total
    else:
        other_dataset, other_total = scan_dataset(other_config, s.split, s.num_images)
    return Data(
        other=other,
        other_layer1=str(other_config.model.layer1),
        dataset=dataset,
        total=total,
        other_dataset=other_dataset,
        other_total=other_total,
    )


def compute(model, data: Data, s: Settings) -> dict:
    """`analyse` of both models on the same conv2 maps.

    Returns:
      {'results': [(label, workdir, `analyse` dict)] this workdir first, 'summary': the
      filters.json record}.
    """
    features = conv2_features(model, s.layer2_features, s.seed)
    if max(features) >= int(data.other.get_layer("conv2").output.shape[-1]):
        features = conv2_features(data.other, s.layer2_features, s.seed)
    labels = (f"{s.layer1} (this workdir)", f"{data.other_layer1} (compare workdir)")
    thresholds = (s.rms_threshold, s.active_epsilon)
    results = [
        (
            labels[0],
            s.workdir,
            analyse(model, data.dataset, data.total, features, *thresholds, labels[0]),
        ),
        (
            labels[1],
            s.compare,
            analyse(
                data.other, data.other_dataset, data.other_total, features, *thresholds, labels[1]
            ),
        ),
    ]
    return {"results": results, "summary": summary_json(results, s.split, *thresholds)}


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """filters.png and filters.json; the figure for TensorBoard; the dead-filter table."""
    results, record = result["results"], result["summary"]
    image = render(
        [(label, r) for label, _, r in results],
        paths["filters.png"],
        f"Layer-1 filters and layer-2 projections on {s.split} (paper Fig. 6)",
    )
    outputs.save_text(paths["filters.json"], json.dumps(record, indent=1) + "\n")
    header = ("model", "layer 1", "filters", "dead (RMS)", "never active")
    table = [
        (
            label,
            f"{r['geometry']['kernel']}x{r['geometry']['kernel']}/{r['geometry']['stride']}",
            r["geometry"]["filters"],
            len(r["dead_rms"]),
            len(r["never_active"]),
        )
        for label, _, r in results
    ]
    lines = outputs.markdown_table(header, table).splitlines()
    return base.Report(images={f"{MODE}/comparison": image}, lines=lines, summary=record)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
)
