"""Occlusion throughput versus plain inference, printed as one JSON object.

Measured side by side in one run, on the same two-output model (the occlusion layer's map
sums + softmax, `occlusion.forward_fn`) at the same batch size:
  occluded_windows_per_s   `occlusion.occluded_outputs` over whole occluder grids (copies
                           built inside a tf.function, positions split into equal chunks)
  inference_images_per_s   the same function on ready-made batches of distinct images
Warm-up first (every shape traced), then repeats interleaved; the median of each is reported,
per wall-clock second and, steadier on a shared machine, per process CPU second.
Target: occluded / inference >= 0.8 (wall clock).

The model is the trained one of --workdir when it has a checkpoint, else an untrained one of
the config; images are synthetic (throughput does not depend on content).

Run: .venv/bin/python bench/occlusion.py [--workdir workdir] [--images 6] [--repeats 5]
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.conftest import load_config  # noqa: E402
from zf_tf.analyses import occlusion  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402
from zf_tf.training import workdirs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "workdir"))
    parser.add_argument("--images", type=int, default=6, help="images (grids) per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=0, help="0: config.analysis")
    args = parser.parse_args()
    config = load_config(args.config)
    cfg = config.analysis.occlusion
    batch_size = args.batch_size or config.analysis.batch_size
    trained = os.path.exists(workdirs.checkpoint_path(args.workdir))
    if trained:
        config = workdirs.load_config(args.workdir, config)
        model = workdirs.load_model(args.workdir)
    else:
        model = model_lib.build_model(config.model)
    s = config.data.crop_size
    size_px, stride_px, ys, xs = occlusion.occluder_grid(s, cfg.size, cfg.stride)
    windows = len(ys) * len(xs)
    fn = occlusion.forward_fn(model, cfg.layer)
    rng = np.random.default_rng(0)
    images = rng.normal(0, 60, (args.images, s, s, 3)).astype(np.float32)
    # Plain inference covers the same number of forward-pass images as the occlusion run.
    num_batches = max(1, round(args.images * windows / batch_size))
    batches = [
        tf.constant(rng.normal(0, 60, (batch_size, s, s, 3)).astype(np.float32))
        for _ in range(min(num_batches, 4))
    ]

    def timed(work, count):
        """(per wall second, per process CPU second): CPU time is steadier on a busy host."""
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)

    def occluded():
        def work():
            for image in images:
                occlusion.occluded_outputs(fn, image, size_px, stride_px, batch_size, ys, xs)

        return timed(work, args.images * windows)

    def inference():
        def work():
            for i in range(num_batches):
                fn(batches[i % len(batches)])

        return timed(work, num_batches * batch_size)

    occluded()  # warm-up: traces every chunk shape
    inference()
    rates = {"occluded": [], "inference": []}
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        rates["occluded"].append(occluded())
        rates["inference"].append(inference())
    med = {k: statistics.median(r[0] for r in v) for k, v in rates.items()}
    med_cpu = {k: statistics.median(r[1] for r in v) for k, v in rates.items()}
    chunks = -(-windows // batch_size)
    print(
        json.dumps(
            {
                "config": args.config,
                "model": "trained" if trained else "untrained",
                "layer": cfg.layer,
                "input_size": s,
                "occluder_px": size_px,
                "stride_px": stride_px,
                "windows_per_image": windows,
                "batch_size": batch_size,
                "occlusion_chunk": -(-windows // chunks),
                "occluded_windows_per_s": round(med["occluded"], 1),
                "inference_images_per_s": round(med["inference"], 1),
                "occluded_vs_inference": round(med["occluded"] / med["inference"], 3),
                "occluded_vs_inference_cpu_time": round(
                    med_cpu["occluded"] / med_cpu["inference"], 3
                ),
                "repeats": {k: [round(r[0], 1) for r in v] for k, v in rates.items()},
                "target": {"occluded_vs_inference": 0.8},
                "tf_version": tf.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
