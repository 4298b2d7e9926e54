"""Input-pipeline throughput and folder indexing, one configuration per fresh process.

On the same photos, each configuration runs in its own Python process, interleaved round by
round (A, B, C, ..., A, B, C, ...), `--repeats` rounds; in a process one warm-up pass, then
`--passes` timed passes of `--epochs` epochs' worth of images each, all from one iterator
(the steady state: every reader repeats; median). The JSON gives each figure's median and
range over the rounds. CPU ms per image count every thread of the process: images/s per
core = 1000 / that.

  original              `build_inputs(config, 'train', normalize=False)` on the class folder of
                        original JPEGs at S=256, s=224: the host's share of training input
                        (read, shuffle, decode the crop window, resize, flip, batch; training
                        normalizes the batches on its device, in the train step)
  prepared              the same on shards that `--mode=prepare` wrote from those photos
                        (`config.data.source='prepared'`: decode a 224 window of a 256 JPEG)
  prepared_raw          the same on shards of raw squares (`config.prepare.encoding='raw'`:
                        slice a 224 window of the 256 x 256 uint8 pixels, no decoding)
  bare_decode_original  `decode_jpeg(read_file(path))` of the originals, nothing else
  bare_decode_prepared  read + parse + `decode_jpeg` of the prepared shards, nothing else
  bare_decode_prepared_raw  read + parse + `parse_tensor` of the raw shards, nothing else
  image_dataset_from_directory  Keras' own folder reader at 224 x 224, for reference
  service               `original` through the tf.data service: a dispatcher and 2 local
                        workers as processes (`python -m zf_tf.pipelines.service`); the trainer's
                        process only receives batches
  index_cold, index_warm  `folder.index_folder` of a generated tree of `--index_files` tiny
                        JPEGs in 100 classes: with no cache (every file opened and decoded),
                        then in a new process with the cache the first left (stat only),
                        and a second time in that process (`folder.indexed`: no work)

Targets: prepared vs original >= 5x images/s per core; prepared vs bare decode of the
prepared files >= 0.8x (images/s); `meets_targets` says for each encoding.

Images: ../shared/data/imagenet-samples if present, else 300 generated JPEGs; --images DIR
overrides. Run from the repo root:
    .venv/bin/python bench/pipeline.py [--repeats 3] [--passes 3] [--batch_size 64]
Prints one JSON object on stdout; logs go to stderr.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from fresh import interleaved, log, median_range, passed_args  # noqa: E402

SAMPLES = os.path.join(ROOT, "..", "shared", "data", "imagenet-samples")
S, CROP = 256, 224
TARGETS = {"prepared_vs_original_per_core": 5.0, "prepared_vs_bare_decode_prepared": 0.8}
ENCODINGS = {"prepared": "jpeg", "prepared_raw": "raw"}  # prepared folder -> encoding
PIPELINES = (
    "original",
    "prepared",
    "prepared_raw",
    "bare_decode_original",
    "bare_decode_prepared",
    "bare_decode_prepared_raw",
    "image_dataset_from_directory",
    "service",
)
INDEX = ("index_cold", "index_warm")


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
    """Symlinks the images of `source` round robin into train_root/c<k>/."""
    files = sorted(f for f in os.listdir(source) if f.lower().endswith((".jpg", ".jpeg")))
    for i, name in enumerate(files):
        os.makedirs(os.path.join(train_root, f"c{i % num_classes}"), exist_ok=True)
        os.symlink(
            os.path.join(source, name), os.path.join(train_root, f"c{i % num_classes}", name)
        )
    return len(files)


def index_tree(root, count):
    """`count` distinct tiny valid JPEGs in 100 class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, f"c{i % 100:03d}")
        if i < 100:
            os.makedirs(folder)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.jpg"), quality=75)


def config_for(workspace, source, batch, prepared_dir="prepared"):
    from zf_tf.configs import default

    config = default.get_config()
    config.data.source, config.data.folder = source, os.path.join(workspace, "photos")
    config.data.prepared_dir = os.path.join(workspace, prepared_dir)
    config.data.cache, config.data.num_classes = False, 10
    config.data.resize_size, config.data.crop_size = S, CROP
    config.data.input_threads = 0  # all cores for the input pipeline alone (as on ImageNet)
    config.train.batch_size = batch
    return config


