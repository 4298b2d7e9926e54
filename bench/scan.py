"""Top-k scan cost and memory, printed as one JSON object.

Measured side by side in one run on the same synthetic image stream (generated inside
tf.data, so the data itself occupies no memory):
  scan_images_per_s        topk.scan_layers of the layers (running top-k of every feature
                           map of each, from one forward pass per batch)
  inference_images_per_s   plain batched inference of the same layers (one multi-output tap)
  peak RSS after scanning N and then 10 N images (memory must not grow with the data)
Targets: scan / inference >= 0.9; peak growth from N to 10 N <= 10%.

Run: .venv/bin/python bench/scan.py [--config default|zfnet_imagenet] [--n 2000]
     [--layers conv5 | conv3,conv5 | conv (every conv layer: the Atlas's default)]
"""

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

from tests.conftest import load_config  # noqa: E402
from zf_tf.core import graph, topk  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402


def stream(n: int, size: int, batch: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.range(n).map(
        lambda i: tf.random.stateless_normal((size, size, 3), seed=[i, 0]) * 60.0
    )
    return ds.batch(batch).prefetch(2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--layers", default="conv5", help="comma-separated, or 'conv'")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--k", type=int, default=9)
    args = parser.parse_args()
    config = load_config(args.config)
    size = config.model.input_size
    model = model_lib.build_model(config.model)
    layers = graph.conv_layers(model) if args.layers == "conv" else args.layers.split(",")
    tap = graph.tap(model, layers)
    infer = tf.function(lambda x: [tf.reduce_sum(t) for t in tap(x, training=False)])

    def inference(n):
        t = time.perf_counter()
        for images in stream(n, size, args.batch_size):
            [t.numpy() for t in infer(images)]
        return n / (time.perf_counter() - t)

    def scan(n):
        t = time.perf_counter()
        topk.scan_layers(model, layers, stream(n, size, args.batch_size), k=args.k)
        return n / (time.perf_counter() - t)

    scan(args.batch_size * 2)  # trace both once
    inference(args.batch_size * 2)
    rates = {"scan": [], "inference": []}
    for _ in range(2):  # interleaved
        rates["scan"].append(scan(args.n))
        rates["inference"].append(inference(args.n))
    peak_n = peak_rss_mb()
    scan(10 * args.n)
    peak_10n = peak_rss_mb()
    best = {k: max(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "config": args.config,
                "layers": layers,
                "input_size": size,
                "k": args.k,
                "scan_images_per_s": round(best["scan"], 1),
                "inference_images_per_s": round(best["inference"], 1),
                "scan_vs_inference": round(best["scan"] / best["inference"], 3),
                "peak_rss_mb_after_n": round(peak_n, 1),
                "peak_rss_mb_after_10n": round(peak_10n, 1),
                "n": args.n,
                "memory_growth": round(peak_10n / peak_n - 1, 4),
                "targets": {"scan_vs_inference": 0.9, "memory_growth": 0.1},
                "tf_version": tf.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
