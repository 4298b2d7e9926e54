"""Input-pipeline throughput: our training pipeline vs bare JPEG decoding vs Keras.

On the same files, interleaved pass by pass (a, b, c, a, b, c, ...) so that machine
noise hits all three alike:
  a. `pipelines.inputs.build_inputs(config, 'train', mode='train')` on a class folder at
     S=256, s=224 (read, shuffle, decode the crop window, resize, flip, mean, batch);
     it repeats forever, so a pass takes num_images // batch_size batches;
  b. bare `decode_jpeg(read_file(path), channels=3)`, parallel map, unbatched, no resize;
  c. `keras.utils.image_dataset_from_directory(root, image_size=(224, 224), shuffle=False)`.
A pass iterates a fresh iterator, timed from the first request (creating the iterator
is a one-time cost), and only counts. Pass 0 is warm-up; rates are medians of the rest.
CPU ms per image (all threads of this process) are reported too: on a shared machine
they vary far less than wall-clock rates.

Target: pipeline >= 0.8x the bare-decode rate (`meets_target`).

Images: ../shared/data/imagenet-samples (from the repo root) if present, else 300
generated JPEGs; --images DIR overrides. They are symlinked round robin into
TMP/train/c0..c9 so both readers see class folders (the 'train' split = all files).

Run from the repo root:  .venv/bin/python bench/pipeline.py [--repeats 5] [--batch_size 64]
Prints one JSON object on stdout; logs go to stderr.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from configs import default  # noqa: E402
from pipelines import inputs  # noqa: E402

SAMPLES = os.path.join(ROOT, "..", "shared", "data", "imagenet-samples")
TARGET = 0.8


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def generate_images(folder, count=300, seed=0):
    """JPEGs from 400x300 to 800x600 (every 25th grayscale): smooth pattern + noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(400, 801)), int(rng.integers(300, 601))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c) + np.cos(5 * (c + 1) * yy) for c in range(3)], -1)
        pixels = np.clip(64 * base + 128 + rng.normal(0, 12, (h, w, 3)), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        image = image.convert("L") if i % 25 == 0 else image
        image.save(os.path.join(folder, f"gen_{i:04d}.JPEG"), quality=90)


def class_tree(source, train_root, num_classes=10):
    """Symlinks the images of `source` round robin into train_root/c<k>/; returns paths."""
    files = sorted(f for f in os.listdir(source) if f.lower().endswith((".jpg", ".jpeg")))
    paths = []
    for i, name in enumerate(files):
        os.makedirs(os.path.join(train_root, f"c{i % num_classes}"), exist_ok=True)
        paths.append(os.path.join(train_root, f"c{i % num_classes}", name))
        os.symlink(os.path.join(source, name), paths[-1])
    return paths


def timed_pass(dataset, count_fn, steps=None):
    """(wall s, CPU s, images) of one pass over a fresh iterator; `steps` caps elements."""
    iterator = iter(dataset)
    start, cpu, images = time.perf_counter(), time.process_time(), 0
    for element in iterator:
        images += count_fn(element)
        steps = None if steps is None else steps - 1
        if steps == 0:
            break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    del iterator
    return seconds, cpu, images


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=None, help="flat folder of JPEGs")
    parser.add_argument("--repeats", type=int, default=5, help="passes, incl. 1 warm-up")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    repeats, batch = max(2, args.repeats), args.batch_size

    with tempfile.TemporaryDirectory(prefix="zf_bench_") as tmp:
        source = args.images or (SAMPLES if os.path.isdir(SAMPLES) else None)
        if source is None:
            source = os.path.join(tmp, "generated")
            os.makedirs(source)
            log(f"{SAMPLES} not found: generating JPEGs in {source}")
            generate_images(source)
        train_root = os.path.join(tmp, "train")
        paths = class_tree(os.path.abspath(source), train_root)
        source = "generated" if source.startswith(tmp) else os.path.realpath(source)
        n = len(paths)
        if n < batch:
            raise SystemExit(f"need at least --batch_size={batch} JPEGs in {source}, have {n}")
        log(f"{n} images from {source}")

        config = default.get_config()
        config.data.source, config.data.folder, config.data.cache = "folder", tmp, False
        config.data.resize_size, config.data.crop_size = 256, 224
        config.data.input_threads = 0  # all cores for the input pipeline alone (as on ImageNet)
        config.train.batch_size = batch
        pipeline = inputs.build_inputs(config, "train", mode="train")
        bare = (
            tf.data.Dataset.from_tensor_slices(paths)
            .map(
                lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .prefetch(tf.data.AUTOTUNE)
        )
        import keras

        with contextlib.redirect_stdout(sys.stderr):  # "Found N files ..."
            keras_ds = keras.utils.image_dataset_from_directory(
                train_root, image_size=(224, 224), batch_size=batch, shuffle=False
            )

        per_batch = lambda e: int(e[0].shape[0])  # noqa: E731
        runs = {
            "pipeline": (pipeline, per_batch, n // batch),
            "bare_decode": (bare, lambda e: 1, None),
            "image_dataset_from_directory": (keras_ds, per_batch, None),
        }
        rates, cpu_ms = {k: [] for k in runs}, {k: [] for k in runs}
        for r in range(repeats):
            for name, (ds, count_fn, steps) in runs.items():
                seconds, cpu, images = timed_pass(ds, count_fn, steps)
                log(
                    f"pass {r} {name}: {images} images, {seconds:.2f} s, "
                    f"{images / seconds:.1f}/s, {1000 * cpu / images:.2f} cpu-ms/image"
                    + (" (warm-up)" if r == 0 else "")
                )
                if r > 0:
                    rates[name].append(images / seconds)
                    cpu_ms[name].append(1000 * cpu / images)

    rate = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: round(statistics.median(v), 3) for k, v in cpu_ms.items()}
    ratio = rate["pipeline"] / rate["bare_decode"]
    print(
        json.dumps(
            {
                "pipeline_images_per_s": round(rate["pipeline"], 1),
                "bare_decode_images_per_s": round(rate["bare_decode"], 1),
                "image_dataset_from_directory_images_per_s": round(
                    rate["image_dataset_from_directory"], 1
                ),
                "pipeline_vs_bare_decode": round(ratio, 3),
                "pipeline_vs_image_dataset_from_directory": round(
                    rate["pipeline"] / rate["image_dataset_from_directory"], 3
                ),
                "target_pipeline_vs_bare_decode": TARGET,
                "meets_target": bool(ratio >= TARGET),
                "cpu_ms_per_image": cpu,
                "pipeline_vs_bare_decode_by_cpu": round(cpu["bare_decode"] / cpu["pipeline"], 3),
                "num_images": n,
                "timed_passes": repeats - 1,
                "source": source,
                "batch_size": batch,
                "resize_size": 256,
                "crop_size": 224,
                "cpu_count": os.cpu_count(),
                "tf_version": tf.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
