"""Embedded default dataset: procedurally generated shapes on cluttered backgrounds.

The project needs a dataset that is available offline, is small enough to train a reduced
ZFNet on CPU in minutes, and still *needs* spatial feature learning: colour is independent
of the class and a linear classifier on raw pixels stays far from solving it, while a small
convnet can. Each example also carries an exact ground-truth bounding box and binary mask so
that the occlusion / deconvnet analyses of Zeiler & Fergus (2014) can be scored for
localisation.

The dataset is exposed as a real TFDS builder (``zf_shapes``) so it goes through the same
``tfds`` input pipeline as any other dataset; nothing is downloaded, everything is rendered
from a seed. Example ``i`` of a split is rendered from ``np.random.default_rng([BASE_SEED,
split_seed, i])`` so it is identical whatever the generation order, process or config (the
``tiny`` config is a prefix of ``default``).

The pipelines read it as the source 'embedded' (``EmbeddedSource``: a tfds source whose
split examples also carry their boxes and masks, for the analyses).

Public API:
    CLASS_NAMES, IMAGE_SIZE, render_example, example_rng, builder, load, ZfShapes,
    EmbeddedSource.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import signal
import struct
import sys
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from zf_tf.pipelines import sources, tfds_source

CLASS_NAMES: list[str] = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "semicircle",
    "crescent",
    "arrow",
    "letter_l",
]
IMAGE_SIZE = 80

# 4x supersampling (box-filtered) gives smooth anti-aliased object edges; more costs time and
# changes nothing visible at 80 px.
_SUPERSAMPLE = 4
# Object extent (unrotated diameter of the shape's circumscribed circle) as a fraction of the
# image side. Measured: the longer side of the tight box is 39-68% of the image side for 90% of
# objects (median 52%); smaller objects made the task markedly slower to learn.
_SIZE_RANGE = (0.42, 0.68)
# Fraction of the object's extent that may fall outside the image on each side; keeps
# objects "mostly inside" while not always perfectly framed.
_MAX_OVERHANG = 0.06
# Minimum Euclidean RGB distance (in [0, 1] units) between the object colour and the mean of
# the background it covers, so the object is always visible without colour carrying class.
_MIN_CONTRAST = 0.45
# ...and a minimum luma difference, so the object's outline is visible in every colour channel
# mix (iso-luminant objects are much harder to learn from scratch, without adding anything).
_MIN_LUMA_CONTRAST = 0.25
_BASE_SEED = 20140
_SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}


# --------------------------------------------------------------------------------------
# Shape geometry. Every shape is a list of (polygon, fill) pairs in unit coordinates
# (x right, y down), centred near the origin with circumscribed radius ~1. fill=0 cuts holes,
# which is how the ring and crescent are made.
# --------------------------------------------------------------------------------------


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    pts = np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w)]
        + [(-1, w), (-1, -w), (-w, -w)],
        dtype=np.float64,
    )
    return pts / np.max(np.hypot(pts[:, 0], pts[:, 1]))


def _arrow() -> np.ndarray:
    pts = np.array(
        [
            (-1.0, -0.2),
            (0.1, -0.2),
            (0.1, -0.58),
            (1.0, 0.0),
            (0.1, 0.58),
            (0.1, 0.2),
            (-1.0, 0.2),
        ]
    )
    return pts / np.max(np.hypot(pts[:, 0], pts[:, 1]))


def _semicircle(n: int = 33) -> np.ndarray:
    t = np.linspace(0, np.pi, n)
    pts = np.stack([np.cos(t), np.sin(t) - 0.5], axis=1)  # bbox centred on the origin
    return pts / np.max(np.hypot(pts[:, 0], pts[:, 1]))


def _letter_l(stroke: float = 0.42) -> np.ndarray:
    w = stroke
    pts = np.array(
        [(-0.65, -1), (-0.65 + w, -1), (-0.65 + w, 1 - w), (0.65, 1 - w), (0.65, 1), (-0.65, 1)]
    )
    return pts / np.max(np.hypot(pts[:, 0], pts[:, 1]))


def _crescent(n: int = 64) -> list[tuple[np.ndarray, int]]:
    outer = _regular_polygon(n, 1.0)
    cut = _regular_polygon(n, 0.82) + np.array([0.48, -0.12])
    return [(outer, 255), (cut, 0)]


_CIRCLE = _regular_polygon(64)
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 255)],
    "square": [(_regular_polygon(4, phase=np.pi / 4), 255)],
    "triangle": [(_regular_polygon(3), 255)],
    "star": [(_star(), 255)],
    "cross": [(_cross(), 255)],
    "ring": [(_CIRCLE, 255), (_regular_polygon(64, 0.58), 0)],
    "semicircle": [(_semicircle(), 255)],
    "crescent": _crescent(),
    "arrow": [(_arrow(), 255)],
    "letter_l": [(_letter_l(), 255)],
}
assert list(_SHAPES) == CLASS_NAMES


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (yy, xx) coordinate grids in [0, 1), cached because every layer needs them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field (H, W) float32 in [0, 1]: bicubic upsampling of a coarse grid."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) * (1.0 / max(hi - lo, 1e-6))


def _ramp(size: int, angle: float) -> np.ndarray:
    """Linear ramp (H, W) float32 along direction ``angle``, zero at the image centre."""
    yy, xx = _grid(size)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return xx * c + yy * s - 0.5 * (c + s)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background (H, W, 3) float32 in [0, 1]: noise, stripes, plaid or gradient."""
    kind = int(rng.integers(4))
    if kind == 0:
        t = _smooth_noise(rng, size, int(rng.integers(3, 9)))
    elif kind in (1, 2):
        # Stripes (kind 1) or plaid (kind 2, two stripe sets): strong oriented edges that are
        # unrelated to the object shape, which is what makes the background "clutter".
        t = np.zeros((size, size), np.float32)
        for _ in range(kind):
            angle = rng.uniform(0, np.pi)
            freq = rng.uniform(2.0, 7.0)
            t += np.sin(_ramp(size, angle) * (2 * np.pi * freq) + rng.uniform(0, 2 * np.pi))
        t = t * (0.5 / kind) + 0.5
    else:
        t = _ramp(size, rng.uniform(0, 2 * np.pi))
        lo, hi = float(t.min()), float(t.max())
        t = (t - lo) * (1.0 / max(hi - lo, 1e-6))
    # Low-frequency blotches on every background so no texture type is perfectly regular.
    t = 0.75 * t + 0.25 * _smooth_noise(rng, size, int(rng.integers(3, 7)))
    c1 = rng.random(3, dtype=np.float32)
    # Bounded colour swing keeps the background's local mean meaningful for the contrast
    # constraint on the object colour.
    c2 = np.clip(c1 + rng.uniform(-0.3, 0.3, 3).astype(np.float32), 0.0, 1.0)
    return c1 + t[..., None] * (c2 - c1)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _sample_colors(
    rng: np.random.Generator, n: int, avoid: np.ndarray, min_dist: float, min_luma: float = 0.0
) -> np.ndarray:
    """``n`` uniform RGB colours that stand out from the colour ``avoid`` (rejection sampling).

    A colour is accepted when its Euclidean RGB distance to ``avoid`` is at least ``min_dist``
    and its luma differs by at least ``min_luma``. The proposal distribution is the same for
    every class; only the background decides which proposals are rejected, so the accepted
    colours carry no class information. Proposals are drawn in one batch (cheaper than one
    call per colour, and still deterministic).

    Returns:
        (n, 3) float32 array in [0, 1].
    """
    avoid = np.asarray(avoid, np.float32)
    proposals = rng.random((16 * n + 16, 3), dtype=np.float32)
    luma_gap = np.abs((proposals - avoid) @ _LUMA)
    ok = (((proposals - avoid) ** 2).sum(axis=1) >= min_dist**2) & (luma_gap >= min_luma)
    accepted = proposals[ok][:n]
    if len(accepted) < n:  # practically unreachable; fall back to the most distinct proposals
        accepted = np.concatenate([accepted, proposals[np.argsort(-luma_gap)[: n - len(accepted)]]])
    return accepted


