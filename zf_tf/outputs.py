"""The one output module: where outputs go and the overwrite policy, model inputs back to
displayable RGB, image grids, matplotlib figures saved as PNG, arrays (npz), text, and
TensorBoard images.

Every mode writes under `WORKDIR/<mode>/` and never replaces an existing file unless
`--overwrite`; computing (arrays) stays in the analysis modules, rendering goes through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core import errors, graph
from zf_tf.core.errors import UsageError

PANEL_COLUMNS = 4  # feature panels per row in panel_figure


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def display(images: np.ndarray, pixels) -> np.ndarray:
    """Model inputs back to [0, 1] RGB.

    Args:
      images: model inputs (..., 3).
      pixels: their normalization, a `zf_tf.pipelines.preprocess.Pixels`
        (`preprocess.pixels(config.data)`).
    """
    return pixels.display(images)


def check_free(paths, overwrite: bool):
    """Raises UsageError naming the first existing path, unless `overwrite`."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite to replace it")


def reserve(workdir: str, mode: str, names, overwrite: bool) -> dict[str, str]:
    """Paths `WORKDIR/<mode>/<name>` for each name, checked free (or `overwrite`).

    Call it before any long computation so a refused run wastes no time; the folder is
    created here.

    Returns:
      {name: path}.

    Raises:
      UsageError: one of them exists and not `overwrite`.
    """
    out_dir = os.path.join(workdir, mode)
    paths = {name: os.path.join(out_dir, name) for name in names}
    check_free(paths.values(), overwrite)
    os.makedirs(out_dir, exist_ok=True)
    return paths


@contextlib.contextmanager
def atomic(path: str, suffix: str = ".tmp"):
    """Yields a temporary path beside `path` (a file or a folder) to write; renamed to
    `path` when the block succeeds, deleted when it fails (a full disk, a kill): `path` is
    always either the old or the new version, never half of one, and no temporary stays."""
    tmp = path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        if (fault := errors.writing(e, path)) is not e:
            raise fault from e  # a full disk: named by the file meant, not its temporary
        raise


def save_figure(fig, path: str, dpi: int = 100) -> np.ndarray:
    """Saves a matplotlib figure as PNG (atomically) and returns it as uint8 (H, W, 3)."""
    try:
        with atomic(path, ".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
    # Decode the file rather than rendering the figure a second time (seconds for big ones).
    with open(path, "rb") as fh:
        return tf.io.decode_png(fh.read(), channels=3).numpy()


def save_npz(path: str, compressed: bool = True, **arrays):
    """np.savez(_compressed), atomically (a crash never leaves half a file at `path`)."""
    with atomic(path, ".tmp.npz") as tmp:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)


def save_text(path: str, text: str, suffix: str = ".tmp"):
    """Writes a text file atomically (through `path + suffix`)."""
    with atomic(path, suffix) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def panel_figure(panels, titles, path: str, suptitle: str, columns: int = PANEL_COLUMNS):
    """Saves panels (list of HxWx3 in [0,1]) in a grid with titles; returns the array."""
    plt = pyplot()
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    aspect = panels[0].shape[1] / panels[0].shape[0]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * aspect * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel, title in zip(axes.ravel(), panels, titles):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_tensorboard(workdir: str, run: str, tag: str, image: np.ndarray, step: int = 0):
    """One uint8 (H, W, 3) image as a TensorBoard image summary in `WORKDIR/logs/<run>`."""
    writer = tf.summary.create_file_writer(os.path.join(workdir, "logs", run))
    with writer.as_default(step=step):
        tf.summary.image(tag, np.asarray(image, np.uint8)[None])
    writer.flush()