def setup(workspace, images, index_files):
    """Photos as a class tree, their prepared shards, and the index tree (parent only)."""
    from zf_tf.pipelines import prepare

    source = images or (SAMPLES if os.path.isdir(SAMPLES) else None)
    if source is None:
        source = os.path.join(workspace, "generated")
        os.makedirs(source)
        log(f"{SAMPLES} not found: generating JPEGs in {source}")
        generate_images(source)
    n = class_tree(os.path.abspath(source), os.path.join(workspace, "photos", "train"))
    for folder, encoding in ENCODINGS.items():
        config = config_for(workspace, "folder", 64, folder)
        with contextlib.redirect_stdout(sys.stderr):
            prepare.prepare(
                config.data, config.data.prepared_dir, ["train"], progress=False, encoding=encoding
            )
    if index_files:
        log(f"generating {index_files} files for the index benchmark ...")
        index_tree(os.path.join(workspace, "index"), index_files)
    origin = "generated" if source.startswith(workspace) else os.path.realpath(source)
    return n, origin


def timed_pass(iterator, count_fn, images):
    """(wall s, CPU s, images) of the next `images` (or a little more) of an iterator."""
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    while seen < images:
        seen += count_fn(next(iterator))
    return time.perf_counter() - start, time.process_time() - cpu, seen