def _paste(dst: np.ndarray, patch: np.ndarray, y0: int, x0: int) -> tuple[slice, slice, tuple]:
    """Slices of ``dst`` and ``patch`` where ``patch`` placed at (y0, x0) overlaps ``dst``."""
    h, w = patch.shape[:2]
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, dst.shape[0]), min(x0 + w, dst.shape[1])
    return slice(ys, ye), slice(xs, xe), (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))


# Distractors are thin and small, so 2x supersampling anti-aliases them well enough and keeps
# their full-image canvases cheap (the object itself uses _SUPERSAMPLE).
_DISTRACTOR_SUPERSAMPLE = 2


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, bg_mean: np.ndarray) -> None:
    """Composite 3-6 small thin strokes / blobs that are none of the classes onto ``canvas``.

    They are smaller and thinner than any object, so they add clutter (edges, colour spots)
    without competing with the object's shape. All of them are rasterised into one
    supersampled RGB canvas and one coverage canvas; a later stroke overwrites earlier ones in
    both, so the box-filtered RGB canvas is exactly the premultiplied colour layer.

    Args:
        rng: randomness source.
        canvas: (H, W, 3) float32 image, modified in place.
        bg_mean: mean background colour; distractor colours keep some distance from it.
    """
    s = _DISTRACTOR_SUPERSAMPLE
    size = canvas.shape[0]
    k = size / IMAGE_SIZE  # distractor dimensions below are in pixels of an 80 px image
    rgb = Image.new("RGB", (size * s, size * s))
    cover = Image.new("L", (size * s, size * s))
    draws = (ImageDraw.Draw(rgb), ImageDraw.Draw(cover))
    n = int(rng.integers(3, 7))
    # All parameters drawn up front: per-call overhead of the generator dominates otherwise.
    colors = _sample_colors(rng, n, bg_mean, 0.3)
    kinds = rng.integers(4, size=n)
    centres = rng.uniform(0, size, (n, 2))
    widths = np.maximum(1, np.round(rng.uniform(1.0, 1.8, n) * k * s)).astype(int)
    u = rng.random((n, 3))
    jitter = rng.random((n, 2, 7))
    for i in range(n):
        fills = (tuple(int(c * 255 + 0.5) for c in colors[i]), 255)
        cx, cy = centres[i]
        width = int(widths[i])
        if kinds[i] == 0:  # straight stroke, 6-16 px
            ang, half = 2 * np.pi * u[i, 0], (3 + 5 * u[i, 1]) * k
            dx, dy = half * np.cos(ang), half * np.sin(ang)
            pts = [((cx - dx) * s, (cy - dy) * s), ((cx + dx) * s, (cy + dy) * s)]
            for d, f in zip(draws, fills):
                d.line(pts, fill=f, width=width)
        elif kinds[i] == 1:  # open arc (60-200 degrees), far from a full ring
            r = (3 + 5 * u[i, 0]) * k
            start = 360 * u[i, 1]
            end = start + 60 + 140 * u[i, 2]
            box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
            for d, f in zip(draws, fills):
                d.arc(box, start, end, fill=f, width=width)
        elif kinds[i] == 2:  # zigzag scribble of 3-4 points within +-7 px
            m = 3 + int(u[i, 0] * 2)
            pts = (np.array([cx, cy]) + 14 * k * (jitter[i, :, :m].T - 0.5)) * s
            pts = [tuple(p) for p in pts]
            for d, f in zip(draws, fills):
                d.line(pts, fill=f, width=width, joint="curve")
        else:  # small irregular blob, radius <= 3.5 px
            t = np.sort(2 * np.pi * jitter[i, 0])
            r = (1.5 + 2 * u[i, 0]) * (0.45 + 0.55 * jitter[i, 1]) * k
            pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1) * s
            pts = [tuple(p) for p in pts]
            for d, f in zip(draws, fills):
                d.polygon(pts, fill=f)
    scale = np.float32(1 / 255)
    premult = np.asarray(rgb.reduce(s), np.float32) * scale
    a = np.asarray(cover.reduce(s), np.float32)[..., None] * scale
    canvas *= 1 - a
    canvas += premult


