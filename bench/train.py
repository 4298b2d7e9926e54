"""Training throughput of the full 224-px ZFNet, printed as one JSON object.

Measured side by side in one run (same process, same global batch):
  default_images_per_s    one replica, synthetic in-memory batch
  mirrored_images_per_s   MirroredStrategy over 2 logical CPU devices (GPUs if present)
  pipeline_images_per_s   default strategy fed by the real 10-crop pipeline from JPEGs
  matmul_flops_per_s      a 4096x4096 float32 matmul, the machine's practical peak
Ratios and targets: mirrored/default >= 0.85, pipeline/in-memory >= 0.9, achieved training
FLOP/s / matmul FLOP/s >= 0.8 (training FLOPs = 3 x forward FLOPs per image).

Run: .venv/bin/python bench/train.py [--batch_size 32] [--steps 8] [--images DIR]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import tensorflow as tf

# Logical devices must exist before any other TF op.
_CPU = tf.config.list_physical_devices("CPU")[0]
if not tf.config.list_physical_devices("GPU"):
    tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipelines import inputs  # noqa: E402
from tests.conftest import load_config  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402
from zf_tf.training import strategies, train  # noqa: E402


def forward_flops(model: keras.Model) -> float:
    """Multiply-adds x 2 of the conv and dense layers for one image."""
    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            k = np.prod(layer.kernel.shape)  # kh * kw * cin * cout
            h, w = layer.output.shape[1:3]
            total += 2.0 * k * h * w
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * np.prod(layer.kernel.shape)
    return total


def matmul_flops_per_s(n=4096, repeats=5) -> float:
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def images_per_s(strategy, config, dataset_fn, steps: int) -> float:
    with strategy.scope():
        model = train.compile_model(model_lib.build_model(config.model), config)
    ds = strategy.distribute_datasets_from_function(dataset_fn)
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)  # compile + warm up
    t = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * config.train.batch_size / (time.perf_counter() - t)


def jpeg_folder(source: str | None) -> str:
    """A folder of class subfolders of JPEGs (symlinks to ../shared samples, or generated)."""
    root = tempfile.mkdtemp(prefix="bench_train_")
    shared = source or os.path.join(ROOT, "..", "shared", "data", "imagenet-samples")
    files = sorted(os.listdir(shared)) if os.path.isdir(shared) else []
    os.makedirs(os.path.join(root, "train", "all"))
    if files:
        for f in files:
            os.symlink(
                os.path.join(os.path.abspath(shared), f), os.path.join(root, "train", "all", f)
            )
    else:
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(200):
            array = rng.integers(0, 256, (300 + i % 5 * 60, 400, 3), dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(root, "train", "all", f"{i}.jpg"), quality=90)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", default=None)
    args = parser.parse_args()

    config = load_config("zfnet_imagenet")
    config.train.batch_size = args.batch_size
    s = config.data.crop_size
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(args.batch_size, s, s, 3)) * 60).astype(np.float32)
    y = rng.integers(0, 1000, size=(args.batch_size,)).astype(np.int64)

    def synthetic(ctx):
        b = ctx.get_per_replica_batch_size(args.batch_size)
        return tf.data.Dataset.from_tensors((x[:b], y[:b])).repeat()

    config.data.source = "folder"
    config.data.folder = jpeg_folder(args.images)
    config.data.num_classes = 1000

    def real(ctx):
        return inputs.build_inputs(config, "train", ctx, "train")

    default = tf.distribute.get_strategy()
    mirrored = strategies.make_strategy("mirrored")
    matmul = matmul_flops_per_s()
    print("measuring default / mirrored / pipeline ...", file=sys.stderr)
    rates = {"default": [], "mirrored": [], "pipeline": []}
    for _ in range(2):  # interleaved so machine noise hits all three
        rates["default"].append(images_per_s(default, config, synthetic, args.steps))
        rates["mirrored"].append(images_per_s(mirrored, config, synthetic, args.steps))
        rates["pipeline"].append(images_per_s(default, config, real, args.steps))
    best = {k: max(v) for k, v in rates.items()}
    matmul = max(matmul, matmul_flops_per_s())
    flops_per_image = 3 * forward_flops(model_lib.build_model(config.model))
    achieved = best["default"] * flops_per_image
    print(
        json.dumps(
            {
                "input_size": s,
                "global_batch": args.batch_size,
                "replicas_mirrored": mirrored.num_replicas_in_sync,
                "default_images_per_s": round(best["default"], 2),
                "mirrored_images_per_s": round(best["mirrored"], 2),
                "pipeline_images_per_s": round(best["pipeline"], 2),
                "mirrored_vs_default": round(best["mirrored"] / best["default"], 3),
                "pipeline_vs_in_memory": round(best["pipeline"] / best["default"], 3),
                "training_gflop_per_image": round(flops_per_image / 1e9, 3),
                "achieved_gflop_per_s": round(achieved / 1e9, 1),
                "matmul_gflop_per_s": round(matmul / 1e9, 1),
                "fraction_of_matmul": round(achieved / matmul, 3),
                "targets": {
                    "mirrored_vs_default": 0.85,
                    "pipeline_vs_in_memory": 0.9,
                    "fraction_of_matmul": 0.8,
                },
                "device": tf.config.list_physical_devices("GPU")
                and "GPU"
                or f"CPU x{os.cpu_count()}",
                "tf_version": tf.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
