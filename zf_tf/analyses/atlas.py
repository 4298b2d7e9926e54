"""`--mode=atlas`: every unit of every selected layer, scanned once, projected and browsable
as an offline web site, `WORKDIR/atlas/index.html`.

Three stages, each cached under `WORKDIR/atlas/cache/` so that a killed run resumes where it
stopped, and re-rendering or adding a layer does not redo what is done:

1. **scan**: one streaming pass over the split keeps the top-k activations of every feature
   map of every selected layer not scanned yet (`topk.scan_layers`: one forward pass per
   batch of a multi-output tap), split over the replicas or workers of `--strategy`;
   `cache/<layer>/scan.npz`.
2. **projections**: the deconvnet projection of every winner (each unit's k), batched, with
   the input patch under its receptive field, both on the layer's receptive-field canvas;
   `cache/<layer>/units_<first>.npz` per chunk of `UNITS_PER_CHUNK` units.
3. **site** (`atlas_site`): an index, a page per layer, a page per unit.

Each cache file records a key of what it was computed from (the model's weights, the data
config, the split, k, the layer); a file with another key is recomputed. The site replaces
an existing one only with `--overwrite`; the cache never needs it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time

import numpy as np
import tqdm

from zf_tf import outputs
from zf_tf.analyses import atlas_site, base, featvis
from zf_tf.core import deconv, graph, rules, topk
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs, preprocess
from zf_tf.training import workdirs

MODE = "atlas"
UNITS_PER_CHUNK = 16  # units projected and cached together (the resume granularity)
MAX_POOL_IMAGES = 1024  # distinct winner images held in memory at once (224 px: 0.6 GB)
PROJECT_BATCH = 64  # deconvnet requests per call


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=atlas`."""

    layers: tuple  # () = every conv layer of the model (filled in by `resolve`)
    split: str
    top_k: int
    num_images: int  # images in the split
    pixels: preprocess.Pixels
    crop_size: int
    resize_size: int
    cache_dir: str
    data: dict  # the data config (JSON-able): what the cache keys and the index page show
    description: str = ""  # what the model is (index page)
    command: str = ""  # how the atlas was made (index page)
    pixel_density: int = 2  # stored image px per displayed px (larger canvases are shrunk)
    jpeg_quality: int = 90  # of canvases over atlas_site.EXACT px (smaller ones are PNGs)
    # each unit's feature visualization too (config.analysis.atlas.featvis): --mode=featvis'
    # settings for every unit (its cache shared), one per kind (`featvis_kinds`); () = none
    featvis: tuple = ()


def featvis_kinds(fv) -> tuple:
    """The feature visualizations a unit page shows (`atlas_site.FEATVIS_KINDS`), as (kind,
    --mode=featvis settings): always the maximized image; the negative one too when
    config.analysis.featvis.negative is set, a diverse set when
    config.analysis.featvis.diversity > 1."""
    p = fv.params
    return tuple(
        (
            kind.name,
            dataclasses.replace(
                fv,
                params=dataclasses.replace(
                    p, negative=kind.negative, diversity=p.diversity if kind.diverse else 1
                ),
            ),
        )
        for kind in atlas_site.FEATVIS_KINDS
        if (p.negative or not kind.negative) and (p.diversity > 1 or not kind.diverse)
    )


def parse_layers(layers) -> tuple:
    """`config.analysis.atlas.layers` (names, or a comma list) as a tuple of distinct names
    (() = every conv layer).

    Raises:
      UsageError: an empty name.
    """
    if isinstance(layers, str):  # a config file's "conv3,conv5"
        layers = layers.split(",") if layers.strip() else ()
    names = [str(n).strip() for n in layers]
    if not all(names):
        raise UsageError(
            f"config.analysis.atlas.layers={layers!r} (--layers) has an empty entry: give "
            "comma-separated names"
        )
    return tuple(dict.fromkeys(n for n in names if n))


