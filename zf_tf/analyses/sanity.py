"""`--mode=sanity`: do the attribution maps depend on the model and on the class at all?

Adebayo et al. 2018 ("Sanity Checks for Saliency Maps"): re-initialize the trained model's
weights layer by layer from the logits down (**cascading randomization**), and each layer
alone (**independent randomization**), and compare every method's maps of the same images
with the trained model's maps. A method whose maps barely change explains the image, not the
model. **Class sensitivity**: the maps for the true class against those for a random other
class (Nie, Zhang & Patel 2018: guided backprop and the deconvnet hardly change).

Similarities, each the mean over the images (scipy and scikit-image, not hand-written):
  spearman       Spearman rank correlation of the two maps (signed values)
  spearman_abs   the same on absolute values
  ssim           structural similarity of the two maps, each scaled to [0, 1]
  hog            Pearson correlation of the HOG features of the two [0, 1] maps
A pair with a constant map has no correlation: it is left out of the mean and counted
(`undefined` in sanity.json).

The trained model is never modified: the randomized models are one copy of it whose weights
are reset to the trained ones and re-drawn (from each layer's own initializers, seeded) for
the layers of each step.

Outputs (WORKDIR/sanity/): sanity.json (every figure), sanity.md (the table), sanity.png
(similarity against the randomized layers, one curve per method: Adebayo's Fig. 2),
cascade.png (one image's maps through the cascade), faithfulness.png (mean deletion and
insertion curves).

**--compare=DIR**: the same maps by the model of another workdir (e.g. one trained on random
labels, `config.data.random_labels_seed`: a model that memorized noise) against this one's.

**Deletion / insertion** (Petsiuk et al. 2018): the class probability as the trained model's
most relevant pixels (by each method's map) are replaced by the data mean, or inserted into a
blurred copy of the image, in `steps` steps; the area under each curve, beside a random order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref

import keras
import numpy as np
import tqdm

from zf_tf import outputs
from zf_tf.analyses import attribution, base
from zf_tf.core import deconv, graph
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs, preprocess
from zf_tf.training import workdirs

MODE = "sanity"
OUTPUTS = ("sanity.json", "sanity.md", "sanity.png", "cascade.png", "faithfulness.png")
METRICS = ("spearman", "spearman_abs", "ssim", "hog")
TITLES = {
    "spearman": "Spearman rank corr.",
    "spearman_abs": "Spearman rank corr. (abs)",
    "ssim": "SSIM",
    "hog": "HOG corr.",
}
MIN_SIDE = 7  # maps smaller than this have no SSIM and no HOG similarity (NaN)
PROJECTION = "projection"  # the deconvnet projections of chosen units' top activations
BLUR_SIGMA_AT_224 = 5.0  # insertion starts from the image blurred so (Petsiuk et al. 2018)


# ---------------------------------------------------------------------------------------------
# Similarity of two maps
# ---------------------------------------------------------------------------------------------


def unit_scale(m) -> np.ndarray:
    """A map scaled to [0, 1] by its min and max (a constant map: zeros)."""
    m = np.nan_to_num(np.asarray(m, np.float64))
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def _hog(m) -> np.ndarray:
    from skimage.feature import hog

    side = min(m.shape)
    cell = max(2, side // 8)
    return hog(m, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))


def similarity(a, b) -> dict:
    """{metric: value} of two (H, W) maps; NaN where a correlation is undefined (a constant
    map or feature vector) and SSIM and HOG of maps under MIN_SIDE px."""
    from scipy import stats
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)

    def corr(fn, x, y):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            return float("nan")
        return float(fn(x, y).statistic)

    ua, ub = unit_scale(np.abs(a)), unit_scale(np.abs(b))
    out = {
        "spearman": corr(stats.spearmanr, a.ravel(), b.ravel()),
        "spearman_abs": corr(stats.spearmanr, np.abs(a).ravel(), np.abs(b).ravel()),
        "ssim": float("nan"),
        "hog": float("nan"),
    }
    if min(a.shape) >= MIN_SIDE:  # SSIM's 7 x 7 window; HOG's 2 x 2 cells of >= 2 px
        out["ssim"] = float(structural_similarity(ua, ub, data_range=1.0))
        out["hog"] = corr(stats.pearsonr, _hog(ua), _hog(ub))
    return out


def mean_similarity(maps_a, maps_b) -> dict:
    """{metric: mean over the images}, and {'undefined': {metric: pairs left out}}."""
    rows = [similarity(a, b) for a, b in zip(maps_a, maps_b)]
    out, undefined = {}, {}
    for metric in METRICS:
        values = np.array([r[metric] for r in rows], np.float64)
        defined = values[np.isfinite(values)]
        out[metric] = float(defined.mean()) if len(defined) else float("nan")
        undefined[metric] = int(len(values) - len(defined))
    out["undefined"] = undefined
    return out


# ---------------------------------------------------------------------------------------------
# Randomized copies
# ---------------------------------------------------------------------------------------------


def weight_layers(model) -> list[str]:
    """Names of the layers holding weights, from the output down (the cascade's order)."""
    names = []
    for op in graph.ops_of(model):
        layer = op.layer
        if getattr(layer, "weights", None) and layer.name not in names:
            names.append(layer.name)
    return names[::-1]


def _layer(model, name: str):
    return graph.find(model, name).layer


def _initializer(layer, variable, seed: int):
    """The layer's own initializer of `variable` (kernel_initializer for 'kernel', ...),
    seeded; None where the layer has none."""
    init = getattr(layer, f"{variable.name}_initializer", None)
    if init is None:
        return None
    init = keras.initializers.get(init)
    config = init.get_config()
    if "seed" in config:
        config["seed"] = seed
    return type(init).from_config(config)


class Randomizer:
    """One copy of the model whose named layers can be re-initialized; `model` itself is
    only read."""

    def __init__(self, model, seed: int):
        self.seed, self.order = seed, weight_layers(model)
        self.copy = keras.models.clone_model(model)
        self.trained = [np.array(w) for w in model.get_weights()]
        self.copy.set_weights(self.trained)

    def randomize(self, layers) -> keras.Model:
        """The copy with the trained weights, except `layers`: re-drawn (seeded by layer)."""
        self.copy.set_weights(self.trained)
        for name in layers:
            layer = _layer(self.copy, name)
            base_seed = self.seed + 1000 * self.order.index(name)
            for j, variable in enumerate(layer.weights):
                init = _initializer(layer, variable, base_seed + j)
                if init is not None:
                    value = init(tuple(variable.shape), dtype=variable.dtype)
                else:  # no initializer: a normal draw of the trained values' scale
                    rng = np.random.default_rng(base_seed + j)
                    std = float(np.std(np.asarray(variable))) or 1.0
                    value = rng.normal(0.0, std, tuple(variable.shape))
                variable.assign(np.asarray(value, variable.dtype))
        return self.copy


# ---------------------------------------------------------------------------------------------
# Deletion and insertion (Petsiuk et al. 2018)
# ---------------------------------------------------------------------------------------------


def relevance_order(m) -> np.ndarray:
    """Pixel indices (row-major) from the most relevant down (ties: the earlier pixel; NaN
    last)."""
    flat = np.nan_to_num(np.asarray(m, np.float64).ravel(), nan=-np.inf)
    return np.argsort(-flat, kind="stable")


def blurred(image, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(image, np.float32), sigma=(sigma, sigma, 0))


def deletion_insertion(probabilities, image, label: int, order, fill, base, steps: int):
    """(deletion, insertion) curves, each (steps + 1,): the probability of class `label` as
    the pixels of `order` are replaced by `fill` (deletion) / put into `base` (insertion),
    len(order) * i / steps of them at step i."""
    h, w, _ = image.shape
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(int)
    rank = np.empty(h * w, np.int64)
    rank[order] = np.arange(h * w)
    masks = (rank[None, :] < counts[:, None]).reshape(steps + 1, h, w, 1)  # moved pixels
    deleted = np.where(masks, np.asarray(fill, np.float32), image)
    inserted = np.where(masks, image, base)
    probs = probabilities(np.concatenate([deleted, inserted]).astype(np.float32))[:, label]
    return probs[: steps + 1], probs[steps + 1 :]


def auc(curve) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoids)."""
    curve = np.asarray(curve, np.float64)
    return float(np.sum((curve[1:] + curve[:-1]) / 2) / (len(curve) - 1))


def faithfulness(model, images, classes, maps: dict, s) -> dict:
    """{order: {'deletion', 'insertion': (N, steps + 1)}} for each method's maps and for a
    random order (seeded): the class probability as pixels go, most relevant first."""
    probabilities = attribution.probabilities_fn(model)
    rng = np.random.default_rng(s.seed)
    size = images.shape[1]
    sigma = BLUR_SIGMA_AT_224 * size / 224
    fill = np.asarray(s.maps.occluder_fill, np.float32)  # the data mean, as model input
    orders = {m: [relevance_order(v) for v in maps[m]] for m in maps}
    orders["random"] = [rng.permutation(size * size) for _ in images]
    bases = [blurred(x, sigma) for x in images]  # each image's insertion start, once
    out = {}
    for name, per_image in orders.items():
        curves = [
            deletion_insertion(probabilities, x, int(c), o, fill, b, s.steps)
            for x, c, o, b in zip(images, classes, per_image, bases)
        ]
        out[name] = {
            "deletion": np.stack([d for d, _ in curves]),
            "insertion": np.stack([i for _, i in curves]),
        }
    return out


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    methods: tuple
    split: str
    num_images: int
    maps: attribution.MapSettings
    seed: int
    pixels: object
    num_classes: int
    steps: int = 20  # deletion / insertion: pixels removed / inserted in this many steps
    projection_layer: str = ""  # its units' projections are compared too ('' = last conv)
    projection_units: int = 8  # how many (its most active on the images); 0 = none
    class_names: tuple = ()
    labels: bool = True  # the split's labels are the model's classes; False: predicted ones
    compare: str = ""  # --compare: a workdir whose model's maps are compared too


def settings(config, request: base.Request) -> Settings:
    """Raises UsageError: unknown methods, fewer than 2 images or classes."""

    s = config.analysis.sanity
    methods = tuple(str(m) for m in s.methods)
    bad = [m for m in methods if m not in attribution.METHODS]
    if bad or not methods:
        raise UsageError(
            f"config.analysis.sanity.methods: {bad[0] if bad else 'empty'!r} is not a method: "
            f"choose from {', '.join(attribution.METHODS)}"
        )
    steps = s.steps
    if not isinstance(steps, int) or steps < 2:
        raise UsageError(f"config.analysis.sanity.steps={steps!r}: give an integer of at least 2")
    units = s.projection_units
    if not isinstance(units, int) or units < 0:
        raise UsageError(f"config.analysis.sanity.projection_units={units!r}: give 0 or more")
    num = s.num_images
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise UsageError(f"--num_images={num}: the sanity checks need at least 2 images")
    split = base.analysis_split(config)
    inputs.check_split(config.data, split)
    compare = str(s.compare)
    if compare and not os.path.exists(workdirs.checkpoint_path(compare)):
        raise UsageError(
            f"--compare={compare}: no trained model there ({workdirs.checkpoint_path(compare)} "
            "missing); a model that memorized random labels: python main.py --mode=train "
            f"--workdir={compare} --config.data.random_labels_seed=0"
        )
    return Settings(
        compare=compare,
        methods=methods,
        split=split,
        num_images=num,
        maps=attribution.map_settings(config),
        seed=int(config.seed),
        pixels=preprocess.pixels(config.data),
        num_classes=int(config.data.num_classes),
        steps=steps,
        projection_layer=str(s.projection_layer),
        projection_units=units,
        class_names=tuple(base.class_names(config)),
    )


def resolve(s: Settings, model, source) -> Settings:
    """The CAM layer and the classes as `attribution.resolve` checks them."""
    try:
        num_classes = graph.num_outputs(model)
    except ValueError as e:
        raise UsageError(f"--mode=sanity: {e}") from None
    if num_classes < 2:
        raise UsageError("--mode=sanity: class sensitivity needs a model with 2 or more classes")
    cam = attribution.cam_layer(model, s.methods, s.maps.cam_layer)
    convs = graph.conv_layers(model)
    layer = s.projection_layer or (convs[-1] if convs else "")
    if s.projection_units:
        base.check_layer(
            layer,
            deconv.valid_layers(model),
            "config.analysis.sanity.projection_layer=",
            after=" (or projection_units=0)",
        )
        maps = graph.find(model, layer).output.shape[-1]
        if s.projection_units > maps:
            raise UsageError(
                f"config.analysis.sanity.projection_units={s.projection_units} exceeds the "
                f"{maps} maps of {layer}"
            )
    return dataclasses.replace(
        s,
        projection_layer=layer,
        maps=dataclasses.replace(s.maps, cam_layer=cam),
        num_classes=num_classes,
        labels=source is None or source.labels_apply(s.split),
    )


def outputs_of(s: Settings):
    return MODE, OUTPUTS


@dataclasses.dataclass
class Data:
    examples: object  # zf_tf.pipelines.examples.Examples
    compare: object = None  # the --compare workdir's model


def load(config, s: Settings, model) -> Data:
    """The images, and the --compare model (which must take the same inputs and classes).

    Raises:
      UsageError: a --compare model of another input shape or number of classes.
    """
    other = None
    if s.compare:
        other = workdirs.load_model(s.compare)
        if tuple(other.input_shape) != tuple(model.input_shape) or graph.num_outputs(
            other
        ) != graph.num_outputs(model):
            raise UsageError(
                f"--compare={s.compare}: its model takes {other.input_shape} with "
                f"{graph.num_outputs(other)} classes, this one {model.input_shape} with "
                f"{graph.num_outputs(model)}: compare models of the same data"
            )
    return Data(base.load_examples(config, s.split, s.num_images), other)


def other_classes(labels, num_classes: int, seed: int) -> np.ndarray:
    """For each label a different class, drawn uniformly (seeded)."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, num_classes, size=len(labels))
    return (np.asarray(labels) + shift) % num_classes


