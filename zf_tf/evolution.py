"""Feature evolution during training (paper Fig. 4) and `--mode=evolution`.

`FeatureEvolution` is a training callback. At the configured epochs (1-based; the paper shows
1, 2, 5, 10, 20, 30, 40, 64), clipped to the run's length plus its final epoch, it takes a fixed
probe subset of the training split (the first `probe_images` examples as center crops) and, for
a seeded subset of `features_per_layer` feature maps of every conv layer (the same maps at
every epoch), finds the strongest activation over the probe subset and projects it to pixel
space with the deconvnet. Each snapshot goes to `WORKDIR/evolution/epoch_{e:03d}.npz`
(atomically; a resumed run simply rewrites the epochs it trains again) and to TensorBoard
(`logs/evolution`, step = epoch).

The callback reads the live model: one forward pass of a model tapping conv1..conv5 finds the
winners of all layers at once, and the deconvnets, built once, reuse the classifier's layer
objects, so every snapshot sees the current weights. Under MirroredStrategy it runs on the host
in cross-replica context, where reading a mirrored variable gives its (synchronised) value.

`--mode=evolution` lays the snapshots out as the Fig. 4 grid: one row per feature map (grouped
by layer), one column per epoch, each cell the projection cropped to its receptive field and
contrast-stretched on its own: `WORKDIR/evolution/evolution.png` and a TensorBoard image.
"""

from __future__ import annotations

import glob
import math
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipelines import examples
from zf_tf import UsageError, deconv, figures, summaries, visualize
from zf_tf.model import CONV_LAYERS

MODE = "evolution"
SNAPSHOT_PATTERN = "epoch_{:03d}.npz"
# For configs without an `analysis.evolution` section (configs/zfnet_imagenet.py): the
# paper's epochs and the default config's probe sizes.
DEFAULTS = {"epochs": (1, 2, 5, 10, 20, 30, 40, 64), "probe_images": 256, "features_per_layer": 4}
# Per-snapshot array names; each is stored as "<layer>_<name>" (field: the receptive field's
# side in input pixels, unclipped).
FIELDS = ("features", "activation", "image", "y", "x", "projection", "box", "field")
CELL_PAD = 2  # pixels between grid cells in the TensorBoard / array grid


def snapshot_epochs(epochs, num_epochs: int) -> list[int]:
    """The 1-based epochs to snapshot in a run of `num_epochs` epochs.

    Args:
      epochs: the wanted epochs (e.g. the paper's 1, 2, 5, ..., 64).
      num_epochs: the run's length.

    Returns:
      Sorted unique epochs of `epochs` within [1, num_epochs], plus `num_epochs` itself so
      the last column is always the finished model; [] when `epochs` is empty (snapshots
      switched off).
    """
    if num_epochs < 1 or not len(epochs):
        return []
    chosen = {int(e) for e in epochs if 1 <= int(e) <= num_epochs}
    return sorted(chosen | {int(num_epochs)})


