"""Linear-probe benchmark for the embedded ``zf_shapes`` dataset.

Checks that the dataset needs spatial features: a multinomial logistic regression on raw
(standardised) pixels, and a nearest-centroid classifier on the mean object colour, should
both stay far below what a small convnet reaches. Renders the first ``--train`` train and
``--test`` test examples of the ``default`` config exactly as the TFDS builder would (same
seeds, same labels) without going through TFDS, and prints one JSON object. The
regression is the transfer experiment's linear classifier (`fits.fit_linear`, full-batch
Adam from zero weights), its L2 strength and step count chosen on a held-out slice.

Usage:
    python bench/linear_probe.py [--train 5000] [--test 1000] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zf_tf.experiments.transfer import fits  # noqa: E402
from zf_tf.pipelines import embedded  # noqa: E402


def render_split(split: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Render the first ``n`` examples of ``split`` as the builder does.

    Args:
        split: ``train``, ``validation`` or ``test``.
        n: number of examples.

    Returns:
        (images uint8 (n, H, W, 3), labels int (n,), mean object RGB float32 (n, 3), seconds).
    """
    size = embedded.IMAGE_SIZE
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    obj_rgb = np.empty((n, 3), np.float32)
    start = time.perf_counter()
    for i in range(n):
        ex = embedded.render_example(embedded.example_rng(split, i), i % 10, size)
        images[i], labels[i] = ex["image"], ex["label"]
        m = ex["mask"][..., 0] > 0
        obj_rgb[i] = ex["image"][m].mean(axis=0)
    return images, labels, obj_rgb, time.perf_counter() - start


class _BestOnHoldout(keras.callbacks.Callback):
    """Every `every` steps, the held-out accuracy of the model being fit; keeps the best."""

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray, every: int):
        super().__init__()
        self.x_val, self.y_val, self.every = x_val, y_val, every
        self.best = (float("nan"), 0)  # (accuracy, steps)

    def on_train_batch_end(self, batch, logs=None):
        steps = batch + 1
        if steps % self.every:
            return
        scores = self.model.predict_on_batch(self.x_val)
        acc = float(np.mean(np.argmax(scores, axis=1) == self.y_val))
        if not acc <= self.best[0]:  # also true for the initial nan
            self.best = (acc, steps)


def train_softmax(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    steps: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    lr: float = 3e-3,
    every: int = 10,
) -> tuple[keras.Model, float, int]:
    """Multinomial logistic regression: `fits.fit_linear` (full-batch Adam from zero
    weights, the transfer experiment's linear classifier).

    Args:
        x, y: standardised float32 features (n, d) and integer labels (n,).
        l2: L2 penalty, as the gradient l2 * W (loss + l2 / 2 * sum(W**2)).
        steps: full-batch Adam steps.
        x_val, y_val: optional held-out data; if given, its accuracy is measured every
            `every` steps and the best step count is returned (the fit itself runs all
            `steps`: refit with the returned count to get those weights).
        lr: Adam's learning rate.

    Returns:
        (model, best held-out accuracy or nan, step count of that accuracy or `steps`).
    """
    watch = [] if x_val is None else [_BestOnHoldout(x_val, y_val, every)]
    model = fits.fit_linear(
        x, y, 10, steps=steps, learning_rate=lr, weight_decay=l2 / 2, callbacks=watch
    )
    if not watch:
        return model, float("nan"), steps
    return model, *watch[0].best


def centroid_accuracy(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray, y_te: np.ndarray):
    """Accuracy of a nearest-class-centroid classifier (Euclidean) on features ``f``."""
    centroids = np.stack([f_tr[y_tr == c].mean(axis=0) for c in range(10)])
    dist = ((f_te[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return float(np.mean(np.argmin(dist, axis=1) == y_te))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print one JSON object.

    Args:
        argv: command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The printed result dict.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=5000, help="train examples to render")
    parser.add_argument("--test", type=int, default=1000, help="test examples to render")
    parser.add_argument("--steps", type=int, default=100, help="most full-batch Adam steps")
    args = parser.parse_args(argv)

    x_tr_img, y_tr, rgb_tr, t_tr = render_split("train", args.train)
    x_te_img, y_te, rgb_te, t_te = render_split("test", args.test)

    x_tr = x_tr_img.reshape(len(x_tr_img), -1).astype(np.float32)
    x_te = x_te_img.reshape(len(x_te_img), -1).astype(np.float32)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-3
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std

    # Pick the L2 strength and the step count on a slice of the training set, so the reported
    # number is close to the best this probe can do rather than one arbitrary setting; then
    # refit on the whole training set and touch the test set once.
    n_hold = max(1, len(x_tr) // 10)
    fit, hold = slice(n_hold, None), slice(0, n_hold)
    search = {
        l2: train_softmax(x_tr[fit], y_tr[fit], l2, args.steps, x_tr[hold], y_tr[hold])[1:]
        for l2 in (1e-3, 1e-2, 1e-1)
    }
    best_l2 = max(search, key=lambda l2: search[l2][0])
    model, _, _ = train_softmax(x_tr, y_tr, best_l2, search[best_l2][1])
    w, b = (v.numpy() for v in model.weights)
    result = {
        "train_examples": int(args.train),
        "test_examples": int(args.test),
        "test_accuracy": float(np.mean(np.argmax(x_te @ w + b, axis=1) == y_te)),
        "train_accuracy": float(np.mean(np.argmax(x_tr @ w + b, axis=1) == y_tr)),
        "chance": 0.1,
        "color_centroid_accuracy": centroid_accuracy(rgb_tr, y_tr, rgb_te, y_te),
        "generation_images_per_s": (args.train + args.test) / (t_tr + t_te),
        "l2": best_l2,
        "steps": search[best_l2][1],
        "holdout_accuracy_by_l2": {str(k): v[0] for k, v in search.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
