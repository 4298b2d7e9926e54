"""Top-1/top-5 error with 10-crop averaging and with the center crop alone (paper Table 2)."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from zf_tf import outputs
from zf_tf.pipelines import inputs, preprocess


def ten_crop_probabilities(model, config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of every crop of every image of a split.

    Returns:
      (probabilities float32 (N, 10, C), labels int64 (N,)).
    """
    s = config.data.crop_size

    @tf.function
    def predict(crops):
        logits = model(tf.reshape(crops, [-1, s, s, 3]), training=False)
        return tf.reshape(tf.nn.softmax(logits), [tf.shape(crops)[0], preprocess.NUM_CROPS, -1])

    probs, labels = [], []
    for crops, y in inputs.build_inputs(config, split, mode="ten_crop"):
        probs.append(predict(crops).numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def error_rates(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 error (%) of (N, C) class scores (probabilities or logits: the
    ranking, and so the errors, are the same).

    The top 5 are `keras.ops.top_k`'s (ties: the lower class id first), scored by
    `keras.metrics.sparse_top_k_categorical_accuracy` on those ids. Not the scores
    themselves: that metric then uses `tf.math.in_top_k`, which counts every class tied
    at the boundary as a hit, so a model with constant outputs would score 0% error
    (measured).
    """
    scores = np.asarray(scores)
    _, top = keras.ops.top_k(scores, k=min(5, scores.shape[1]))
    errors = {}
    for k in (1, 5):
        hits = keras.metrics.sparse_top_k_categorical_accuracy(
            labels, top, k=k, from_sorted_ids=True
        )
        errors[f"top{k}_error"] = float(100 * np.mean(np.asarray(hits) == 0))
    return errors


def table(results: dict) -> str:
    """The results as a markdown table in the form of the paper's Table 2."""
    split = results["split"]
    lines = [
        f"| Error % ({split}, {results['num_images']} images) | Top-1 | Top-5 |",
        "|---|---|---|",
    ]
    for key, name in (
        ("ten_crop", "1 convnet, 10 crops averaged"),
        ("center_crop", "1 convnet, center crop"),
    ):
        r = results[key]
        lines.append(f"| {name} | {r['top1_error']:.1f} | {r['top5_error']:.1f} |")
    return "\n".join(lines) + "\n"


def evaluate(config, workdir: str, model, split: str | None = None) -> dict:
    """Evaluates `model` on a split; writes eval.json and eval.md into the workdir.

    Returns:
      {'split', 'num_images', 'skipped_images', 'ten_crop': {...}, 'center_crop': {...}}
      with error rates; `skipped_images` counts images of the split that failed to decode
      (dropped by the pipeline, not counted as errors).
    """
    split = split or config.data.eval_split
    expected = inputs.num_examples(config.data, split)
    probs, labels = ten_crop_probabilities(model, config, split)
    skipped = expected - len(labels)
    if skipped:
        print(f"{skipped} of {expected} {split} images could not be decoded and are not scored")
    results = {
        "split": split,
        "num_images": int(len(labels)),
        "skipped_images": int(skipped),
        "ten_crop": error_rates(probs.mean(axis=1), labels),
        "center_crop": error_rates(probs[:, preprocess.CENTER_CROP], labels),
    }
    os.makedirs(workdir, exist_ok=True)
    outputs.save_text(os.path.join(workdir, "eval.json"), json.dumps(results, indent=2))
    outputs.save_text(os.path.join(workdir, "eval.md"), table(results))
    print(table(results))
    return results
