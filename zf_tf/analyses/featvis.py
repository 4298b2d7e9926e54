"""`--mode=featvis`: each selected unit's own picture, an input optimized to excite it
(`zf_tf.core.featvis`: a 1/f Fourier parameterization in decorrelated colour, random
jitter, scale and rotation at every step, Adam), many units per call.

    python main.py --mode=featvis --layer=conv5             # 16 seeded units of conv5
    python main.py --mode=featvis --layer=conv3 --num_features=0     # every unit
    python main.py --mode=featvis --layer=conv4 --features=3,7 \
        --config.analysis.featvis.negative=true --config.analysis.featvis.steps=512

The colour decorrelation is the square root of the colour covariance of the model's
training images (`config.analysis.featvis.color_images` center crops of the train split),
ImageNet's when `color_images=0`. Units: `--features` (a comma list), else
`--num_features` seeded ones (<= 0: every unit), as in --mode=deconv.

Outputs in `WORKDIR/featvis/<layer>/`, named by the objective (`channel`, `neuron`, with
`_negative`): `<stem>.png` (a grid, each image captioned with its unit and the objective
it reached), `<stem>.npz` (uint8 images, units, values at the start and the end) and
`<stem>.json`. Batches of units are cached in `WORKDIR/featvis/cache/` as they finish, so a
killed run resumes where it stopped and a rerun with the same model and settings redoes
nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tqdm

from zf_tf import outputs
from zf_tf.analyses import atlas_site, base, deconv
from zf_tf.core import featvis, graph
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs, preprocess

MODE = "featvis"
DEFAULTS = {
    "steps": 256,
    "learning_rate": 0.05,
    "objective": "channel",
    "negative": False,
    "batch_size": 32,  # units optimized together (one image each)
    "color_images": 256,  # training images whose colour covariance decorrelates; 0: ImageNet's
}


@dataclasses.dataclass(frozen=True)
class Settings:
    layer: str
    features: str
    num_features: int
    params: featvis.Params
    batch_size: int
    pixels: preprocess.Pixels
    color_split: str
    color_images: int
    cache_dir: str
    units: tuple = ()  # filled in by `resolve`

    @property
    def stem(self) -> str:
        return self.params.objective + ("_negative" if self.params.negative else "")


def _integer(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UsageError(
            f"config.analysis.featvis.{name}={value!r}: give an integer of at least {least}"
        )
    return value


def settings(config, request: base.Request) -> Settings:
    """Raises UsageError: steps, batch size or image count out of range, an unknown
    objective, a bad learning rate or --features."""
    s = outputs.analysis_settings(config, MODE, DEFAULTS)
    steps = _integer(s["steps"], "steps", 1)
    batch = _integer(s["batch_size"], "batch_size", 1)
    color_images = _integer(s["color_images"], "color_images", 0)
    if s["objective"] not in featvis.OBJECTIVES:
        raise UsageError(
            f"config.analysis.featvis.objective={s['objective']!r}: choose one of "
            f"{', '.join(featvis.OBJECTIVES)}"
        )
    rate = s["learning_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise UsageError(f"config.analysis.featvis.learning_rate={rate!r}: give a number > 0")
    if not isinstance(s["negative"], bool):
        raise UsageError(f"config.analysis.featvis.negative={s['negative']!r}: give true or false")
    deconv.parse_features(request.features)
    data = config.data
    split = data.train_split
    if color_images:
        inputs.check_split(data, split)
    return Settings(
        layer=request.layer,
        features=request.features,
        num_features=int(request.num_features),
        params=featvis.Params(
            steps=steps,
            learning_rate=float(rate),
            objective=s["objective"],
            negative=s["negative"],
            seed=int(config.seed),
        ),
        batch_size=batch,
        pixels=preprocess.pixels(data),
        color_split=split,
        color_images=color_images,
        cache_dir=os.path.join(request.workdir, MODE, "cache"),
    )


def resolve(s: Settings, model, source) -> Settings:
    """The layer (default: the last conv layer) and its units.

    Raises:
      UsageError: an unknown layer, the neuron objective on a layer without spatial maps,
        features out of range.
    """
    valid = featvis.valid_layers(model)
    layer = s.layer or graph.conv_layers(model)[-1]
    if layer not in valid:
        raise UsageError(f"--layer={layer!r} is not valid: choose one of {', '.join(valid)}")
    shape = graph.find(model, layer).output.shape
    if s.params.objective == "neuron" and len(shape) != 4:
        raise UsageError(
            f"--layer={layer}: the neuron objective needs spatial maps, and {layer} gives "
            f"{tuple(shape[1:])}: use config.analysis.featvis.objective=channel"
        )
    units = deconv.select_features(int(shape[-1]), s.features, s.num_features, s.params.seed)
    return dataclasses.replace(s, layer=layer, units=tuple(units))


def outputs_of(s: Settings):
    return os.path.join(MODE, s.layer), tuple(f"{s.stem}.{ext}" for ext in ("png", "npz", "json"))


@dataclasses.dataclass
class Data:
    color: np.ndarray  # (3, 3): the colour covariance's square root
    covariance: np.ndarray | None  # (3, 3) measured; None: ImageNet's


def load(config, s: Settings, model) -> Data:
    if not s.color_images:
        return Data(featvis.IMAGENET_COLOR_SQRT, None)
    found = base.load_examples(config, s.color_split, s.color_images)
    covariance = featvis.color_covariance(s.pixels.display(found.images))
    return Data(featvis.color_sqrt(covariance), covariance)


def _cache_key(fingerprint: str, s: Settings, data: Data, units) -> str:
    what = {
        "recipe": featvis.RECIPE,
        "weights": fingerprint,
        "layer": s.layer,
        "params": dataclasses.asdict(s.params),
        "color": np.round(data.color, 6).tolist(),
        "pixels": [s.pixels.kind, list(s.pixels.mean)],
        "units": [int(u) for u in units],
    }
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def compute(model, data: Data, s: Settings) -> dict:
    """Each unit's optimized image, a batch of `batch_size` units at a time (cached).

    Returns:
      dict: units (U,), image uint8 (U, S, S, 3), value and start (U,): the objective on
      the final image and on the random start, color (3, 3), covariance.
    """
    units = list(s.units)
    batches = [units[i : i + s.batch_size] for i in range(0, len(units), s.batch_size)]
    optimizer = None
    to_input = lambda x: s.pixels.normalize(x * 255.0)  # noqa: E731
    fingerprint = base.weights_fingerprint(model)  # once: it reads every weight
    parts = []
    with tqdm.tqdm(
        total=len(units) * s.params.steps, desc=f"featvis {s.layer}", unit="step"
    ) as bar:
        for batch in batches:
            key = _cache_key(fingerprint, s, data, batch)
            name = f"{atlas_site.slug(s.layer)}_{s.stem}_{batch[0]:05d}.npz"
            path = os.path.join(s.cache_dir, name)
            cached = base.read_cache(path, key)
            if cached is None:
                if optimizer is None:
                    optimizer = featvis.Optimizer(model, s.layer, to_input, s.params, data.color)
                size = len(batch)
                out = optimizer.run(batch, progress=lambda n, size=size: bar.update(n * size))
                cached = {
                    "image": np.round(out["image"] * 255).astype(np.uint8),
                    "value": out["value"],
                    "start": out["start"],
                }
                base.write_cache(path, key, **cached)
            else:
                bar.update(len(batch) * s.params.steps)
            parts.append(cached)
    return {
        "units": np.asarray(units),
        **{k: np.concatenate([p[k] for p in parts]) for k in ("image", "value", "start")},
        "color": data.color,
        "covariance": data.covariance,
    }


def render(result: dict, s: Settings, paths: dict) -> base.Report:
    plt = outputs.pyplot()
    units, images, values = result["units"], result["image"], result["value"]
    columns = int(np.ceil(np.sqrt(len(units))))
    rows = int(np.ceil(len(units) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, u, image, v in zip(axes.ravel(), units, images, values):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{u}: {v:.3g}", fontsize=7)
    kind = "minimized" if s.params.negative else "maximized"
    fig.suptitle(f"{s.layer}: {s.params.objective} objective {kind}, {s.params.steps} steps")
    picture = outputs.save_figure(fig, paths[f"{s.stem}.png"])
    outputs.save_npz(
        paths[f"{s.stem}.npz"],
        units=units,
        image=images,
        value=values,
        start=result["start"],
        color=result["color"],
    )
    summary = {
        "layer": s.layer,
        "params": dataclasses.asdict(s.params),
        "color": "ImageNet's" if result["covariance"] is None else f"{s.color_images} images",
        "units": [
            {"unit": int(u), "value": float(v), "start": float(b)}
            for u, v, b in zip(units, values, result["start"])
        ],
    }
    outputs.save_text(paths[f"{s.stem}.json"], json.dumps(summary, indent=1))
    better = int(np.sum(values > result["start"]))
    lines = [
        f"Feature visualization of {len(units)} unit(s) of {s.layer}: {better} beyond their start"
    ]
    return base.Report(images={f"{MODE}/{s.layer}": picture}, lines=lines, summary=summary)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=outputs_of,
    load=load,
    compute=compute,
    render=render,
    resolve=resolve,
)
