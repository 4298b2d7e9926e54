"""`--mode=filters`: ZFNet's layer 1 (7x7, stride 2) against AlexNet's (11x11, stride 4), as in
paper Fig. 6.

The paper chose the smaller, denser first layer after visualizing AlexNet's: its 11x11/4
filters are a mix of very high and very low frequencies with little in between, some are
dead, and the large stride aliases the second layer's features. This mode puts the two
side by side for the workdir's model and a comparison model trained with
`--config.model.layer1=alexnet` (`--compare=DIR`, default `WORKDIR/ablate/alexnet_layer1`):

- the layer-1 filters (each stretched to [0, 1] on its own);
- layer-2 projections: for a seeded set of layer-2 maps, the strongest activation over the
  validation split projected to pixel space by the deconvnet, cropped to its receptive field;
- dead layer-1 filters, by two criteria: (i) near-zero weights, RMS below
  `rms_threshold` times the layer's largest filter RMS; (ii) never active, the filter's
  maximum layer-1 output (ZFNet: after its ReLU) over the split at most `active_epsilon`.

Layer 1 and layer 2 are `config.analysis.filters.layers`, by default the model's first and
second conv layers (ZFNet: conv1 and conv2); layer 1 must be a conv layer on the RGB image.
With --model, the model brought along takes the workdir model's place; the comparison model
always uses its own first and second conv layers.

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

from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core import deconv, graph, topk
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs
from zf_tf.training import workdirs

MODE = "filters"
OUTPUTS = ("filters.png", "filters.json")
COMPARE_DEFAULT = os.path.join("ablate", "alexnet_layer1")  # where --mode=ablate trains it


def model_layers(model, layers=("", "")) -> tuple[str, str]:
    """(layer 1, layer 2) of `layers`, '' = the model's first and second conv layers.

    Raises:
      UsageError: fewer than 2 conv layers; a layer 1 that is not a plain conv layer on the
        RGB image (3 input channels), a layer 2 that is not a conv layer (naming the valid
        ones).
    """
    convs = graph.conv_layers(model)
    l1 = layers[0] or (convs[0] if convs else "")
    l2 = layers[1] or second_conv(model)
    rgb = [n for n in convs if _rgb_conv(graph.find(model, n).layer)]
    base.check_layer(
        l1,
        rgb,
        "config.analysis.filters.layers: layer 1 ",
        problem="is not a conv layer on the RGB image (a Conv2D with 3 input channels)",
        none="choose one of none",
    )
    base.check_layer(l2, convs, "config.analysis.filters.layers: layer 2 ")
    return l1, l2


def _rgb_conv(layer) -> bool:
    return (
        isinstance(layer, keras.layers.Conv2D)
        and int(layer.kernel.shape[2]) == 3
        and int(getattr(layer, "groups", 1)) == 1
    )


def _conv(model, layer: str):
    return graph.find(model, layer or graph.first_conv(model)).layer


def layer1_geometry(model: keras.Model, layer: str = "") -> dict:
    """Layer 1's ('' = the first conv layer) kernel size, stride and number of filters."""
    conv1 = _conv(model, layer)
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
    layer: str = "",
) -> dict:
    """Dead layer-1 filters of a model, by weight RMS and by activity on a dataset.

    Args:
      model: the classifier.
      dataset: batches of (images, labels) or images: the images to check activity on.
      rms_threshold: a filter is dead by weight if its RMS is below this fraction of the
        layer's largest filter RMS (all are dead if every filter is exactly zero).
      active_epsilon: a filter is never active if its largest output (ZFNet's conv1: after
        its ReLU) over the whole dataset is at most this.
      progress: optional callable(num_images) per batch.
      layer: layer 1 ('' = the model's first conv layer).

    Returns:
      {'rms': (F,) float64 per-filter RMS, 'max_activation': (F,) float32,
       'dead_rms': sorted int indices, 'never_active': sorted int indices}.
    """
    layer = layer or graph.first_conv(model)
    kernel = _conv(model, layer).get_weights()[0]
    rms = outputs.kernel_rms(kernel)
    top = rms.max()
    dead_rms = np.flatnonzero(rms < rms_threshold * top) if top > 0 else np.arange(len(rms))
    best = topk.scan(model, layer, dataset, k=1, progress=progress)
    max_activation = np.where(best.image[0] >= 0, best.activation[0], 0.0).astype(np.float32)
    return {
        "rms": rms,
        "max_activation": max_activation,
        "dead_rms": dead_rms.tolist(),
        "never_active": np.flatnonzero(max_activation <= active_epsilon).tolist(),
    }


def second_conv(model) -> str:
    """The model's second conv layer (ZFNet's conv2).

    Raises:
      UsageError: the model has fewer than 2 conv layers.
    """
    convs = graph.conv_layers(model)
    if len(convs) < 2:
        raise UsageError(
            f"--mode=filters needs a model with 2 conv layers; {model.name!r} has "
            f"{len(convs)}: {', '.join(convs) or 'none'}"
        )
    return convs[1]