def _object_alpha(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 of one randomly posed object of class ``label``."""
    s = _SUPERSAMPLE
    parts = _SHAPES[CLASS_NAMES[label]]
    radius = 0.5 * size * rng.uniform(*_SIZE_RANGE)
    aspect = np.exp(rng.uniform(-0.12, 0.12))  # mild stretch; keeps shapes recognisable
    theta = rng.uniform(0, 2 * np.pi)
    c, sn = np.cos(theta), np.sin(theta)
    transform = np.array([[c, -sn], [sn, c]]) @ np.diag([aspect, 1 / aspect]) * radius
    posed = [(pts @ transform.T, fill) for pts, fill in parts]
    # Place by the extent of the filled outline so at most _MAX_OVERHANG of the object's
    # width/height leaves the image on any side.
    outline = np.concatenate([pts for pts, fill in posed if fill])
    lo, hi = outline.min(axis=0), outline.max(axis=0)
    slack = _MAX_OVERHANG * (hi - lo)
    c_lo, c_hi = -lo - slack, size - hi + slack
    centre = rng.uniform(np.minimum(c_lo, c_hi), np.maximum(c_lo, c_hi))
    centre = np.where(c_lo < c_hi, centre, size / 2)  # object larger than the image: centre it
    # Rasterise only the object's pixel footprint (supersampled), then paste it.
    x0, y0 = np.floor(lo + centre).astype(int) - 1
    x1, y1 = np.ceil(hi + centre).astype(int) + 1
    patch = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s))
    draw = ImageDraw.Draw(patch)
    for pts, fill in posed:
        draw.polygon([tuple(p) for p in (pts + centre - (x0, y0)) * s], fill=fill)
    alpha = np.zeros((size, size), np.float32)
    a = np.asarray(patch.reduce(s), np.float32) * np.float32(1 / 255)
    dy_, dx_, src = _paste(alpha, a, y0, x0)
    alpha[dy_, dx_] = a[src]
    return alpha


def render_example(rng: np.random.Generator, label: int, image_size: int = IMAGE_SIZE) -> dict:
    """Render one example of class ``label``.

    Pure numpy/PIL; every random choice comes from ``rng`` so the same generator state always
    yields the same arrays.

    Args:
        rng: source of all randomness for this example.
        label: class index in ``[0, len(CLASS_NAMES))``.
        image_size: side of the square output image in pixels.

    Returns:
        dict with ``image`` uint8 (H, W, 3), ``label`` int, ``bbox`` float32 (4,) normalised
        ``[ymin, xmin, ymax, xmax]`` tightly enclosing the mask, and ``mask`` uint8 (H, W, 1)
        with values 0/255 (object coverage >= 50%, i.e. where the object dominates the pixel).
    """
    label = int(label)
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
    size = int(image_size)
    bg = _background(rng, size)
    canvas = bg.copy()
    _draw_distractors(rng, canvas, bg.mean(axis=(0, 1)))
    # A pathological pose could rasterise to nothing; redraw from the same stream (still
    # deterministic) rather than emit an empty mask.
    for _ in range(10):
        alpha = _object_alpha(rng, label, size)
        mask = alpha >= 0.5
        if mask.any():
            break
    else:
        raise RuntimeError("could not render a non-empty object mask")
    # Contrast against the *clean* background under the object (distractors are transient).
    local_mean = alpha.ravel() @ bg.reshape(-1, 3) / float(alpha.sum())
    color = _sample_colors(rng, 1, local_mean, _MIN_CONTRAST, _MIN_LUMA_CONTRAST)[0]
    # Gentle linear shading so objects are not perfectly flat; its strength is class-free.
    shade = _ramp(size, rng.uniform(0, 2 * np.pi)) * rng.uniform(0.0, 0.25) + 1.0
    image = canvas + alpha[..., None] * (shade[..., None] * color - canvas)
    # Grey sensor-like noise: cheaper than per-channel noise and just as good at breaking up
    # perfectly flat regions.
    image += rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(0.0, 0.03)
    image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = np.array(
        [rows[0] / size, cols[0] / size, (rows[-1] + 1) / size, (cols[-1] + 1) / size],
        dtype=np.float32,
    )
    return {
        "image": image,
        "label": label,
        "bbox": bbox,
        "mask": (mask[..., None] * np.uint8(255)).astype(np.uint8),
    }


# --------------------------------------------------------------------------------------
# TFDS builder
# --------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_bytes(array: np.ndarray) -> bytes:
    """Minimal 8-bit PNG encoder for (H, W, 1|3) uint8 arrays.

    Encoding is a large share of generation time; this is ~3x faster than PIL's encoder for
    80x80 images (no filter selection, zlib level 1) and ~10x faster than TFDS's own encoder.
    """
    h, w, c = array.shape
    rows = np.empty((h, 1 + w * c), np.uint8)
    rows[:, 0] = 0  # filter type "None" for every scanline
    rows[:, 1:] = array.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2}[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )


@dataclasses.dataclass(eq=False)
class ZfShapesConfig(tfds.core.BuilderConfig):
    """Config of ``zf_shapes``: image side and the number of examples per split."""

    image_size: int = IMAGE_SIZE
    num_train: int = 12000
    num_validation: int = 1000
    num_test: int = 1000


def _registered(name: str) -> bool:
    # Importing this file under two module names (script + package) would otherwise raise
    # "Dataset zf_shapes already registered" from TFDS.
    return name in getattr(tfds.core.registered, "_DATASET_REGISTRY", {})


class ZfShapes(tfds.core.GeneratorBasedBuilder, skip_registration=_registered("zf_shapes")):
    """Procedurally generated shapes on cluttered backgrounds, with boxes and masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ZfShapesConfig(
            name="default",
            description="80x80 images; 12000 train / 1000 validation / 1000 test.",
        ),
        ZfShapesConfig(
            name="tiny",
            description="80x80 images; 200 train / 50 validation / 50 test (for tests).",
            num_train=200,
            num_validation=50,
            num_test=50,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Ten shape classes (" + ", ".join(CLASS_NAMES) + ") with random colour, size, "
                "position and rotation on textured, cluttered backgrounds. Colour is "
                "independent of the class. Each example has the object's tight bounding box "
                "and binary mask. Rendered procedurally from a seed; nothing is downloaded."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "bbox": tfds.features.BBoxFeature(),
                    "mask": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
                }
            ),
            supervised_keys=("image", "label"),
            citation=(
                "@inproceedings{zeiler2014visualizing, title={Visualizing and Understanding "
                "Convolutional Networks}, author={Zeiler, Matthew D and Fergus, Rob}, "
                "booktitle={ECCV}, year={2014}}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is rendered; nothing to download.
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        jobs = ((split, index, self.builder_config.image_size) for index in range(num_examples))
        workers = _num_workers(num_examples)
        if workers <= 1:
            yield from map(_encoded_example, jobs)
            return
        # Rendering + PNG encoding dominate the cost and are pure numpy/PIL, so they go to
        # forked workers; TFDS serialisation and writing stay in this process. imap keeps
        # the order, although nothing depends on it (each example has its own seed).
        # The workers take the default signal mask: main.py blocks SIGINT and SIGTERM in
        # its threads (zf_tf/core/interrupts.py), and Pool ends its workers with SIGTERM.
        context = multiprocessing.get_context("fork")
        with context.Pool(workers, initializer=_unblock_signals) as pool:
            yield from pool.imap(_encoded_example, jobs, chunksize=50)


def _unblock_signals():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))


