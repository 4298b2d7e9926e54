"""Training callbacks, chosen by `config.train.callbacks` (see `build`).

- `ImageSummaries`: every epoch, conv1 filters, the 10-crop augmentation and per-layer filter
  RMS as TensorBoard images.
- `FeatureEvolution` (paper Fig. 4): at the configured epochs (1-based; the paper shows 1, 2,
  5, 10, 20, 30, 40, 64), clipped to the run's length plus its final epoch, it takes a fixed
  probe subset of the training split (the first `probe_images` examples as center crops)
  and, for a seeded subset of `features_per_layer` feature maps of every conv layer (the same
  maps at every epoch), finds the strongest activation over the probe subset and projects it
  to pixel space with the deconvnet. Each snapshot goes to
  `WORKDIR/evolution/epoch_{e:03d}.npz` (atomically; a resumed run simply rewrites the epochs
  it trains again) and to TensorBoard (`logs/evolution`, step = epoch). `--mode=evolution`
  (zf_tf/analyses/evolution.py) draws the snapshots as the Fig. 4 grid.

  It reads the live model: one forward pass of a model tapping conv1..conv5 finds the winners
  of all layers at once, and the deconvnets, built once, reuse the classifier's layer objects,
  so every snapshot sees the current weights. Under MirroredStrategy it runs on the host in
  cross-replica context, where reading a mirrored variable gives its (synchronised) value.
- The checkpoint, backup and resume callbacks are in zf_tf/training/resume.py.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from zf_tf import outputs
from zf_tf.core import deconv, graph
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.core.model import CONV_LAYERS
from zf_tf.pipelines import examples, inputs, preprocess
from zf_tf.training import resume


def augmentation_grid(config, num_images: int = 2) -> np.ndarray:
    """The 10 crops of the first training images as the model sees them (back in RGB).

    Returns:
      float32 RGB in [0, 1]: one row per image, one column per crop index 0..9.
    """
    data = config.data
    pixels = preprocess.pixels(data)
    ds = inputs.encoded_records(data, data.train_split).map(
        lambda e, _: preprocess.ten_crops(e, data.resize_size, data.crop_size, pixels)
    )
    crops = list(ds.ignore_errors().take(num_images).as_numpy_iterator())  # undecodable: next
    crops = outputs.display(np.concatenate(crops), pixels)
    return outputs.tile(crops, ncols=preprocess.NUM_CROPS, pad=2)


class ImageSummaries(keras.callbacks.Callback):
    """Every epoch: the first conv layer's filters (conv1), the 10-crop augmentation,
    per-layer filter RMS."""

    def __init__(self, logdir: str, config):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.config = config
        self._crops = None

    def on_train_begin(self, logs=None):
        self._crops = augmentation_grid(self.config)

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        rms = outputs.filter_rms(self.model)
        first = next(iter(rms))  # the first conv layer (conv1 for ZFNet)
        kernel = np.asarray(self.model.get_layer(first).kernel)
        with self.writer.as_default(step=step):
            tf.summary.image(f"{first}_filters", outputs.filter_grid(kernel)[None])
            tf.summary.image("train_crops", self._crops[None])
            tf.summary.image(
                "filter_rms", outputs.rms_plot(rms, self.config.model.max_filter_rms)[None]
            )
            for name, values in rms.items():
                tf.summary.scalar(f"filter_rms_max/{name}", float(values.max()))
        self.writer.flush()


MODE = "evolution"
SNAPSHOT_PATTERN = "epoch_{:03d}.npz"
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
                graph.receptive_field(self.model, layer, int(y), int(x))
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
                    f"{layer}_field": np.int32(graph.receptive_field_size(self.model, layer)),
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
        s = config.analysis.evolution
        self.epochs = snapshot_epochs(s.epochs, int(config.train.epochs))
        self.probe_images = int(s.probe_images)
        self.per_layer = int(s.features_per_layer)
        self.snapshotter = None
        self.inspected = None  # the model the snapshots project (float32)
        self.writer = None
        self.seconds = []  # wall time of each snapshot (for the cost report)
        self.setup_seconds = 0.0

    def _setup(self):
        start = time.perf_counter()
        probe = examples.load_examples(
            self.config, self.config.data.train_split, self.probe_images
        ).images
        # Projections in float32 whatever the training precision: a mixed-precision model is
        # mirrored by a float32 twin whose weights are refreshed before each snapshot.
        self.inspected = model_lib.as_float32(self.model)
        features = choose_features(self.inspected, self.per_layer, int(self.config.seed))
        self.snapshotter = Snapshotter(
            self.inspected, probe, features, int(self.config.train.eval_batch_size)
        )
        self.setup_seconds = time.perf_counter() - start

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        if step not in self.epochs:
            return
        if logs is not None and not resume.finite(logs):
            # A diverged model's projections are NaN: nothing worth keeping.
            logging.warning("Epoch %d diverged: no feature-evolution snapshot", step)
            return
        if self.snapshotter is None:
            self._setup()
        start = time.perf_counter()
        if self.inspected is not self.model:
            self.inspected.set_weights(self.model.get_weights())
        snap = self.snapshotter()
        out_dir = os.path.join(self.workdir, MODE)
        os.makedirs(out_dir, exist_ok=True)
        outputs.save_npz(
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
                        outputs.field_cell(
                            p, b, outputs.field_side(snap, layer, self.config.data.crop_size)
                        )
                        for p, b in zip(snap[f"{layer}_projection"], snap[f"{layer}_box"])
                    ]
                )
                grid = outputs.tile(cells, len(cells), pad=CELL_PAD)
                tf.summary.image(f"evolution/{layer}", (grid * 255).astype(np.uint8)[None])
        self.writer.flush()
        self.seconds.append(time.perf_counter() - start)
        logging.info(
            "Feature evolution snapshot of epoch %d: %.2f s (setup %.2f s)",
            step,
            self.seconds[-1],
            self.setup_seconds,
        )


class Validation(keras.callbacks.Callback):
    """Evaluates the model on `dataset` (finite, of (images, labels) batches) at the end of
    every epoch and adds `val_loss`, `val_top1` and `val_top5` to the epoch's logs, as
    `fit(validation_data=...)` would. Put it before the callbacks that read them
    (ReduceLROnPlateau, CSVLogger, TensorBoard).

    The first epoch reads one pass of the dataset and counts its batches; later epochs read
    that many batches from one iterator over its endless repetition, created once. The
    model is called in cross-replica context (one device).
    Why not `validation_data` or `evaluate`: under MirroredStrategy on the CPU, Keras 3.15
    creates an iterator per validation and destroying the previous one can wait
    for its input threads for tens of seconds (measured with the Imagenette config: 81 s
    epochs instead of 41-47 s, `evaluate` taking 10-42 s instead of 5 s at random epochs).
    """

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset
        self.batches = None  # batches in one pass: counted in the first epoch
        self.iterator = None
        self.step = None

    def _step_fn(self):
        model = self.model

        @tf.function
        def step(x, y):
            logits = tf.cast(model(x, training=False), tf.float32)
            y = tf.cast(tf.reshape(y, [-1]), tf.int32)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            k = min(5, int(logits.shape[-1]))
            return (
                tf.reduce_sum(loss),
                tf.reduce_sum(tf.cast(tf.math.in_top_k(y, logits, 1), tf.float32)),
                tf.reduce_sum(tf.cast(tf.math.in_top_k(y, logits, k), tf.float32)),
                tf.cast(tf.shape(y)[0], tf.float32),
            )

        return step

    def on_epoch_end(self, epoch, logs=None):
        self.step = self.step or self._step_fn()
        total = np.zeros(4)
        if self.batches is None:
            self.batches = 0
            for x, y in self.dataset:
                total += [float(v) for v in self.step(x, y)]
                self.batches += 1
            self.iterator = iter(self.dataset.repeat())
        else:
            for _ in range(self.batches):
                x, y = next(self.iterator)
                total += [float(v) for v in self.step(x, y)]
        loss, top1, top5, n = total
        if logs is not None:
            logs.update(val_loss=loss / n, val_top1=top1 / n, val_top5=top5 / n)


class EpochSeconds(keras.callbacks.Callback):
    """Adds `epoch_seconds`, the epoch's wall-clock time (its training steps and its
    validation), to the epoch's logs: history.csv then says how long training took. Put it
    before the callbacks that write the logs."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.start