def unit_requests(model, layer: str, images, num_units: int) -> dict:
    """The `num_units` maps of `layer` with the largest maxima over the images (the trained
    model's), each with the image and location of its maximum (first in row-major order)."""
    act = graph.tap(model, [layer])(images, training=False)
    act = np.asarray(act[0] if isinstance(act, (list, tuple)) else act, np.float32)
    n, h, w, f = act.shape
    flat = act.transpose(3, 0, 1, 2).reshape(f, -1)  # (F, N*h*w)
    where = flat.argmax(axis=1)
    units = np.argsort(-flat.max(axis=1), kind="stable")[:num_units]
    image, y, x = np.unravel_index(where[units], (n, h, w))
    return {"unit": units, "image": image, "y": y, "x": x}


_DECONVNETS = weakref.WeakKeyDictionary()


def unit_projections(model, layer: str, images, requests: dict) -> np.ndarray:
    """(U, s, s) max over channels of |deconvnet projection| of each request, by `model`.

    Both forms of the deconvnet run the model's own layers (the explicit one its filters,
    the rule form `rules.rule_tap`), so one built on the randomized copy projects with
    whatever weights the copy holds now: built once per model and layer.
    """
    dn = _DECONVNETS.get(model)
    if dn is None or dn[0] != layer:
        dn = _DECONVNETS[model] = (layer, deconv.build_deconvnet(model, layer))
    out = deconv.project(
        dn[1],
        images,
        requests["image"].astype(np.int32),
        requests["unit"].astype(np.int32),
        requests["y"].astype(np.int32),
        requests["x"].astype(np.int32),
    )
    return attribution.max_abs_channels(out["projection"])