def measure_pipeline(name, workspace, batch, passes, epochs):
    import tensorflow as tf

    from zf_tf.pipelines import folder as folder_lib
    from zf_tf.pipelines import inputs, prepared, service

    folder = name.replace("bare_decode_", "")  # prepared, prepared_raw, or another name
    if folder in ENCODINGS:
        config = config_for(workspace, "prepared", batch, folder)
    else:
        config = config_for(workspace, "folder", batch)
    n = inputs.num_examples(config.data, "train")
    per_batch = lambda e: int(e[0].shape[0])  # noqa: E731
    procs = []
    if name in ("original", "prepared", "prepared_raw", "service"):
        if name == "service":
            config.data.service_address, procs = service.spawn(2)
        ds, count = inputs.build_inputs(config, "train", normalize=False), per_batch
    elif name == "bare_decode_original":
        paths = folder_lib.split_files(config.data.folder, "train")[0]
        ds = tf.data.Dataset.from_tensor_slices(paths).map(
            lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds, count = ds.repeat().prefetch(tf.data.AUTOTUNE), lambda e: 1
    elif name in ("bare_decode_prepared", "bare_decode_prepared_raw"):
        raw = name.endswith("_raw")
        ds = prepared.records(config.data, "train").map(
            lambda e, y: (
                tf.io.parse_tensor(e, tf.uint8) if raw else tf.io.decode_jpeg(e, channels=3)
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds, count = ds.repeat().prefetch(tf.data.AUTOTUNE), lambda e: 1
    else:
        import keras

        with contextlib.redirect_stdout(sys.stderr):  # "Found N files ..."
            ds = keras.utils.image_dataset_from_directory(
                os.path.join(config.data.folder, "train"),
                image_size=(CROP, CROP),
                batch_size=batch,
                shuffle=False,
            )
        ds, count = ds.repeat(), per_batch
    try:
        rates, cpu_ms, iterator = [], [], iter(ds)
        for p in range(passes + 1):
            seconds, cpu, images = timed_pass(iterator, count, epochs * n)
            log(
                f"  {name} pass {p}: {images} images, {images / seconds:.1f}/s, "
                f"{1000 * cpu / images:.2f} cpu-ms/image" + (" (warm-up)" if p == 0 else "")
            )
            if p:
                rates.append(images / seconds)
                cpu_ms.append(1000 * cpu / images)
    finally:
        iterator = None  # a client still connected would keep the servers waiting
        service.stop(procs)
    return {"images_per_s": statistics.median(rates), "cpu_ms_per_image": statistics.median(cpu_ms)}


def measure_index(name, workspace):
    from zf_tf.pipelines import folder

    root = os.path.join(workspace, "index")
    cache = os.path.join(os.environ["ZF_TF_CACHE_DIR"], "file-checks")
    if name == "index_cold":
        shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    index = folder.indexed(root)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = folder.indexed(root)
    second = time.perf_counter() - start
    assert again is index
    return {"files": len(index.paths), "seconds": first, "in_process_again_s": second}


def child(args):
    if args.only in INDEX:
        result = measure_index(args.only, args.workspace)
    else:
        result = measure_pipeline(
            args.only, args.workspace, args.batch_size, args.passes, args.epochs
        )
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=None, help="flat folder of JPEGs")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process rounds")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per process")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="over the photos per pass")
    parser.add_argument("--index_files", type=int, default=100_000, help="0 = skip")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workspace", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return child(args)

    workspace = tempfile.mkdtemp(prefix="zf_bench_pipeline_")
    os.environ["ZF_TF_CACHE_DIR"] = os.path.join(workspace, "cache")
    try:
        n, origin = setup(workspace, args.images, args.index_files)
        if n < args.batch_size:
            raise SystemExit(f"need at least --batch_size={args.batch_size} JPEGs, have {n}")
        log(f"{n} photos from {origin}; prepared shards at S={S}")
        names = list(PIPELINES) + (list(INDEX) if args.index_files else [])
        runs = interleaved(
            __file__, names, max(1, args.repeats), [*passed_args(), f"--workspace={workspace}"]
        )
        shard_bytes = {
            encoding: sum(
                os.path.getsize(os.path.join(workspace, folder, f))
                for f in os.listdir(os.path.join(workspace, folder))
                if f.endswith(".tfrecord")
            )
            for folder, encoding in ENCODINGS.items()
        }
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    def figure(name, key, digits=1):
        return median_range([r[key] for r in runs[name]], digits)

    def per_round(a, b, key, invert=False):
        ratios = [
            (y[key] / x[key]) if invert else (x[key] / y[key]) for x, y in zip(runs[a], runs[b])
        ]
        return median_range(ratios, 3)

    per_core = per_round("prepared", "original", "cpu_ms_per_image", invert=True)
    vs_bare = per_round("prepared", "bare_decode_prepared", "images_per_s")
    raw_per_core = per_round("prepared_raw", "original", "cpu_ms_per_image", invert=True)
    raw_vs_bare = per_round("prepared_raw", "bare_decode_prepared_raw", "images_per_s")

    def meets(per_core, vs_bare):
        return bool(
            per_core["median"] >= TARGETS["prepared_vs_original_per_core"]
            and vs_bare["median"] >= TARGETS["prepared_vs_bare_decode_prepared"]
        )

    out = {
        "images_per_s": {k: figure(k, "images_per_s") for k in PIPELINES},
        "cpu_ms_per_image": {k: figure(k, "cpu_ms_per_image", 3) for k in PIPELINES},
        "prepared_vs_original_per_core": per_core,
        "prepared_vs_original_wall": per_round("prepared", "original", "images_per_s"),
        "prepared_vs_bare_decode_prepared": vs_bare,
        "prepared_raw_vs_original_per_core": raw_per_core,
        "prepared_raw_vs_bare_decode_prepared_raw": raw_vs_bare,
        "original_vs_bare_decode_original": per_round(
            "original", "bare_decode_original", "images_per_s"
        ),
        "service_vs_original_wall": per_round("service", "original", "images_per_s"),
        "targets": TARGETS,
        "meets_targets": {
            "jpeg": meets(per_core, vs_bare),
            "raw": meets(raw_per_core, raw_vs_bare),
        },
        "prepared_bytes_per_image": {e: round(b / n) for e, b in shard_bytes.items()},
        "num_images": n,
        "source": origin,
        "batch_size": args.batch_size,
        "resize_size": S,
        "crop_size": CROP,
        "rounds": max(1, args.repeats),
        "timed_passes_per_process": args.passes,
        "cpu_count": os.cpu_count(),
    }
    if args.index_files:
        out["index"] = {
            "files": runs["index_cold"][0]["files"],
            "cold_s": figure("index_cold", "seconds", 2),
            "warm_new_process_s": figure("index_warm", "seconds", 2),
            "in_process_again_s": figure("index_warm", "in_process_again_s", 6),
        }
    import tensorflow as tf

    out["tf_version"] = tf.__version__
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
