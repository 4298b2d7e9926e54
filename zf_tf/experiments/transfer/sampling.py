"""Which target images train and test in each draw: N images per class from a seeded
order per class (smaller N are subsets of larger ones), the held-out test images, the
per-class test cap, and the check that every class has enough images.
"""

from __future__ import annotations

import numpy as np

from zf_tf.core.errors import UsageError


def _class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    if labels.ndim == 2:
        return [np.flatnonzero(labels[:, c]) for c in range(num_classes)]
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def class_orders(labels: np.ndarray, num_classes: int, seed: int, draw: int) -> list[np.ndarray]:
    """Per class, the positions of its images in a seeded random order of draw `draw`."""
    rng = np.random.default_rng([seed, draw])
    return [rng.permutation(m) for m in _class_members(labels, num_classes)]


def sample_per_class(orders: list[np.ndarray], n: int) -> np.ndarray:
    """Sorted positions of the first `n` images of every class's order (their union when
    an image has several labels). n = 0: all of them."""
    chosen = [order if n == 0 else order[:n] for order in orders]
    return np.unique(np.concatenate(chosen)).astype(np.int64)


def held_out(labels: np.ndarray, orders, max_n: int, cap: int, seed: int, draw: int) -> np.ndarray:
    """Sorted positions never among a draw's training images (the first `max_n` of each
    class's order), at most `cap` per class (0 = all; single-label only)."""
    used = sample_per_class(orders, max_n)
    rest = np.setdiff1d(np.arange(len(labels)), used)
    return cap_per_class(labels, rest, cap, seed, draw)


def cap_per_class(labels: np.ndarray, positions, cap: int, seed: int, draw: int) -> np.ndarray:
    """At most `cap` seeded positions per class from `positions` (cap 0 or multi-label:
    all of them)."""
    positions = np.asarray(positions, np.int64)
    if cap <= 0 or labels.ndim == 2:
        return np.sort(positions)
    rng = np.random.default_rng([seed, draw, 1])
    keep = [
        rng.permutation(positions[labels[positions] == c])[:cap]
        for c in np.unique(labels[positions])
    ]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def check_counts(labels: np.ndarray, class_names, per_class, held_out_test: bool):
    """Raises UsageError if a class has fewer images than the largest N needs."""
    counts = [len(m) for m in _class_members(labels, len(class_names))]
    need = max(per_class) + (1 if held_out_test else 0)  # 0 (all) needs nothing
    fewest = int(np.argmin(counts))
    if counts[fewest] < need:
        largest = counts[fewest] - (1 if held_out_test else 0)
        raise UsageError(
            f"class {class_names[fewest]!r} has {counts[fewest]} training images, fewer than "
            f"N={max(per_class)} per class{' plus 1 to test' if held_out_test else ''}: "
            f"use config.transfer.per_class values <= {largest}"
        )
