"""`--mode=evolution` (paper Fig. 4): the grid of the snapshots that the training callback
`zf_tf.training.callbacks.FeatureEvolution` writes.

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
import os
import re

import numpy as np

from zf_tf import outputs
from zf_tf.core.errors import UsageError
from zf_tf.core.model import CONV_LAYERS
from zf_tf.training.callbacks import CELL_PAD, MODE


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
                sides[layer] = max(sides.get(layer, 0), outputs.field_side(snap, layer, crop))
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
                patch = outputs.field_cell(
                    snap[f"{layer}_projection"][i], snap[f"{layer}_box"][i], sides[layer]
                )
                row.append(_resize_nearest(patch, cell))
            rows.append(np.stack(row))
            labels.append(f"{layer} map {int(feature)}")
    return np.stack(rows).astype(np.float32), labels, epochs


def tile_grid(cells: np.ndarray, pad: int = CELL_PAD) -> np.ndarray:
    """(R, C, s, s, 3) cells as one (R*(s+pad)-pad, C*(s+pad)-pad, 3) image, white gaps."""
    r, c = cells.shape[:2]
    return outputs.tile(cells.reshape(r * c, *cells.shape[2:]), c, pad=pad)


def render(cells, labels, epochs, path: str, title: str) -> np.ndarray:
    """The grid with row labels (feature maps) and column labels (epochs), saved as PNG.

    One image of the tiled cells (about one screen pixel per cell pixel), with a line
    between layers.

    Returns:
      The saved figure as uint8 (H, W, 3).
    """
    plt = outputs.pyplot()
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
    return outputs.save_figure(fig, path, dpi=dpi)


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
    paths = outputs.reserve(workdir, MODE, ["evolution.png"], opts.overwrite)
    cells, labels, epochs = evolution_grid(snapshots)
    image = render(
        cells,
        labels,
        epochs,
        paths["evolution.png"],
        "Feature evolution (paper Fig. 4)",
    )
    outputs.write_tensorboard(workdir, MODE, "evolution/grid", image)
    outputs.write_tensorboard(
        workdir, MODE, "evolution/cells", (tile_grid(cells) * 255).astype(np.uint8)
    )
    print(f"Wrote {paths['evolution.png']} ({len(labels)} feature maps x {len(epochs)} epochs)")
    return {"png": paths["evolution.png"], "epochs": epochs, "rows": labels}