def compute(model, data: Data, s: Settings) -> dict:
    """Maps of the trained model, of each cascade step and each layer alone, and of other
    classes; their similarities to the trained model's maps.

    Returns:
      dict: layers (from the output down), original {method: (N, s, s)}, cascade
      [{method: maps}] (step i: layers[: i + 1] randomized), independent [{method: maps}]
      (step i: layers[i] alone), other_class {method: maps}, classes, others, and
      similarity {cascade: {method: [per-step {metric...}]}, independent: ..., class: {method:
      {metric...}}, compare (with --compare): {method: {metric...}}}.
    """
    examples = data.examples
    layers = weight_layers(model)
    if s.labels:
        classes = np.asarray(examples.labels, np.int64)
    else:  # a model brought along, or unlabeled images: the predicted class
        classes = attribution.probabilities_fn(model)(examples.images).argmax(axis=1)
    others = other_classes(classes, s.num_classes, s.seed)
    randomizer = Randomizer(model, s.seed)
    compared, requests = list(s.methods), None
    if s.projection_units:
        requests = unit_requests(model, s.projection_layer, examples.images, s.projection_units)
        compared.append(PROJECTION)
    steps = 2 + 2 * len(layers) + (data.compare is not None)
    with tqdm.tqdm(total=steps * len(examples), desc="sanity", unit="img") as bar:

        def maps(m, c, projections=True):
            out = attribution.attribution_maps(
                m, examples.images, c, s.methods, s.maps, s.seed, bar.update
            )
            if requests is not None and projections:
                out[PROJECTION] = unit_projections(m, s.projection_layer, examples.images, requests)
            return out

        original = maps(model, classes)
        other = maps(model, others, projections=False)  # a unit's projection has no class
        cascade = [maps(randomizer.randomize(layers[: i + 1]), classes) for i in range(len(layers))]
        independent = [maps(randomizer.randomize([layer]), classes) for layer in layers]
        compare = None if data.compare is None else maps(data.compare, classes)
    faith = faithfulness(model, examples.images, classes, {m: original[m] for m in s.methods}, s)
    sim = {
        "cascade": {m: [mean_similarity(original[m], st[m]) for st in cascade] for m in compared},
        "independent": {
            m: [mean_similarity(original[m], st[m]) for st in independent] for m in compared
        },
        "class": {m: mean_similarity(original[m], other[m]) for m in s.methods},
    }
    if compare is not None:
        sim["compare"] = {m: mean_similarity(original[m], compare[m]) for m in compared}
    return {
        "compared": compared,
        "requests": requests,
        "layers": layers,
        "images": examples.images,
        "indices": examples.indices,
        "classes": classes,
        "others": others,
        "original": original,
        "other_class": other,
        "cascade": cascade,
        "independent": independent,
        "similarity": sim,
        "faithfulness": faith,
    }