class LinearWarmup(keras.callbacks.Callback):
    """Raises the learning rate linearly from `base / steps` to `base` over the first
    `steps` optimizer steps, then leaves it alone (ReduceLROnPlateau anneals it later).

    It reads the optimizer's own step counter, so a resumed run continues the ramp where
    the backup left it.
    """

    def __init__(self, base: float, steps: int):
        super().__init__()
        self.base = float(base)
        self.steps = int(steps)

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy())  # read once, not per step

    def on_train_batch_begin(self, batch, logs=None):
        if self.step < self.steps:
            self.model.optimizer.learning_rate = self.base * (self.step + 1) / self.steps
            self.step += 1


class StepDrops(keras.callbacks.Callback):
    """A fixed step schedule: at the start of each epoch the learning rate is `base` times
    `decay` to the number of `drops` (1-based epochs) already finished. It depends on the
    epoch alone, so a resumed run continues it exactly (ReduceLROnPlateau's counters start
    afresh)."""

    def __init__(self, base: float, decay: float, drops):
        super().__init__()
        self.base, self.decay, self.drops = float(base), float(decay), tuple(int(d) for d in drops)

    def on_epoch_begin(self, epoch, logs=None):
        done = sum(epoch >= d for d in self.drops)  # `epoch` counts from 0
        self.model.optimizer.learning_rate = self.base * self.decay**done


# Optional callbacks by name (config.train.callbacks): name -> factory(config, out_dir).
OPTIONAL = {
    "image_summaries": lambda config, out: ImageSummaries(
        os.path.join(out, "logs", "images"), config
    ),
    "feature_evolution": lambda config, out: FeatureEvolution(out, config),
}


def check_names(names):
    """Raises UsageError for a name of `config.train.callbacks` that is not in OPTIONAL."""
    for name in names:
        if name not in OPTIONAL:
            raise UsageError(
                f"config.train.callbacks entry {name!r} is not valid: choose from "
                f"{', '.join(OPTIONAL)}"
            )


def from_config(config, out: str) -> list[keras.callbacks.Callback]:
    """The optional callbacks that `config.train.callbacks` names, writing under `out`."""
    names = tuple(config.train.callbacks)
    check_names(names)
    return [OPTIONAL[name](config, out) for name in names]
