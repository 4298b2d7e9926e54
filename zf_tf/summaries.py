"""TensorBoard image summaries written during training, and the image-grid helpers."""

from __future__ import annotations

import io

import keras
import numpy as np
import tensorflow as tf

from pipelines import inputs, preprocess
from zf_tf import model as model_lib


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


def filter_rms(model: keras.Model) -> dict[str, np.ndarray]:
    """Per-filter RMS of every conv layer's kernel (what renormalization caps)."""
    out = {}
    present = {layer.name for layer in model.layers}  # ablations (Table 3) remove some
    for name in (n for n in model_lib.CONV_LAYERS if n in present):
        k = model.get_layer(name).get_weights()[0]
        out[name] = np.sqrt((k.astype(np.float64) ** 2).mean(axis=(0, 1, 2)))
    return out


def figure_to_array(fig) -> np.ndarray:
    """Renders a matplotlib figure to a uint8 (H, W, 3) array and closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return tf.io.decode_png(buf.getvalue(), channels=3).numpy()


def rms_plot(rms: dict[str, np.ndarray], radius: float) -> np.ndarray:
    """A strip plot of per-filter RMS per layer, with the renormalization radius."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def augmentation_grid(config, num_images: int = 2) -> np.ndarray:
    """The 10 crops of the first training images as the model sees them (mean added back).

    Returns:
      float32 RGB in [0, 1]: one row per image, one column per crop index 0..9.
    """
    data = config.data
    crops = [
        preprocess.ten_crops(encoded, data.resize_size, data.crop_size, data.mean).numpy()
        for encoded, _ in inputs.encoded_records(data, data.train_split).take(num_images)
    ]
    crops = np.concatenate(crops) + np.asarray(data.mean, np.float32)
    return tile(np.clip(crops / 255.0, 0, 1), ncols=preprocess.NUM_CROPS, pad=2)


class ImageSummaries(keras.callbacks.Callback):
    """Every epoch: conv1 filters, the 10-crop augmentation, per-layer filter RMS."""

    def __init__(self, logdir: str, config):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.config = config
        self._crops = None

    def on_train_begin(self, logs=None):
        self._crops = augmentation_grid(self.config)

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        rms = filter_rms(self.model)
        conv1 = self.model.get_layer("conv1").get_weights()[0]
        with self.writer.as_default(step=step):
            tf.summary.image("conv1_filters", filter_grid(conv1)[None])
            tf.summary.image("train_crops", self._crops[None])
            tf.summary.image("filter_rms", rms_plot(rms, self.config.model.max_filter_rms)[None])
            for name, values in rms.items():
                tf.summary.scalar(f"filter_rms_max/{name}", float(values.max()))
        self.writer.flush()
