"""Shared output plumbing of the analysis modes: where outputs go, refusing to overwrite,
model inputs back to displayable RGB, matplotlib figures saved as PNG, TensorBoard images.

Every mode writes under `WORKDIR/<mode>/` and never replaces an existing file unless
`--overwrite`; computing (arrays) stays in the analysis modules, rendering goes through here.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from zf_tf import UsageError

PANEL_COLUMNS = 4  # feature panels per row in panel_figure


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def analysis_settings(config, mode: str, defaults: dict) -> dict:
    """`config.analysis.<mode>` as a dict over the keys of `defaults`; `defaults` fill in
    whatever a config lacks (configs built before the section existed)."""
    section = config.get("analysis", {}).get(mode) if hasattr(config, "get") else None
    out = dict(defaults)
    if section is not None:
        out.update({k: section[k] for k in defaults if k in section})
    return out


def display(images: np.ndarray, mean) -> np.ndarray:
    """Model inputs (mean subtracted) back to [0, 1] RGB."""
    return np.clip((np.asarray(images, np.float32) + np.asarray(mean, np.float32)) / 255.0, 0, 1)


def check_free(paths, overwrite: bool):
    """Raises UsageError naming the first existing path, unless `overwrite`."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite to replace it")


def outputs(workdir: str, mode: str, names, overwrite: bool) -> dict[str, str]:
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


def save_figure(fig, path: str, dpi: int = 100) -> np.ndarray:
    """Saves a matplotlib figure as PNG (atomically) and returns it as uint8 (H, W, 3)."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    # Decode the file rather than rendering the figure a second time (seconds for big ones).
    with open(path, "rb") as fh:
        return tf.io.decode_png(fh.read(), channels=3).numpy()


def save_npz(path: str, **arrays):
    """np.savez_compressed, atomically (a crash never leaves half a file at `path`)."""
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def save_text(path: str, text: str):
    """Writes a text file atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


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