def settings(config, request: base.Request) -> Settings:
    """`config.analysis.atlas` checked. Raises UsageError: bad top_k or layers, k larger
    than the split; DataError: an unknown split. The layers are checked against the model
    by `resolve`."""
    look = config.analysis.atlas
    top_k = look.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top_k must be at least 1; got {top_k}")
    data = config.data
    split = base.analysis_split(config)
    total = inputs.check_split(data, split)
    if top_k > total:
        raise UsageError(
            f"--top_k={top_k} exceeds the {total} images of split {split!r}: use at most {total}"
        )
    density, quality = look.pixel_density, look.jpeg_quality
    if not isinstance(density, int) or not 1 <= density <= 4:
        raise UsageError(
            f"config.analysis.atlas.pixel_density={density!r}: give 1, 2, 3 or 4 (stored image "
            "pixels per displayed pixel)"
        )
    if not isinstance(quality, int) or not 1 <= quality <= 95:
        raise UsageError(
            f"config.analysis.atlas.jpeg_quality={quality!r}: give an integer from 1 to 95"
        )
    fv = ()
    if look.featvis:  # every unit of each layer, as --mode=featvis --num_features=0
        every = copy.deepcopy(config)
        every.analysis.featvis.num_features, every.analysis.featvis.features = 0, ()
        fv = featvis_kinds(featvis.settings(every, request))
    return Settings(
        layers=parse_layers(look.layers),
        split=split,
        top_k=int(top_k),
        num_images=int(total),
        pixels=preprocess.pixels(data),
        crop_size=int(data.crop_size),
        resize_size=int(data.resize_size),
        cache_dir=os.path.join(request.workdir, MODE, "cache"),
        data=json.loads(data.to_json_best_effort(sort_keys=True)),
        description=request.model or f"the model of {request.workdir}",
        command=" ".join(["python"] + [os.path.basename(sys.argv[0])] + sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("main.py")
        else "",
        pixel_density=density,
        jpeg_quality=quality,
        featvis=fv,
    )


def resolve(s: Settings, model, source) -> Settings:
    """The layers (default: every conv layer) checked against the model: each must be a
    conv, pool or activation layer with a deconvnet inverse.

    Raises:
      UsageError: an unknown layer, or one with no deconvnet inverse (naming the valid ones).
    """
    valid = deconv.valid_layers(model)
    layers = s.layers or tuple(graph.conv_layers(model))
    if not layers:
        raise UsageError("the model has no conv layer: name layers with --layers")
    names = {op.name for op in graph.ops_of(model)}
    for layer in layers:
        if layer not in names:
            raise base.layer_error(
                layer,
                valid,
                "--layers: ",
                problem="is not a layer of the model",
                choose="choose from",
            )
        base.check_layer(
            layer,
            valid,
            "--layers: ",
            problem="has no deconvnet inverse (not a conv, pool or activation layer with "
            "image-shaped maps)",
            choose="choose from",
        )
        try:
            deconv.projection_form(model, layer)
        except NotImplementedError as e:
            raise UsageError(f"--layers: {layer!r}: {e}") from None
    description = getattr(source, "description", "") or s.description
    return dataclasses.replace(s, layers=tuple(layers), description=description)


def outputs_of(s: Settings):
    """WORKDIR/atlas/index.html (the site's other pages lie beside it)."""
    return MODE, ("index.html",)


@dataclasses.dataclass
class Data:
    # callable([input context]) -> a fresh tf.data.Dataset of (images, labels, indices)
    # center crops: of the whole split, or of one input pipeline's share
    dataset: object
    class_names: list
    featvis: object = None  # featvis.Data (the colour decorrelation) when s.featvis


def load(config, s: Settings, model) -> Data:
    return Data(
        dataset=lambda context=None: inputs.build_inputs(
            config, s.split, context, mode="center", indexed=True
        ),
        class_names=base.class_names(config),
        featvis=featvis.load(config, s.featvis[0][1], model) if s.featvis else None,
    )


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def cache_key(fingerprint: str, s: Settings, layer: str) -> str:
    """What a layer's cached scan and projections were computed from."""
    what = {
        "weights": fingerprint,
        "data": s.data,
        "split": s.split,
        "k": s.top_k,
        "layer": layer,
        "num_images": s.num_images,
    }
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def layer_dir(s: Settings, layer: str) -> str:
    return os.path.join(s.cache_dir, atlas_site.slug(layer))


# ---------------------------------------------------------------------------------------------
# Computing: scan, then projections
# ---------------------------------------------------------------------------------------------


def scan(model, data: Data, s: Settings, keys: dict, strategy=None, chief=True) -> dict:
    """{layer: TopK}: cached scans, and one pass over the split for the layers without one."""
    found, missing = {}, []
    for layer in s.layers:
        cached = base.read_cache(os.path.join(layer_dir(s, layer), "scan.npz"), keys[layer])
        if cached is None:
            missing.append(layer)
        else:
            found[layer] = topk.TopK(**cached)
    if missing:
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        distributed = strategy is not None and (replicas > 1 or _multi(strategy))
        desc = f"scan {len(missing)} layer(s) on {s.split}"
        # Split over workers, each reads and decodes only its share of the images.
        total = _share(strategy, s.num_images) if distributed else s.num_images
        with tqdm.tqdm(total=total, desc=desc, unit="img") as bar:
            scanned = topk.scan_layers(
                model,
                missing,
                data.dataset if distributed else data.dataset(),
                k=s.top_k,
                progress=bar.update,
                strategy=strategy if distributed else None,
            )
        for layer, best in scanned.items():
            if chief:
                base.write_cache(
                    os.path.join(layer_dir(s, layer), "scan.npz"),
                    keys[layer],
                    **dataclasses.asdict(best),
                )
            found[layer] = best
    return {layer: found[layer] for layer in s.layers}


def _multi(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    return bool(resolver is not None and resolver.task_type)


def _share(strategy, num_images: int) -> int:
    """How many of the split's images this worker reads: the input pipelines shard the
    split by position (`Dataset.shard`), the chief's pipeline first, then the workers'."""
    if not _multi(strategy):
        return num_images
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    chiefs = len(spec.get("chief", []))
    workers = chiefs + len(spec.get("worker", []))
    me = 0 if resolver.task_type == "chief" else chiefs + int(resolver.task_id)
    return len(range(me, num_images, workers))


def _chunks(num_units: int) -> list[range]:
    return [
        range(a, min(a + UNITS_PER_CHUNK, num_units)) for a in range(0, num_units, UNITS_PER_CHUNK)
    ]


def _chunk_path(s: Settings, layer: str, units: range) -> str:
    return os.path.join(layer_dir(s, layer), f"units_{units.start:05d}.npz")


def _groups(best: topk.TopK, chunks: list[range]) -> list[list[range]]:
    """Chunks grouped so that each group's winners need at most MAX_POOL_IMAGES images
    (a chunk bigger than that forms a group of its own)."""
    groups, current, images = [], [], set()
    for units in chunks:
        wanted = set(best.image[:, units.start : units.stop].ravel().tolist()) - {-1}
        if current and len(images | wanted) > MAX_POOL_IMAGES:
            groups.append(current)
            current, images = [], set()
        current.append(units)
        images |= wanted
    return groups + ([current] if current else [])


def project_units(model, dn, best: topk.TopK, units: range, layer: str, pool, labels, s) -> dict:
    """Projections and input patches of the winners of `units` on the layer's receptive
    field canvas (uint8 (n, k, side, side, 3); empty slots gray), and their labels."""
    side = min(int(graph.receptive_field_size(model, layer)), s.crop_size)
    k, n = best.k, len(units)
    proj = np.full((n, k, side, side, 3), 128, np.uint8)
    patch = np.full((n, k, side, side, 3), 128, np.uint8)
    label = np.full((n, k), -1, np.int64)
    box = np.zeros((n, k, 4), np.int32)
    rows = [(i, r) for i, u in enumerate(units) for r in range(k) if best.image[r, u] >= 0]
    if not rows:
        return {"projection": proj, "patch": patch, "label": label, "box": box}
    order = sorted({int(best.image[r, units[i]]) for i, r in rows})
    where = {image: j for j, image in enumerate(order)}
    stack = np.stack([pool[i] for i in order])
    result = deconv.project(
        dn,
        stack,
        np.array([where[int(best.image[r, units[i]])] for i, r in rows], np.int32),
        np.array([units[i] for i, r in rows], np.int32),
        np.array([best.y[r, units[i]] for i, r in rows], np.int32),
        np.array([best.x[r, units[i]] for i, r in rows], np.int32),
        batch_size=PROJECT_BATCH,
    )
    shown = outputs.display(stack, s.pixels)
    to_uint8 = lambda a: np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    for m, (i, r) in enumerate(rows):
        u, image = units[i], int(best.image[r, units[i]])
        b = tuple(int(v) for v in graph.receptive_field(model, layer, best.y[r, u], best.x[r, u]))
        box[i, r] = b
        proj[i, r] = to_uint8(outputs.field_cell(result["projection"][m], b, side))
        patch[i, r] = to_uint8(outputs.field_patch(shown[where[image]], b, side))
        label[i, r] = labels.get(image, -1)
    return {"projection": proj, "patch": patch, "label": label, "box": box}


def projections(model, data: Data, s: Settings, scans: dict, keys: dict) -> dict:
    """{layer: {label, box, chunks}} of every unit: cached chunks, the rest projected (one
    deconvnet per layer, a gather pass per group of chunks) and cached. The images stay on
    disk: `chunks` is [(units, read)], `read()` -> {projection, patch} of those units."""
    todo = {
        layer: [
            u
            for u in _chunks(best.activation.shape[1])
            if base.read_cache(_chunk_path(s, layer, u), keys[layer], names=()) is None
        ]
        for layer, best in scans.items()
    }
    total = sum(best.activation.shape[1] for best in scans.values())
    remaining = sum(len(u) for chunks in todo.values() for u in chunks)
    with tqdm.tqdm(
        total=total, initial=total - remaining, desc="project units", unit="unit"
    ) as bar:
        for layer, chunks in todo.items():
            if not chunks:
                continue
            best, dn = scans[layer], deconv.build_deconvnet(model, layer)
            for group in _groups(best, chunks):
                wanted = np.concatenate([best.image[:, u.start : u.stop].ravel() for u in group])
                pool, labels = topk.gather_examples(data.dataset(), wanted)
                for units in group:
                    cells = project_units(model, dn, best, units, layer, pool, labels, s)
                    base.write_cache(_chunk_path(s, layer, units), keys[layer], **cells)
                    bar.update(len(units))
    out = {}
    for layer, best in scans.items():
        chunks = _chunks(best.activation.shape[1])
        paths = [_chunk_path(s, layer, u) for u in chunks]
        small = [base.read_cache(p, keys[layer], names=("label", "box")) for p in paths]
        out[layer] = {
            "label": np.concatenate([c["label"] for c in small]),
            "box": np.concatenate([c["box"] for c in small]),
            "chunks": [
                (u, functools.partial(base.read_cache, p, keys[layer], ("projection", "patch")))
                for u, p in zip(chunks, paths)
            ],
        }
    return out


def compute(model, data: Data, s: Settings, strategy=None) -> dict:
    """The scans and projections of every selected layer (cached stages skipped).

    Returns:
      dict: layers {layer: {scan: TopK, label (F, k), box (F, k, 4), chunks [(units,
      read)] with read() -> {projection, patch (units, k, side, side, 3) uint8}, side,
      map_shape, receptive_field, form}}, timings (seconds of
      each stage run here), chief (False on a non-chief worker: it helps scan, writes
      nothing).
    """
    chief = strategy is None or workdirs.is_chief(strategy)
    fingerprint = base.weights_fingerprint(model)
    keys = {layer: cache_key(fingerprint, s, layer) for layer in s.layers}
    start = time.perf_counter()
    scans = scan(model, data, s, keys, strategy, chief)
    scanned = time.perf_counter()
    timings = {"scan": scanned - start}
    visualized = {}
    if s.featvis:  # every worker helps: featvis splits the units over them
        for layer in s.layers:
            units = tuple(range(int(graph.find(model, layer).output.shape[-1])))
            visualized[layer] = {
                kind: featvis.compute(
                    model, data.featvis, dataclasses.replace(fs, layer=layer, units=units), strategy
                )
                for kind, fs in s.featvis
            }
        timings["featvis"] = time.perf_counter() - scanned
    if not chief:
        return {"chief": False, "layers": {}, "timings": timings}
    started = time.perf_counter()
    cells = projections(model, data, s, scans, keys)
    layers = {}
    for layer in s.layers:
        shape = tuple(int(d) for d in graph.find(model, layer).output.shape[1:])
        field = int(graph.receptive_field_size(model, layer))
        layers[layer] = {
            "scan": scans[layer],
            **cells[layer],
            "map_shape": shape if len(shape) == 3 else (1, 1, shape[-1]),
            "receptive_field": field,
            "side": min(field, s.crop_size),  # the canvas of its images
            "form": deconv.projection_form(model, layer)[0],
            "way_down": rules.way_down(model, layer),
        }
    timings["projections"] = time.perf_counter() - started
    for layer, result in visualized.items():
        layers[layer]["featvis"] = result
    return {"chief": True, "layers": layers, "timings": timings, "class_names": data.class_names}


def render(result: dict, s: Settings, paths: dict) -> base.Report:
    """The site (`atlas_site.write`); on a non-chief worker, nothing."""
    if not result["chief"]:
        return base.Report(lines=["Scanned as a non-chief worker: the chief writes the atlas"])
    summary = atlas_site.write(os.path.dirname(paths["index.html"]), result, s)
    below = {r["layer"]: r for records in summary["way_down"].values() for r in records}
    lines = [
        rules.way_down_line(list(below.values())),
        f"Atlas: {summary['units']} units of {len(s.layers)} layer(s), "
        f"{summary['files']} files, {summary['bytes'] / 1e6:.1f} MB; largest page "
        f"{summary['largest_page']} ({summary['largest_page_bytes'] / 1e6:.2f} MB with its images)",
    ]
    return base.Report(lines=lines, summary=summary)


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