def choose_features(model: keras.Model, per_layer: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded subset of `per_layer` feature maps of every conv layer (all if fewer).

    Each layer draws from its own stream (seed, layer number) so that layers of equal width
    do not show the same map numbers.

    Returns:
      {layer: sorted int32 array of map indices}.
    """
    out = {}
    present = {layer.name for layer in model.layers}  # ablations (Table 3) remove some
    for i, layer in enumerate(CONV_LAYERS):
        if layer not in present:
            continue
        maps = int(model.get_layer(layer).output.shape[-1])
        if per_layer <= 0 or per_layer >= maps:
            out[layer] = np.arange(maps, dtype=np.int32)
            continue
        rng = np.random.default_rng([int(seed), i])
        out[layer] = np.sort(rng.choice(maps, size=per_layer, replace=False)).astype(np.int32)
    return out


def strongest(maps: np.ndarray, features) -> dict[str, np.ndarray]:
    """The strongest activation of each feature map over a set of images.

    Args:
      maps: (N, h, w, F) activations of one layer.
      features: map indices to look at.

    Returns:
      {'activation', 'image', 'y', 'x'}, each (len(features),); ties go to the first image,
      then the first position in row-major order (as `topk.scan`).
    """
    n, h, w, _ = maps.shape
    picked = np.moveaxis(maps[..., np.asarray(features)], -1, 0).reshape(len(features), -1)
    flat = picked.argmax(axis=1)
    image, rest = np.divmod(flat, h * w)
    y, x = np.divmod(rest, w)
    return {
        "activation": picked[np.arange(len(features)), flat].astype(np.float32),
        "image": image.astype(np.int32),
        "y": y.astype(np.int32),
        "x": x.astype(np.int32),
    }


class Snapshotter:
    """Computes evolution snapshots of a model on a fixed probe set (built once).

    Args:
      model: the classifier being trained (its layers are reused, never copied).
      images: (N, s, s, 3) probe images (model inputs).
      features: {layer: map indices} (from `choose_features`).
      batch_size: images per forward pass.
    """

    def __init__(self, model: keras.Model, images: np.ndarray, features: dict, batch_size=64):
        self.model = model
        self.images = np.asarray(images, np.float32)
        self.features = {k: np.asarray(v, np.int32) for k, v in features.items()}
        self.batch_size = int(batch_size)
        self.layers = [layer for layer in CONV_LAYERS if layer in self.features]
        tap = keras.Model(
            model.inputs[0], [model.get_layer(layer).output for layer in self.layers], name="taps"
        )
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self._tap = tf.function(
            lambda x: tap(x, training=False),
            input_signature=[tf.TensorSpec([None, *shape], tf.float32)],
        )
        self.deconvnets = {layer: deconv.build_deconvnet(model, layer) for layer in self.layers}

    def __call__(self) -> dict[str, np.ndarray]:
        """One snapshot of the current weights: {'<layer>_<field>': array} (see FIELDS)."""
        maps = {layer: [] for layer in self.layers}
        for start in range(0, len(self.images), self.batch_size):
            outs = self._tap(tf.constant(self.images[start : start + self.batch_size]))
            for layer, out in zip(self.layers, outs):
                # Only the chosen maps are kept: the full conv1 maps of 256 images are large.
                maps[layer].append(tf.gather(out, self.features[layer], axis=-1).numpy())
        snap = {}
        for layer in self.layers:
            chosen = self.features[layer]
            best = strongest(np.concatenate(maps[layer]), np.arange(len(chosen)))
            result = deconv.project(
                self.deconvnets[layer],
                self.images,
                best["image"],
                chosen,
                best["y"],
                best["x"],
                batch_size=self.batch_size,
            )
            boxes = [
                deconv.receptive_field(self.model, layer, int(y), int(x))
                for y, x in zip(best["y"], best["x"])
            ]
            snap.update(
                {
                    f"{layer}_features": chosen,
                    f"{layer}_activation": result["activation"],
                    f"{layer}_image": best["image"],
                    f"{layer}_y": result["y"],
                    f"{layer}_x": result["x"],
                    f"{layer}_projection": result["projection"],
                    f"{layer}_box": np.asarray(boxes, np.int32).reshape(-1, 4),
                    f"{layer}_field": np.int32(deconv.receptive_field_size(self.model, layer)),
                }
            )
        return snap


class FeatureEvolution(keras.callbacks.Callback):
    """Training callback writing Fig. 4 snapshots (see the module doc).

    Args:
      workdir: where `evolution/epoch_XXX.npz` and `logs/evolution` go (the chief's workdir,
        or a worker's scratch directory).
      config: the run's config (data, train.epochs, seed, analysis.evolution).
    """

    def __init__(self, workdir: str, config):
        super().__init__()
        self.workdir = workdir
        self.config = config
        s = figures.analysis_settings(config, MODE, DEFAULTS)
        self.epochs = snapshot_epochs(s["epochs"], int(config.train.epochs))
        self.probe_images = int(s["probe_images"])
        self.per_layer = int(s["features_per_layer"])
        self.snapshotter = None
        self.writer = None
        self.seconds = []  # wall time of each snapshot (for the cost report)
        self.setup_seconds = 0.0

    def _setup(self):
        start = time.perf_counter()
        probe = examples.load_examples(
            self.config, self.config.data.train_split, self.probe_images
        ).images
        features = choose_features(self.model, self.per_layer, int(self.config.seed))
        self.snapshotter = Snapshotter(
            self.model, probe, features, int(self.config.train.eval_batch_size)
        )
        self.setup_seconds = time.perf_counter() - start

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        if step not in self.epochs:
            return
        if logs is not None and not math.isfinite(float(logs.get("loss", 0.0))):
            # A diverged model's projections are NaN: nothing worth keeping.
            logging.warning("Epoch %d diverged: no feature-evolution snapshot", step)
            return
        if self.snapshotter is None:
            self._setup()
        start = time.perf_counter()
        snap = self.snapshotter()
        out_dir = os.path.join(self.workdir, MODE)
        os.makedirs(out_dir, exist_ok=True)
        figures.save_npz(
            os.path.join(out_dir, SNAPSHOT_PATTERN.format(step)),
            epoch=np.int32(step),
            layers=np.asarray(self.snapshotter.layers),
            crop_size=np.int32(self.config.data.crop_size),
            **snap,
        )
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(os.path.join(self.workdir, "logs", MODE))
        with self.writer.as_default(step=step):
            for layer in self.snapshotter.layers:
                cells = np.stack(
                    [
                        field_cell(p, b, _side(snap, layer, self.config.data.crop_size))
                        for p, b in zip(snap[f"{layer}_projection"], snap[f"{layer}_box"])
                    ]
                )
                grid = summaries.tile(cells, len(cells), pad=CELL_PAD)
                tf.summary.image(f"evolution/{layer}", (grid * 255).astype(np.uint8)[None])
        self.writer.flush()
        self.seconds.append(time.perf_counter() - start)
        logging.info(
            "Feature evolution snapshot of epoch %d: %.2f s (setup %.2f s)",
            step,
            self.seconds[-1],
            self.setup_seconds,
        )


# ---------------------------------------------------------------------------------------------
# --mode=evolution: the Fig. 4 grid
# ---------------------------------------------------------------------------------------------


def _side(snap, layer, crop_size) -> int:
    """Canvas side of a layer's cells: its receptive field, at most the crop (clipped boxes
    keep their place on it, as in `visualize.field_patch`)."""
    return int(min(int(snap[f"{layer}_field"]), int(crop_size)))


def field_cell(projection: np.ndarray, box, side: int) -> np.ndarray:
    """A projection cropped to its receptive field, contrast-stretched on its own, on a
    side x side canvas (clipped boxes keep their place, as `visualize.field_patch`)."""
    y0, x0, y1, x1 = (int(b) for b in box)
    stretched = np.zeros_like(projection, dtype=np.float32)
    stretched[y0:y1, x0:x1] = summaries.stretch(projection[y0:y1, x0:x1].astype(np.float32))
    return visualize.field_patch(stretched, (y0, x0, y1, x1), side)


def _resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    rows = np.arange(size) * image.shape[0] // size
    cols = np.arange(size) * image.shape[1] // size
    return image[rows][:, cols]


def load_snapshots(workdir: str) -> dict[int, dict]:
    """{epoch: {name: array}} of every `WORKDIR/evolution/epoch_XXX.npz`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, MODE, "epoch_*.npz"))):
        match = re.fullmatch(r"epoch_(\d+)\.npz", os.path.basename(path))
        if match:
            with np.load(path) as data:
                out[int(match.group(1))] = {k: data[k] for k in data.files}
    return out


