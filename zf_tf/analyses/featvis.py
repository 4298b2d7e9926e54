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

Under `--strategy=mirrored` or `multi_worker` each batch's units are split over the replicas
of every worker (the images are the ones one device makes); the chief writes the files.

With `config.analysis.featvis.diversity=k` (> 1) each unit gets a set of k images pushed
apart (Lucid's diversity objective), shown as a row per unit.

Outputs in `WORKDIR/featvis/<layer>/`, named by the objective (`channel`, `neuron`, with
`_negative`, `_diverse<k>`): `<stem>.png` (a grid, each image captioned with its unit and
the objective it reached), `<stem>.npz` (uint8 images (U, [k,] S, S, 3), units, values at
the start and the end, the sets' similarity) and `<stem>.json`. Batches of units are
cached in `WORKDIR/featvis/cache/` as they finish, so a killed run resumes where it stopped
and a rerun with the same model and settings redoes nothing.
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
from zf_tf.training import keras_fixes, strategies, workdirs

MODE = "featvis"


@dataclasses.dataclass(frozen=True)
class Settings:
    layer: str
    features: tuple[int, ...]
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
        k = self.params.diversity
        return (
            self.params.objective
            + ("_negative" if self.params.negative else "")
            + (f"_diverse{k}" if k > 1 else "")
        )


def settings(config, request: base.Request) -> Settings:
    """Raises UsageError: steps, batch size or image count out of range, an unknown
    objective, a bad learning rate or --features."""
    s = config.analysis.featvis
    steps = base.integer(config, MODE, "steps")
    batch = base.integer(config, MODE, "batch_size")
    color_images = base.integer(config, MODE, "color_images", least=0)
    if s.objective not in featvis.OBJECTIVES:
        raise UsageError(
            f"config.analysis.featvis.objective={s.objective!r}: choose one of "
            f"{', '.join(featvis.OBJECTIVES)}"
        )
    diversity = base.integer(config, MODE, "diversity")
    rate, weight = s.learning_rate, s.diversity_weight
    for name, value in (("learning_rate", rate), ("diversity_weight", weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"config.analysis.featvis.{name}={value!r}: give a number > 0")
    if not isinstance(s.negative, bool):
        raise UsageError(f"config.analysis.featvis.negative={s.negative!r}: give true or false")
    data = config.data
    split = data.train_split
    if color_images:
        inputs.check_split(data, split)
    return Settings(
        layer=str(s.layer),
        features=deconv.parse_features(s.features, "config.analysis.featvis.features"),
        num_features=int(s.num_features),
        params=featvis.Params(
            steps=steps,
            learning_rate=float(rate),
            objective=s.objective,
            negative=s.negative,
            seed=int(config.seed),
            diversity=diversity,
            diversity_weight=float(weight),
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
    layer = base.check_layer(s.layer or graph.conv_layers(model)[-1], valid)
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


def compute(model, data: Data, s: Settings, strategy=None) -> dict:
    """Each unit's optimized image, a batch of `batch_size` units at a time (cached).

    Under a strategy with several replicas (mirrored, multi_worker), each batch's units are
    split over the replicas of every worker and the images gathered on each; the workers
    compute every batch that one of them lacks, and the chief alone writes the cache.

    Returns:
      dict: units (U,), image uint8 (U * k, S, S, 3) (k = per_unit = params.diversity
      images per unit, a unit's together), value and start (U * k,): the objective on the
      final image and on the random start, with k > 1 similarity (U,) (the diverse sets'
      Gram similarity, `core.featvis`), color (3, 3), covariance, before_rectifier (a
      negative image of a rectified layer: the values are its map's before the rectifier),
      chief (False on a non-chief worker: it renders nothing).
    """
    chief = strategy is None or workdirs.is_chief(strategy)
    if getattr(strategy, "num_replicas_in_sync", 1) == 1 and not _multi_worker(strategy):
        strategy = None  # one replica: no need for the strategy's machinery
    units = list(s.units)
    batches = [units[i : i + s.batch_size] for i in range(0, len(units), s.batch_size)]
    fingerprint = base.weights_fingerprint(model)  # once: it reads every weight
    keys = [_cache_key(fingerprint, s, data, batch) for batch in batches]
    names = [f"{atlas_site.slug(s.layer)}_{s.stem}_{b[0]:05d}.npz" for b in batches]
    paths = [os.path.join(s.cache_dir, name) for name in names]
    parts = [base.read_cache(path, key) for path, key in zip(paths, keys)]
    if _multi_worker(strategy):  # a batch one worker lacks is computed by all of them
        missing = _any_worker(strategy, [p is None for p in parts])
        parts = [None if lacks else p for p, lacks in zip(parts, missing)]
    optimizer = None
    to_input = lambda x: s.pixels.normalize(x * 255.0)  # noqa: E731
    desc = f"featvis {s.layer}"
    if strategy is not None:
        desc += f" on {strategy.num_replicas_in_sync} replicas"
    with tqdm.tqdm(total=len(units) * s.params.steps, desc=desc, unit="step") as bar:
        for i, batch in enumerate(batches):
            if parts[i] is not None:
                bar.update(len(batch) * s.params.steps)
                continue
            if optimizer is None:
                optimizer = featvis.Optimizer(model, s.layer, to_input, s.params, data.color)
            size = len(batch)
            out = optimizer.run(
                batch, progress=lambda n, size=size: bar.update(n * size), strategy=strategy
            )
            parts[i] = {
                "image": np.round(out["image"] * 255).astype(np.uint8),
                **{k: v for k, v in out.items() if k != "image"},  # value, start, similarity
            }
            if chief:
                base.write_cache(paths[i], keys[i], **parts[i])
    return {
        "units": np.asarray(units),
        **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]},
        "per_unit": s.params.diversity,
        "before_rectifier": featvis.before_rectifier(model, s.layer, s.params.negative),
        "color": data.color,
        "covariance": data.covariance,
        "chief": chief,
    }


def _multi_worker(strategy) -> bool:
    return strategy is not None and keras_fixes.is_multi_worker(strategy)


def _any_worker(strategy, flags: list[bool]) -> list[bool]:
    """Each flag or-ed over the workers of `strategy` (one all-reduce)."""
    return [bool(t > 0) for t in strategies.sum_over_replicas(strategy, flags)]


def render(result: dict, s: Settings, paths: dict) -> base.Report:
    if not result["chief"]:
        return base.Report(lines=["Optimized as a non-chief worker: the chief writes the images"])
    plt = outputs.pyplot()
    units, images, values, k = result["units"], result["image"], result["value"], result["per_unit"]
    # one image per unit: a square grid; a diverse set per unit: a row each
    columns = k if k > 1 else int(np.ceil(np.sqrt(len(units))))
    rows = int(np.ceil(len(images) / columns))
    size = (max(1.6 * columns, 4.0), 1.75 * rows + 0.5)
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, u, image, v in zip(axes.ravel(), np.repeat(units, k), images, values):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{u}: {v:.3g}", fontsize=7)
    kind = "minimized" if s.params.negative else "maximized"
    where = f"{s.layer} (before its rectifier)" if result["before_rectifier"] else s.layer
    where += f", a diverse set of {k} per unit" if k > 1 else ""
    fig.suptitle(
        f"{where}\n{s.params.objective} objective {kind}, {s.params.steps} steps", fontsize=10
    )
    picture = outputs.save_figure(fig, paths[f"{s.stem}.png"])
    sets = (len(units), k) if k > 1 else (len(units),)  # a diverse set per unit: (U, k)
    extra = {"similarity": result["similarity"]} if k > 1 else {}
    outputs.save_npz(
        paths[f"{s.stem}.npz"],
        units=units,
        image=images.reshape(sets + images.shape[1:]),
        value=values.reshape(sets),
        start=result["start"].reshape(sets),
        color=result["color"],
        **extra,
    )
    rows = []
    for i, u in enumerate(units):
        row = {"unit": int(u)}
        for name in ("value", "start"):
            mine = result[name][i * k : (i + 1) * k].tolist()
            row[name] = mine if k > 1 else mine[0]
        if k > 1:
            row["similarity"] = float(result["similarity"][i])
        rows.append(row)
    summary = {
        "layer": s.layer,
        "before_rectifier": bool(result["before_rectifier"]),  # the map it optimized
        "params": dataclasses.asdict(s.params),
        "color": "ImageNet's" if result["covariance"] is None else f"{s.color_images} images",
        "units": rows,
    }
    outputs.save_text(paths[f"{s.stem}.json"], json.dumps(summary, indent=1))
    # beyond the start: above it, or below it for the negative objective
    better = int(
        np.sum((values < result["start"]) if s.params.negative else (values > result["start"]))
    )
    made = f"{len(images)} image(s) of {len(units)} unit(s)" if k > 1 else f"{len(units)} unit(s)"
    lines = [f"Feature visualization of {made} of {s.layer}: {better} beyond their start"]
    if k > 1:
        lines.append(
            f"Diverse sets of {k}: Gram similarity {np.mean(result['similarity']):.3g} on "
            f"average (0: all different, {k - 1}: all alike)"
        )
    return base.Report(images={f"{MODE}/{s.layer}": picture}, lines=lines, summary=summary)


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=outputs_of,
    load=load,
    compute=compute,
    render=render,
    resolve=resolve,
    distributed=True,
)