def conv2_features(model: keras.Model, num: int, seed: int, layer: str = "") -> list[int]:
    """A seeded subset of `num` maps of layer 2 ('' = the second conv layer; all if fewer);
    the same for equal widths."""
    maps = int(graph.find(model, layer or second_conv(model)).output.shape[-1])
    if num <= 0 or num >= maps:
        return list(range(maps))
    rng = np.random.default_rng([int(seed), 2])
    return sorted(rng.choice(maps, size=num, replace=False).tolist())


def layer2_projections(
    model: keras.Model, dataset, features, progress=None, layer: str = ""
) -> dict:
    """The strongest activation of each chosen layer-2 map over a dataset, projected.

    Args:
      model: the classifier.
      dataset: (images, labels) batches in a fixed order (read twice: scan, then gather).
      features: layer-2 map indices.
      progress: optional callable(num_images) per batch of the scan.
      layer: layer 2 ('' = the model's second conv layer).

    Returns:
      {'cells': (F, side, side, 3) float32 in [0, 1], the projections cropped to their
       receptive field and stretched; 'winners': [{feature, image, y, x, activation, box}]}.
    """
    layer = layer or second_conv(model)
    best = topk.scan(model, layer, dataset, k=1, progress=progress)
    chosen = np.asarray(features, np.int32)
    image = best.image[0, chosen]
    found = topk.gather_images(dataset, image)
    order = sorted(found)
    slot = {i: n for n, i in enumerate(order)}
    result = deconv.project(
        deconv.build_deconvnet(model, layer),
        np.stack([found[i] for i in order]),
        np.array([slot[int(i)] for i in image], np.int32),
        chosen,
        best.y[0, chosen],
        best.x[0, chosen],
    )
    crop = int(model.inputs[0].shape[1])
    side = min(graph.receptive_field_size(model, layer), crop)
    cells, winners = [], []
    for n, f in enumerate(chosen):
        y, x = int(result["y"][n]), int(result["x"][n])
        box = graph.receptive_field(model, layer, y, x)
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
    rms_threshold: float = 0.01,
    active_epsilon: float = 1e-6,
    name: str = "",
    layers=("", ""),
):
    """Dead filters, layer-1 filters and layer-2 projections of one model.

    Args:
      model: the classifier.
      dataset, total: from `scan_dataset`.
      features: layer-2 map indices to project.
      rms_threshold, active_epsilon: the dead-filter criteria (`dead_filters`).
      name: for the progress bar.
      layers: (layer 1, layer 2), '' = the model's first and second conv layers.

    Returns:
      A dict: the `dead_filters` result plus 'geometry', 'kernel' (layer-1 kernel),
      'layer2' (`layer2_projections`), 'num_images', 'layers' (the two names).
    """
    l1, l2 = model_layers(model, layers)
    with tqdm.tqdm(total=2 * total, desc=f"filters: {name}", unit="img") as bar:
        dead = dead_filters(
            model,
            dataset,
            rms_threshold,
            active_epsilon,
            progress=bar.update,
            layer=l1,
        )
        layer2 = layer2_projections(model, dataset, features, progress=bar.update, layer=l2)
    return {
        **dead,
        "geometry": layer1_geometry(model, l1),
        "kernel": _conv(model, l1).get_weights()[0],
        "layer2": layer2,
        "num_images": total,
        "layers": [l1, l2],
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
            "layers": list(r.get("layers", ("conv1", "conv2"))),
        }
    first = {m["layers"][0] for m in models.values()}
    layer1 = first.pop() if len(first) == 1 else "layer-1"  # ZFNet and AlexNet: conv1
    return {
        "split": split,
        "num_images": rows[0][2]["num_images"],
        "criteria": {
            "rms": f"filter RMS < {rms_threshold} x the layer's largest",
            "never_active": f"max {layer1} activation over the split <= {active_epsilon}",
        },
        "models": models,
    }


def _train_comparison(compare: str) -> str:
    return (
        f"`python main.py --mode=train --config.model.layer1=alexnet --workdir={compare}` "
        "(or pass --compare=DIR)"
    )