def _round(x, digits=3):
    return None if not np.isfinite(x) else round(float(x), digits)


def _title(m: str, s, short: bool = False) -> str:
    if m != PROJECTION:
        return attribution.TITLES[m]
    if short:
        return f"{s.projection_layer} projection"
    return f"deconvnet projection of {s.projection_units} {s.projection_layer} units"


def table(result: dict, s: Settings) -> str:
    """One row per method: the similarities after the full cascade (every layer random),
    the mean over the independent steps, and for another class."""
    sim, rows = result["similarity"], []
    f = lambda x: "–" if not np.isfinite(x) else f"{x:.2f}"
    for m in result["compared"]:
        full = sim["cascade"][m][-1]
        alone = {k: np.nanmean([st[k] for st in sim["independent"][m]]) for k in METRICS}
        other = sim["class"].get(m, {"spearman_abs": np.nan, "ssim": np.nan})
        rows.append(
            [_title(m, s)]
            + [f(full[k]) for k in METRICS]
            + [f(alone["spearman_abs"]), f(alone["ssim"])]
            + [f(other["spearman_abs"]), f(other["ssim"])]
            + ([f(sim["compare"][m][k]) for k in ("spearman_abs", "ssim")] if s.compare else [])
        )
    header = (
        ["method"]
        + [f"all random: {TITLES[k]}" for k in METRICS]
        + ["one layer random: Spearman (abs)", "one layer random: SSIM"]
        + ["other class: Spearman (abs)", "other class: SSIM"]
        + (["--compare model: Spearman (abs)", "--compare model: SSIM"] if s.compare else [])
    )
    return outputs.markdown_table(header, rows)


