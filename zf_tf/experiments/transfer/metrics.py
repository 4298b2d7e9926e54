"""The transfer metrics from class scores: mean per-class accuracy (the Caltech protocol)
and, for multi-label targets, mean average precision (PASCAL VOC 2010+ definition).

Both are written out in numpy: Keras has no mean per-class accuracy, and its PR-curve
`keras.metrics.AUC(curve="PR")` is not VOC's AP (it integrates over 200 thresholds; on the
ranked hits 0,1,0,1,1 it gives 0.43, 0.53 with `summation_method="majoring"`, where the
VOC AP is 0.6).
"""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of one class (PASCAL VOC 2010+): the area under the precision-
    recall curve whose precision is made monotone (at each recall, the best precision at
    that or any higher recall). Images are ranked by score; ties keep input order.

    Returns:
      AP in [0, 1], or NaN if there is no positive.
    """
    positives = np.asarray(positives, bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = positives[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    # Recall rises by 1/P exactly at the positives, so the area sums their envelope.
    return float(envelope[hits].sum() / hits.sum())


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, multi_label: bool) -> dict:
    """The target's metric from class scores (N, C).

    Returns:
      Single-label: {'metric': mean per-class accuracy %, 'accuracy': overall %,
      'per_class': [% per class, NaN if absent]}; multi-label: {'metric': mAP %,
      'per_class': [AP % per class, NaN without positives]}.
    """
    num_classes = scores.shape[1]
    if multi_label:
        ap = [100 * average_precision(scores[:, c], labels[:, c]) for c in range(num_classes)]
        return {"metric": float(np.nanmean(ap)), "per_class": ap}
    pred = np.argmax(scores, axis=1)
    per_class = [
        100 * float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else float("nan")
        for c in range(num_classes)
    ]
    return {
        "metric": float(np.nanmean(per_class)),
        "accuracy": 100 * float(np.mean(pred == labels)),
        "per_class": per_class,
    }