def evolution_grid(snapshots: dict[int, dict], cell: int = 0):
    """The Fig. 4 grid as arrays.

    Rows are the feature maps of the latest snapshot, grouped by layer (conv1 first);
    columns are the snapshot epochs in order. A map missing from an epoch's snapshot (a run
    whose settings changed) gets a gray cell.

    Args:
      snapshots: from `load_snapshots`.
      cell: side of every cell in pixels; 0 = the largest receptive-field canvas.

    Returns:
      (cells float32 (R, C, cell, cell, 3) in [0, 1], row labels [R], epochs [C]).
    """
    epochs = sorted(snapshots)
    last = snapshots[epochs[-1]]
    crop = int(last.get("crop_size", 0)) or int(last[f"{CONV_LAYERS[0]}_projection"].shape[1])
    layers = [str(layer) for layer in last["layers"]]
    sides = {}
    for snap in snapshots.values():
        for layer in layers:
            if f"{layer}_box" in snap:
                sides[layer] = max(sides.get(layer, 0), _side(snap, layer, crop))
    cell = cell or max(sides.values())
    rows, labels = [], []
    for layer in layers:
        for feature in last[f"{layer}_features"]:
            row = []
            for e in epochs:
                snap = snapshots[e]
                found = np.flatnonzero(snap.get(f"{layer}_features", np.zeros(0)) == feature)
                if not len(found):
                    row.append(np.full((cell, cell, 3), 0.5, np.float32))
                    continue
                i = int(found[0])
                patch = field_cell(
                    snap[f"{layer}_projection"][i], snap[f"{layer}_box"][i], sides[layer]
                )
                row.append(_resize_nearest(patch, cell))
            rows.append(np.stack(row))
            labels.append(f"{layer} map {int(feature)}")
    return np.stack(rows).astype(np.float32), labels, epochs


