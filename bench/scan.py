"""Top-k scan throughput against plain inference, and its memory, printed as one JSON object.

Configurations, each in its own fresh Python process, interleaved over `--repeats` rounds
(`bench/fresh.py`), on the same synthetic image stream (generated inside tf.data, so the
data itself occupies no memory):
  scan        topk.scan_layers of the layers: the running top-k of every feature map of
              each, from one forward pass per batch
  inference   plain batched inference of the same layers (one multi-output tap, each
              output reduced to a number so that nothing is pruned)
Rates are steady-state: images after the first batch (which traces and compiles) over the
time after it; `--n` is a multiple of the batch size, so no smaller last batch retraces.
  memory      (one more fresh process) peak RSS after scanning N and then 10 N images:
              memory must not grow with the data
Targets: median scan / median inference >= 0.9; peak growth from N to 10 N <= 10%.

Run: .venv/bin/python bench/scan.py [--config default|zfnet_imagenet] [--n 2048]
     [--layers conv5 | conv3,conv5 | conv (every conv layer: the Atlas's default)]
     [--repeats 3]
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.conftest import load_config  # noqa: E402
from zf_tf.core import graph, topk  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402

TARGETS = {"scan_vs_inference": 0.9, "memory_growth": 0.1}
CONFIGS = ("scan", "inference")


def stream(n: int, size: int, batch: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.range(n).map(
        lambda i: tf.random.stateless_normal((size, size, 3), seed=[i, 0]) * 60.0
    )
    return ds.batch(batch).prefetch(2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Clock:
    """Steady-state rate: images and seconds after the first batch."""

    def __init__(self):
        self.first, self.images = None, 0

    def __call__(self, n: int):
        if self.first is None:
            self.first = time.perf_counter()
        else:
            self.images += n

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.first)


def measure(name: str, args) -> dict:
    config = load_config(args.config)
    size = config.model.input_size
    model = model_lib.build_model(config.model)
    layers = graph.conv_layers(model) if args.layers == "conv" else args.layers.split(",")
    if name == "memory":
        topk.scan_layers(model, layers, stream(args.n, size, args.batch_size), k=args.k)
        peak_n = peak_rss_mb()
        topk.scan_layers(model, layers, stream(10 * args.n, size, args.batch_size), k=args.k)
        peak_10n = peak_rss_mb()
        return {
            "peak_rss_mb_after_n": round(peak_n, 1),
            "peak_rss_mb_after_10n": round(peak_10n, 1),
        }
    clock, cpu = Clock(), time.process_time()
    if name == "scan":
        topk.scan_layers(
            model, layers, stream(args.n, size, args.batch_size), k=args.k, progress=clock
        )
    else:
        tap = graph.tap(model, layers)
        infer = tf.function(lambda x: [tf.reduce_sum(t) for t in tap(x, training=False)])
        for images in stream(args.n, size, args.batch_size):
            [t.numpy() for t in infer(images)]
            clock(int(images.shape[0]))
    return {
        "images_per_s": clock.rate(),
        "cpu_s": time.process_time() - cpu,
        "layers": layers,
        "input_size": size,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CONFIGS + ("memory",), help="one, in this process")
    parser.add_argument("--config", default="default")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--layers", default="conv5", help="comma-separated, or 'conv'")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.n % args.batch_size:
        parser.error(f"--n={args.n} must be a multiple of --batch_size={args.batch_size}")
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    passed = fresh.passed_args()
    runs = fresh.interleaved(__file__, CONFIGS, args.repeats, passed)
    memory = fresh.interleaved(__file__, ["memory"], 1, passed)["memory"][0]
    rates = {name: [r["images_per_s"] for r in runs[name]] for name in CONFIGS}
    ratio = fresh.median_range([s / i for s, i in zip(rates["scan"], rates["inference"])])
    scan, inference = (fresh.median_range(rates[name], 1) for name in CONFIGS)
    growth = memory["peak_rss_mb_after_10n"] / memory["peak_rss_mb_after_n"] - 1
    report = {
        "config": args.config,
        "layers": runs["scan"][0]["layers"],
        "input_size": runs["scan"][0]["input_size"],
        "k": args.k,
        "n": args.n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "scan_images_per_s": scan,
        "inference_images_per_s": inference,
        "scan_vs_inference": round(scan["median"] / inference["median"], 3),
        "scan_vs_inference_per_round": ratio,
        **memory,
        "memory_growth": round(growth, 4),
        "targets": TARGETS,
        "meets_targets": scan["median"] / inference["median"] >= TARGETS["scan_vs_inference"]
        and growth <= TARGETS["memory_growth"],
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "tf_version": tf.__version__,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
