"""Feature visualization throughput: zf_tf's batched optimizer vs tf-keras-vis.

Configurations (`--only`; default: every one, each in its own fresh Python process,
interleaved over `--repeats` rounds, reporting the median and range of every figure):
  <model>_<layer>_<method>
  model   default: configs/default.py's ZFNet (64 px, width 0.25), random weights
          paper:   configs/zfnet_imagenet.py's ZFNet (224 px, full width), random weights
  layer   conv1 .. conv5 (`--layers`)
  method  zf_tf:  zf_tf.core.featvis.Optimizer (1/f Fourier basis, decorrelated colour,
                  jitter/scale/rotation in the graph, Adam; all units in one batch)
          tfkv:   tf_keras_vis.activation_maximization.ActivationMaximization with its
                  defaults (raw pixels, RMSprop, total variation and L1 regularizers,
                  Jitter(4) and Rotate2D(1) done with numpy/scipy), the same units in one
                  call (a batch of seed inputs and CategoricalScore(units): as its API
                  allows), the same number of steps
Each child optimizes `--units` units of the layer (the first ones; all if it has fewer) for
`--steps` steps, after a warm-up call (the same units, 2 steps: tracing) that is not timed,
and reports seconds per unit and the channel objective (mean of the unit's map) that each
method's final images reach, measured the same way (the model's own layers, no transform).

Targets (README, issue "Feature visualization"): zf_tf >= 5x tf-keras-vis' units per
second, and its activation >= 0.9 of tf-keras-vis' (the median over units of the ratio).

Run from the repo root:  .venv/bin/python bench/featvis.py [--models=default]
[--layers=conv1,conv5] [--repeats=3]. Prints one JSON object on stdout; progress on stderr.
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from zf_tf import cli  # noqa: E402
from zf_tf.core import featvis, graph  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402
from zf_tf.pipelines import preprocess  # noqa: E402

TARGETS = {"speedup": 5.0, "activation_ratio": 0.9}
MODELS = {"default": "configs/default.py", "paper": "configs/zfnet_imagenet.py"}
METHODS = ("zf_tf", "tfkv")


def build(model_name: str):
    """(model, pixels) of a config's ZFNet with seeded random weights."""
    config = cli.load_config(MODELS[model_name])
    keras.utils.set_random_seed(0)
    return model_lib.build_model(config.model), preprocess.pixels(config.data)


def channel_means(model, layer: str, inputs, units) -> np.ndarray:
    maps = graph.tap(model, [layer])(inputs, training=False).numpy()
    return np.array([maps[i, ..., u].mean() for i, u in enumerate(units)])


def run_zf_tf(model, pixels, layer, units, steps):
    to_input = lambda x: pixels.normalize(x * 255.0)  # noqa: E731
    optimizer = featvis.Optimizer(model, layer, to_input, featvis.Params(steps=steps))
    optimizer.run(units, steps=2)  # warm-up: traces the step for this batch
    start = time.perf_counter()
    out = optimizer.run(units)
    seconds = time.perf_counter() - start
    inputs = to_input(tf.constant(out["image"]))
    return seconds, channel_means(model, layer, inputs, units)


def run_tfkv(model, pixels, layer, units, steps):
    from tf_keras_vis.activation_maximization import ActivationMaximization
    from tf_keras_vis.utils.model_modifiers import ExtractIntermediateLayer
    from tf_keras_vis.utils.scores import CategoricalScore

    size = graph.static_shape(model)[0]
    corners = pixels.normalize(np.array([[0.0] * 3, [255.0] * 3], np.float32)).numpy()
    low, high = float(corners.min()), float(corners.max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        visualize = ActivationMaximization(model, ExtractIntermediateLayer(layer), clone=True)
        seeds = lambda n: tf.random.uniform((n, size, size, 3), low, high, seed=0)  # noqa: E731
        visualize(CategoricalScore(units), seeds(len(units)), input_range=(low, high), steps=2)
        start = time.perf_counter()
        images = visualize(
            CategoricalScore(units), seeds(len(units)), input_range=(low, high), steps=steps
        )
        seconds = time.perf_counter() - start
    return seconds, channel_means(model, layer, tf.constant(images, tf.float32), units)


def child(args):
    model_name, layer, method = args.only.split("_", 2)
    model, pixels = build(model_name)
    units = list(range(min(args.units, int(graph.find(model, layer).output.shape[-1]))))
    run = run_zf_tf if method == "zf_tf" else run_tfkv
    seconds, values = run(model, pixels, layer, units, args.steps)
    print(
        json.dumps(
            {
                "seconds_per_unit": seconds / len(units),
                "values": [float(v) for v in values],
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--models", default="default,paper")
    parser.add_argument("--layers", default="conv1,conv2,conv3,conv4,conv5")
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.only:
        return child(args)
    names = [
        f"{m}_{layer}_{method}"
        for m in args.models.split(",")
        for layer in args.layers.split(",")
        for method in METHODS
    ]
    runs = fresh.interleaved(__file__, names, args.repeats, fresh.passed_args())
    report = {
        "benchmark": "featvis",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "units": args.units,
        "steps": args.steps,
        "targets": TARGETS,
        "configurations": {},
    }
    for m in args.models.split(","):
        for layer in args.layers.split(","):
            ours, theirs = runs[f"{m}_{layer}_zf_tf"], runs[f"{m}_{layer}_tfkv"]
            speedups = [t["seconds_per_unit"] / o["seconds_per_unit"] for o, t in zip(ours, theirs)]
            ratios = [
                float(np.median(np.array(o["values"]) / np.maximum(np.array(t["values"]), 1e-9)))
                for o, t in zip(ours, theirs)
            ]
            report["configurations"][f"{m}_{layer}"] = {
                "zf_tf_seconds_per_unit": fresh.median_range([o["seconds_per_unit"] for o in ours]),
                "tfkv_seconds_per_unit": fresh.median_range(
                    [t["seconds_per_unit"] for t in theirs]
                ),
                "speedup": fresh.median_range(speedups),
                "activation_ratio": fresh.median_range(ratios),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
