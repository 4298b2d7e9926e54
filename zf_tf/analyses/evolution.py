"""`--mode=evolution` (paper Fig. 4): the snapshots written during training, as a grid.

The snapshots, `WORKDIR/evolution/epoch_XXX.npz`, are written by the training callback
`FeatureEvolution` (zf_tf/training/callbacks.py, which documents what one holds and when it
is taken). This mode lays them out as the Fig. 4 grid: one row per feature map (grouped by
layer), one column per epoch, each cell the projection cropped to its receptive field and
contrast-stretched on its own: `WORKDIR/evolution/evolution.png` and TensorBoard images
(`logs/evolution`: `evolution/grid`, the figure; `evolution/cells`, the bare cells).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import numpy as np

from zf_tf import outputs
from zf_tf.analyses import base
from zf_tf.core.errors import UsageError
from zf_tf.core.model import CONV_LAYERS
from zf_tf.training.callbacks import CELL_PAD, MODE

OUTPUTS = ("evolution.png",)
SNAPSHOT = re.compile(r"epoch_(\d+)\.npz")


def _resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """`image` (h, w, C) as (size, size, C): output pixel i takes input pixel floor(i * h / size).

    Not `keras.ops.image.resize(..., interpolation="nearest")`: that (tf.image.resize) uses
    half-pixel centers, floor((i + 0.5) * h / size), and picks other source rows at some
    places. Measured on the cells this grid upscales to 64 px: 375 of 4096 pixels differ for
    conv1's 7 px field, 1495 of 4096 for conv2's 27 px field; of the 176 (side, size) pairs
    with side 1..64 and size 48, 64, 224, the 27 where side divides size agree and the other
    149 differ. So the figure would change; the values are the same set either way (both
    copy pixels).
    """
    rows = np.arange(size) * image.shape[0] // size
    cols = np.arange(size) * image.shape[1] // size
    return image[rows][:, cols]


def snapshot_paths(workdir: str) -> dict[int, str]:
    """{epoch: path} of every `WORKDIR/evolution/epoch_XXX.npz`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, MODE, "epoch_*.npz"))):
        match = SNAPSHOT.fullmatch(os.path.basename(path))
        if match:
            out[int(match.group(1))] = path
    return out


def load_snapshots(workdir: str) -> dict[int, dict]:
    """{epoch: {name: array}} of every `WORKDIR/evolution/epoch_XXX.npz`."""
    return read_snapshots(snapshot_paths(workdir))


def read_snapshots(paths: dict[int, str]) -> dict[int, dict]:
    """{epoch: {name: array}} of the given {epoch: path}."""
    out = {}
    for epoch, path in sorted(paths.items()):
        with np.load(path) as data:
            out[epoch] = {k: data[k] for k in data.files}
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


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings of `--mode=evolution`: the snapshots found in the workdir."""

    snapshots: tuple  # ((epoch, path), ...) in epoch order
    title: str = "Feature evolution (paper Fig. 4)"


def settings(config, request) -> Settings:
    """Raises UsageError: no snapshots in the workdir (names the command that writes them)."""
    paths = snapshot_paths(request.workdir)
    if not paths:
        raise UsageError(
            f"no feature-evolution snapshots in {os.path.join(request.workdir, MODE)}: they "
            "are written during training; train a new run with this version first "
            "(python main.py --mode=train --workdir=NEW_WORKDIR)"
        )
    return Settings(snapshots=tuple(sorted(paths.items())))


def load(config, s: Settings, model) -> dict[int, dict]:
    """The snapshots' arrays, {epoch: {name: array}}."""
    return read_snapshots(dict(s.snapshots))


def compute(model, snapshots: dict[int, dict], s: Settings) -> dict:
    """`evolution_grid`: {'cells', 'labels', 'epochs'}."""
    cells, labels, epochs = evolution_grid(snapshots)
    return {"cells": cells, "labels": labels, "epochs": epochs}


def render_outputs(result: dict, s: Settings, paths: dict) -> base.Report:
    """evolution.png; TensorBoard: the figure and the bare cells."""
    cells, labels, epochs = result["cells"], result["labels"], result["epochs"]
    image = render(cells, labels, epochs, paths["evolution.png"], s.title)
    return base.Report(
        images={
            f"{MODE}/grid": image,
            f"{MODE}/cells": (tile_grid(cells) * 255).astype(np.uint8),
        },
        lines=[f"Feature evolution grid: {len(labels)} feature maps x {len(epochs)} epochs"],
        summary={"epochs": epochs, "rows": labels},
    )


ANALYSIS = base.Analysis(
    name=MODE,
    settings=settings,
    outputs=lambda s: (MODE, OUTPUTS),
    load=load,
    compute=compute,
    render=render_outputs,
    needs_model=False,
)