def faithfulness_table(result: dict, s: Settings) -> str:
    """One row per method and one for a random order: mean AUC of the deletion curve (lower:
    the map found the evidence) and of the insertion curve (higher is better)."""
    rows = []
    for name, curves in result["faithfulness"].items():
        title = attribution.TITLES.get(name, "random order (baseline)")
        d = np.mean([auc(c) for c in curves["deletion"]])
        i = np.mean([auc(c) for c in curves["insertion"]])
        rows.append([title, f"{d:.3f}", f"{i:.3f}"])
    return outputs.markdown_table(["method", "deletion AUC (lower: better)", "insertion AUC"], rows)


def _faithfulness_figure(result: dict, s: Settings, path: str) -> np.ndarray:
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    x = np.linspace(0, 1, s.steps + 1)
    for col, kind in enumerate(("deletion", "insertion")):
        ax = axes[0, col]
        for name, curves in result["faithfulness"].items():
            mean = curves[kind].mean(axis=0)
            style = dict(color="black", ls="--") if name == "random" else {}
            label = attribution.TITLES.get(name, "random order")
            ax.plot(x, mean, label=f"{label} ({auc(mean):.2f})", **style)
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("class probability")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{kind} (mean over {len(result['classes'])} images; AUC)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return outputs.save_figure(fig, path)