def markdown_table(header, rows) -> str:
    """A GitHub markdown table from a header and rows of cells (str() of each)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# Image grids


def tile(images: np.ndarray, ncols: int, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tiles (N, H, W, C) images into one (rows*(H+pad)-pad, ncols*(W+pad)-pad, C) grid."""
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    out = np.full((rows * (h + pad) - pad, ncols * (w + pad) - pad, c), pad_value, images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        out[r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = image
    return out


def stretch(x: np.ndarray, axis=None) -> np.ndarray:
    """Contrast-stretches to [0, 1] (per item when `axis` names the non-batch axes)."""
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def filter_grid(kernel: np.ndarray, zoom: int = 4) -> np.ndarray:
    """First-layer filters (k, k, 3, C) as one RGB grid, each filter stretched to [0, 1]."""
    filters = np.transpose(kernel, (3, 0, 1, 2))  # (C, k, k, 3)
    filters = stretch(filters, axis=(1, 2, 3))
    filters = filters.repeat(zoom, axis=1).repeat(zoom, axis=2)
    return tile(filters, int(np.ceil(np.sqrt(len(filters)))), pad=zoom // 2 or 1)


def kernel_rms(kernel) -> np.ndarray:
    """Per-filter RMS of a (kh, kw, c_in, c_out) kernel, over (kh, kw, c_in): (c_out,)."""
    return np.sqrt((np.asarray(kernel).astype(np.float64) ** 2).mean(axis=(0, 1, 2)))


def filter_rms(model) -> dict[str, np.ndarray]:
    """Per-filter RMS of every conv layer's kernel (what renormalization caps)."""
    out = {}
    for op in graph.ops_of(model):  # in execution order: conv1..conv5 for ZFNet
        if isinstance(op.layer, keras.layers.Conv2D) and op.name not in out:
            out[op.name] = kernel_rms(op.layer.kernel)
    return out


def figure_to_array(fig) -> np.ndarray:
    """Renders a matplotlib figure to a uint8 (H, W, 3) array and closes it."""
    fig.set_dpi(80)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    pyplot().close(fig)
    return rgba[..., :3].copy()


def rms_plot(rms: dict[str, np.ndarray], radius: float) -> np.ndarray:
    """A strip plot of per-filter RMS per layer, with the renormalization radius."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3))
    for i, values in enumerate(rms.values()):
        jitter = np.random.default_rng(i).uniform(-0.2, 0.2, len(values))
        ax.scatter(i + jitter, values, s=4, alpha=0.6)
    if radius:
        ax.axhline(radius, color="k", lw=0.8, ls="--", label=f"radius {radius}")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xticks(range(len(rms)), list(rms))
    ax.set_ylabel("filter RMS")
    fig.tight_layout()
    return figure_to_array(fig)


def field_patch(image: np.ndarray, box, size: int, fill: float = 0.5) -> np.ndarray:
    """The receptive-field box (y0, x0, y1, x1) of an image on a size x size canvas.

    Boxes clipped at the image border keep their place on the canvas, so every patch of
    a layer shows the same geometry.
    """
    y0, x0, y1, x1 = box
    canvas = np.full((size, size, image.shape[-1]), fill, image.dtype)
    h, w = y1 - y0, x1 - x0
    # A clipped box lost its top/left part if it touches the top/left border.
    top = size - h if y0 == 0 else 0
    left = size - w if x0 == 0 else 0
    canvas[top : top + h, left : left + w] = image[y0:y1, x0:x1]
    return canvas


def field_cell(projection: np.ndarray, box, side: int) -> np.ndarray:
    """A projection cropped to its receptive field, contrast-stretched on its own, on a
    side x side canvas (clipped boxes keep their place, as `field_patch`)."""
    y0, x0, y1, x1 = (int(b) for b in box)
    stretched = np.zeros_like(projection, dtype=np.float32)
    stretched[y0:y1, x0:x1] = stretch(projection[y0:y1, x0:x1].astype(np.float32))
    return field_patch(stretched, (y0, x0, y1, x1), side)


def field_side(snap, layer, crop_size) -> int:
    """Canvas side of a layer's cells: its receptive field, at most the crop (clipped boxes
    keep their place on it, as in `field_patch`)."""
    return int(min(int(snap[f"{layer}_field"]), int(crop_size)))