def tile_grid(cells: np.ndarray, pad: int = CELL_PAD) -> np.ndarray:
    """(R, C, s, s, 3) cells as one (R*(s+pad)-pad, C*(s+pad)-pad, 3) image, white gaps."""
    r, c = cells.shape[:2]
    return summaries.tile(cells.reshape(r * c, *cells.shape[2:]), c, pad=pad)


def render(cells, labels, epochs, path: str, title: str) -> np.ndarray:
    """The grid with row labels (feature maps) and column labels (epochs), saved as PNG.

    One image of the tiled cells (about one screen pixel per cell pixel), with a line
    between layers.

    Returns:
      The saved figure as uint8 (H, W, 3).
    """
    plt = figures.pyplot()
    rows, cols, side = cells.shape[:3]
    grid = tile_grid(cells)
    step = side + CELL_PAD
    dpi = 100
    fig = plt.figure(figsize=((grid.shape[1] + 130) / dpi, (grid.shape[0] + 70) / dpi), dpi=dpi)
    ax = fig.add_axes(
        (
            110 / (grid.shape[1] + 130),
            10 / (grid.shape[0] + 70),
            grid.shape[1] / (grid.shape[1] + 130),
            grid.shape[0] / (grid.shape[0] + 70),
        )
    )
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([c * step + side / 2 for c in range(cols)], [f"epoch {e}" for e in epochs])
    ax.xaxis.tick_top()
    ax.set_yticks([r * step + side / 2 for r in range(rows)], labels)
    ax.tick_params(length=0, labelsize=8)
    for r in range(1, rows):
        if labels[r].split()[0] != labels[r - 1].split()[0]:  # a new layer starts
            ax.axhline(r * step - CELL_PAD / 2 - 0.5, color="k", lw=1.5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=9, y=1 - 8 / (grid.shape[0] + 70), va="top")
    return figures.save_figure(fig, path, dpi=dpi)


def run_mode(config, workdir: str, opts) -> dict:
    """`--mode=evolution`: the Fig. 4 grid from the snapshots written during training.

    Returns:
      {'png': path, 'epochs': [...], 'rows': [...]}.

    Raises:
      UsageError: no snapshots in the workdir, or the figure exists and not --overwrite.
    """
    snapshots = load_snapshots(workdir)
    if not snapshots:
        raise UsageError(
            f"no feature-evolution snapshots in {os.path.join(workdir, MODE)}: they are written "
            "during training; train a new run with this version first "
            "(python main.py --mode=train --workdir=NEW_WORKDIR)"
        )
    paths = figures.outputs(workdir, MODE, ["evolution.png"], opts.overwrite)
    cells, labels, epochs = evolution_grid(snapshots)
    image = render(
        cells,
        labels,
        epochs,
        paths["evolution.png"],
        "Feature evolution (paper Fig. 4)",
    )
    figures.write_tensorboard(workdir, MODE, "evolution/grid", image)
    figures.write_tensorboard(
        workdir, MODE, "evolution/cells", (tile_grid(cells) * 255).astype(np.uint8)
    )
    print(f"Wrote {paths['evolution.png']} ({len(labels)} feature maps x {len(epochs)} epochs)")
    return {"png": paths["evolution.png"], "epochs": epochs, "rows": labels}