def _curves(result: dict, s: Settings, path: str) -> np.ndarray:
    plt = outputs.pyplot()
    layers, sim = result["layers"], result["similarity"]
    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.3 * len(METRICS), 6.4), squeeze=False)
    x = np.arange(len(layers) + 1)
    for row, kind in enumerate(("cascade", "independent")):
        for col, metric in enumerate(METRICS):
            ax = axes[row, col]
            for m in result["compared"]:
                values = [1.0] + [st[metric] for st in sim[kind][m]]
                style = dict(color="black", ls=":") if m == PROJECTION else {}
                ax.plot(x, values, marker="o", markersize=3, label=_title(m, s), **style)
            ax.axhline(0, color="#999", lw=0.6)
            ax.set_xticks(x)
            ax.set_xticklabels(["none"] + layers, rotation=60, fontsize=7)
            ax.set_ylim(-0.3 if metric != "ssim" else 0, 1.05)
            title = "cascade, from the logits down" if kind == "cascade" else "one layer alone"
            ax.set_title(f"{TITLES[metric]}: {title}", fontsize=8)
    axes[0, 0].set_ylabel("similarity to the trained model's maps", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="lower left")
    fig.suptitle(
        f"Model randomization test (Adebayo et al. 2018): mean over {len(result['classes'])} "
        f"images of split {s.split}",
        fontsize=10,
    )
    fig.tight_layout()
    return outputs.save_figure(fig, path)