def _num_workers(num_examples: int) -> int:
    """Worker processes for generation; ``ZF_SHAPES_WORKERS`` overrides the default."""
    env = os.environ.get("ZF_SHAPES_WORKERS")
    if env:
        return max(1, int(env))
    # Small splits are faster serially than the pool start-up, and fork is unavailable on
    # some platforms (the output is identical either way).
    if num_examples < 1000 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8))


def _encoded_example(job: tuple[str, int, int]) -> tuple[int, dict]:
    """Render example ``index`` of ``split`` and encode it as TFDS expects (PNG bytes)."""
    split, index, size = job
    # Labels cycle so every split is exactly class-balanced; TFDS shuffles by key anyway.
    ex = render_example(example_rng(split, index), index % len(CLASS_NAMES), size)
    return index, {
        "image": _png_bytes(ex["image"]),
        "label": ex["label"],
        "bbox": tfds.features.BBox(*(float(v) for v in ex["bbox"])),
        "mask": _png_bytes(ex["mask"]),
    }


def example_rng(split: str, index: int) -> np.random.Generator:
    """Generator for example ``index`` of ``split``, independent of generation order.

    Args:
        split: one of ``train``, ``validation``, ``test``.
        index: example index within the split.

    Returns:
        A fresh ``np.random.Generator`` seeded from (base seed, split seed, index).
    """
    return np.random.default_rng([_BASE_SEED, _SPLIT_SEEDS[split], int(index)])