def compare_workdir(workdir: str, compare: str) -> str:
    """The comparison workdir: `--compare` (which must hold a model), else
    WORKDIR/ablate/alexnet_layer1 if it holds one, else '' (no comparison row).

    Raises:
      UsageError: `--compare` has no trained model; names the command that trains one.
    """
    if not compare:
        default = os.path.join(workdir, COMPARE_DEFAULT)
        return default if os.path.exists(workdirs.checkpoint_path(default)) else ""
    if not os.path.exists(workdirs.checkpoint_path(compare)):
        raise UsageError(
            f"no AlexNet-style layer-1 model in {compare}: train one with "
            + _train_comparison(compare)
        )
    return compare


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=filters` (config.analysis.filters and the request)."""

    workdir: str
    compare: str  # the AlexNet-style layer-1 workdir, checked to hold a model ('' = none)
    split: str
    num_images: int  # the first images of the split only (0: all)
    rms_threshold: float
    active_epsilon: float
    layer2_features: int
    seed: int
    layer1: str  # row label: config.model.layer1 (or its arch; --model: the model's name)
    layers: tuple[str, str] = ("", "")  # layer 1, layer 2; '' = the model's (`resolve`)
    origin: str = "this workdir"  # its row label's suffix ('--model' for a model brought along)


def settings(config, request) -> Settings:
    """Raises UsageError: no model in the comparison workdir, layers not a pair; DataError:
    unknown split. The layers are checked against the model by `resolve`."""
    s = config.analysis.filters
    compare = compare_workdir(request.workdir, str(s.compare))
    split = base.analysis_split(config)
    inputs.check_split(config.data, split)
    layers = tuple(str(n) for n in s.layers)
    if len(layers) != 2:
        raise UsageError(
            f"config.analysis.filters.layers={layers}: give 2 names (layer 1, layer 2; '' = "
            "the model's own)"
        )
    return Settings(
        workdir=request.workdir,
        compare=compare,
        split=split,
        num_images=base.integer(config, MODE, least=0),
        rms_threshold=float(s.rms_threshold),
        active_epsilon=float(s.active_epsilon),
        layer2_features=int(s.layer2_features),
        seed=int(config.seed),
        layer1=_row_label(config.model),
        layers=layers,
    )


def _row_label(model_config) -> str:
    """config.model.layer1 ('zfnet' or 'alexnet') for ZFNet, else the architecture's name."""
    arch = str(model_config.arch)
    return str(model_config.layer1) if arch == "zfnet" else arch


def resolve(s: Settings, model, source) -> Settings:
    """The layers ('' = the model's first and second conv layers) checked against the
    model; a model brought along (--model) labels its row by its name.

    Raises:
      UsageError: as `model_layers`, or a layer 2 the deconvnet cannot project.
    """
    l1, l2 = model_layers(model, s.layers)
    try:
        deconv.projection_form(model, l2)  # a fused activation the rules cannot reach
    except NotImplementedError as e:
        raise UsageError(f"config.analysis.filters.layers: layer 2 {l2}: {e}") from None
    s = dataclasses.replace(s, layers=(l1, l2))
    if source is not None and source.model is not None:  # brought along, not the workdir's
        s = dataclasses.replace(s, layer1=model.name, origin="--model")
    return s


@dataclasses.dataclass
class Data:
    """The comparison model and the images each model scans."""

    other: keras.Model | None  # None: no comparison workdir
    other_layer1: str  # the comparison workdir's config.model.layer1
    dataset: object  # this workdir's center-crop batches (`scan_dataset`)
    total: int
    other_dataset: object  # the same, unless the comparison model's input differs
    other_total: int


def load(config, s: Settings, model) -> Data:
    dataset, total = scan_dataset(config, s.split, s.num_images)
    if not s.compare:
        return Data(None, "", dataset, total, None, 0)
    other = workdirs.load_model(s.compare)
    other_config = workdirs.load_config(s.compare, config)
    # Both models see the same images (this workdir's data), unless their inputs differ.
    if other.inputs[0].shape[1:] == model.inputs[0].shape[1:]:
        other_dataset, other_total = dataset, total
    else:
        other_dataset, other_total = scan_dataset(other_config, s.split, s.num_images)
    return Data(
        other=other,
        other_layer1=_row_label(other_config.model),
        dataset=dataset,
        total=total,
        other_dataset=other_dataset,
        other_total=other_total,
    )


def compute(model, data: Data, s: Settings) -> dict:
    """`analyse` of both models on the same layer-2 maps (the comparison model: its own
    first and second conv layers).

    Returns:
      {'results': [(label, workdir, `analyse` dict)] this workdir first, 'summary': the
      filters.json record}.
    """
    features = conv2_features(model, s.layer2_features, s.seed, s.layers[1])
    if data.other is not None:
        other_layer2 = second_conv(data.other)
        if max(features) >= int(graph.find(data.other, other_layer2).output.shape[-1]):
            features = conv2_features(data.other, s.layer2_features, s.seed, other_layer2)
    labels = (f"{s.layer1} ({s.origin})", f"{data.other_layer1} (compare workdir)")
    thresholds = (s.rms_threshold, s.active_epsilon)
    results = [
        (
            labels[0],
            s.workdir,
            analyse(model, data.dataset, data.total, features, *thresholds, labels[0], s.layers),
        )
    ]
    if data.other is not None:
        results.append(
            (
                labels[1],
                s.compare,
                analyse(
                    data.other,
                    data.other_dataset,
                    data.other_total,
                    features,
                    *thresholds,
                    labels[1],
                ),
            )
        )
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
    if not s.compare:
        default = os.path.join(s.workdir, COMPARE_DEFAULT)
        lines.append(
            "No AlexNet-style layer-1 model to compare with (paper Fig. 6): train one with "
            + _train_comparison(default)
        )
    return base.Report(images={f"{MODE}/comparison": image}, lines=lines, summary=record)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
    resolve=resolve,
)