def _cascade_grid(result: dict, s: Settings, path: str, image: int = 0) -> np.ndarray:
    plt = outputs.pyplot()
    layers = result["layers"]
    cols = 2 + len(layers)
    fig, axes = plt.subplots(
        len(result["compared"]),
        cols,
        figsize=(1.2 * cols, 1.25 * len(result["compared"]) + 0.6),
        squeeze=False,
    )
    for r, m in enumerate(result["compared"]):
        # A method's maps of the image; the projection row: unit 0's, on its top image.
        row, shown = (0, int(result["requests"]["image"][0])) if m == PROJECTION else (image,) * 2
        shown = outputs.display(result["images"][shown], s.pixels)
        panels = [result["original"][m][row]] + [st[m][row] for st in result["cascade"]]
        axes[r, 0].imshow(shown, interpolation="nearest")
        axes[r, 0].set_ylabel(_title(m, s, short=True), fontsize=7)
        for c, panel in enumerate(panels, start=1):
            axes[r, c].imshow(attribution.display_scale(np.abs(panel)), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title("trained" if c == 1 else f"..{layers[c - 2]}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Cascading randomization of one image's maps (columns: randomized down to)")
    fig.tight_layout()
    return outputs.save_figure(fig, path)


def _rounded(v: dict) -> dict:
    return {k: _round(v[k]) for k in METRICS} | {"undefined": v["undefined"]}


def _steps(result: dict, kind: str, key: str) -> dict:
    """{method: [{key: layer, metric: value..., undefined}]} of one kind of randomization."""
    sim = result["similarity"][kind]
    return {
        m: [{key: layer, **_rounded(v)} for layer, v in zip(result["layers"], sim[m])]
        for m in result["compared"]
    }


def render(result: dict, s: Settings, paths: dict) -> base.Report:
    sim = result["similarity"]
    summary = {
        "split": s.split,
        "num_images": int(len(result["classes"])),
        "image_indices": np.asarray(result["indices"]).tolist(),
        "methods": list(s.methods),
        "layers_from_the_output_down": result["layers"],
        "metrics": list(METRICS),
        "cascade": _steps(result, "cascade", "randomized_down_to"),
        "independent": _steps(result, "independent", "randomized"),
        "other_class": {m: {k: _round(sim["class"][m][k]) for k in METRICS} for m in s.methods},
        "faithfulness": {
            name: {
                "deletion_auc": _round(np.mean([auc(c) for c in curves["deletion"]])),
                "insertion_auc": _round(np.mean([auc(c) for c in curves["insertion"]])),
                "deletion_curve": [_round(v) for v in curves["deletion"].mean(axis=0)],
                "insertion_curve": [_round(v) for v in curves["insertion"].mean(axis=0)],
            }
            for name, curves in result["faithfulness"].items()
        },
        "compare": None
        if not s.compare
        else {
            "workdir": s.compare,
            **{m: _rounded(v) for m, v in sim["compare"].items()},
        },
        "steps": s.steps,
        "cam_layer": s.maps.cam_layer,
        "seed": s.seed,
        "projection": None
        if result["requests"] is None
        else {
            "layer": s.projection_layer,
            **{k: np.asarray(v).tolist() for k, v in result["requests"].items()},
        },
    }
    text = (
        "Randomization and class sensitivity:\n\n"
        + table(result, s)
        + "\nDeletion (pixels replaced by the data mean, most relevant first) and insertion "
        f"(into the image blurred with sigma {BLUR_SIGMA_AT_224:g} px at 224), {s.steps} "
        "steps:\n\n" + faithfulness_table(result, s)
    )
    target = "true" if s.labels else "predicted"
    summary["target"] = target
    header = (
        f"Sanity checks, split {s.split}, {summary['num_images']} images, {target} class; "
        "similarity of each method's maps to the trained model's (1: unchanged).\n\n"
    )
    outputs.save_text(paths["sanity.md"], header + text)
    outputs.save_text(paths["sanity.json"], json.dumps(summary, indent=1))
    curves = _curves(result, s, paths["sanity.png"])
    grid = _cascade_grid(result, s, paths["cascade.png"])
    faith = _faithfulness_figure(result, s, paths["faithfulness.png"])
    return base.Report(
        images={
            f"{MODE}/randomization": curves,
            f"{MODE}/cascade": grid,
            f"{MODE}/faithfulness": faith,
        },
        lines=[text],
        summary=summary,
    )


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=outputs_of,
    load=load,
    compute=compute,
    render=render,
    resolve=resolve,
)