def _default_data_dir() -> str:
    return os.environ.get("ZF_TF_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def builder(data_dir: str | None = None, config_name: str = "default") -> ZfShapes:
    """Return the ``zf_shapes`` builder (not prepared yet if the data was never generated).

    Args:
        data_dir: TFDS data directory; ``None`` means ``$ZF_TF_DATA_DIR`` or else
            ``~/tensorflow_datasets``.
        config_name: ``default`` or ``tiny``.

    Returns:
        A ``ZfShapes`` (``tfds.core.DatasetBuilder``) instance.
    """
    return ZfShapes(data_dir=data_dir or _default_data_dir(), config=config_name)


def load(
    split: str,
    data_dir: str | None = None,
    config_name: str = "default",
    decoders=None,
    shuffle_files: bool = False,
):
    """Load a split of ``zf_shapes`` as a ``tf.data.Dataset``, generating it on first use.

    Args:
        split: TFDS split string, e.g. ``train``, ``validation``, ``test`` or ``train[:10%]``.
        data_dir: TFDS data directory; ``None`` means ``$ZF_TF_DATA_DIR`` or else
            ``~/tensorflow_datasets``.
        config_name: ``default`` or ``tiny``.
        decoders: optional TFDS decoders, passed to ``as_dataset``.
        shuffle_files: whether TFDS shuffles the record files.

    Returns:
        ``tf.data.Dataset`` of dicts with keys ``image``, ``label``, ``bbox``, ``mask``.
    """
    ds_builder = builder(data_dir, config_name)
    if not ds_builder.is_prepared():
        print(
            f"zf_shapes/{config_name}: generating dataset into {ds_builder.data_dir}",
            file=sys.stderr,
        )
        ds_builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return ds_builder.as_dataset(split=split, decoders=decoders, shuffle_files=shuffle_files)


class EmbeddedSource(tfds_source.TfdsSource):
    """Source 'embedded': ``zf_shapes`` (``data.tfds_config``: default or tiny), generated
    on first use; its examples' boxes and masks come with ``annotated``."""

    has_boxes = True

    def _builder(self, data):
        return builder(sources.data_dir(data), data.tfds_config)

    def class_names(self, data):
        return list(CLASS_NAMES)

    def annotated(self, data, split):
        ds = load(split, sources.data_dir(data), data.tfds_config)
        ds = ds.map(lambda ex: (ex["image"], ex["label"], ex["bbox"], ex["mask"]))
        return sources.select_classes(ds, sources.selected_classes(data))
