"""Training throughput of ZFNet (default: the full 224-px paper model), printed as one JSON
object.

Configurations (`--only`; default: all, each in its own fresh Python process, interleaved
default, mirrored, pipeline, [prepared,] default, ... over `--repeats` rounds;
bench/fresh.py), same global batch:
  default    one replica, synthetic in-memory batch
  mirrored   MirroredStrategy over 2 logical CPU devices (GPUs if present), same batch
  pipeline   `--strategy` (default: one replica) fed by the config's real training
             pipeline from JPEGs, as training feeds it: 0..255 batches, normalized in the
             train step. `--images DIR`: an image folder with a train/ split (e.g.
             Imagenette) is read as it is; a flat folder of images as one class.
  prepared   the same, from prepared shards (`--prepared DIR`, written by --mode=prepare
             for the same data; only run when given)
The timed steps follow `--warmup_steps` untimed ones in the same `fit` (compilation, the
input pipeline's start). Every child also measures a 4096x4096 float32 matmul (the
machine's practical peak; best of 5, before and after its training run), the CPU seconds
(all threads) per step next to the wall-clock rate, and `others_cpu`, the cores the rest of
the machine used meanwhile.
Each figure: median and [min, max] over the rounds.
Ratios and targets, from the medians (and `*_per_round`: each round's ratio, median and
range): mirrored/default >= 0.85, pipeline/in-memory >= 0.9 (in-memory: the synthetic
configuration of the same strategy), achieved training FLOP/s / matmul FLOP/s >= 0.8
(training FLOPs = 3 x forward FLOPs per image; `fraction_of_matmul` of the default
configuration, and of every configuration in `fraction_of_matmul_by_config`).

Run: .venv/bin/python bench/train.py [--repeats 3] [--batch_size 32] [--steps 8]
[--images DIR] [--only=default] [--precision mixed_bfloat16] [--jit_compile true]
[--config imagenette] [--set data.crop_size=112 model.width=0.5] [--strategy mirrored]
[--prepared DIR]
The Imagenette config as it trains (BUILD.md): --config imagenette --batch_size 64
--strategy mirrored --images ../shared/data/imagenette --prepared runs/imagenette_prepared
(`bench/gpu.sh` runs it for every precision, XLA off and on, on a GPU machine)
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402

CONFIGS = ("default", "mirrored", "pipeline", "prepared")
DATA_CONFIGS = ("pipeline", "prepared")
TARGETS = {"mirrored_vs_default": 0.85, "pipeline_vs_in_memory": 0.9, "fraction_of_matmul": 0.8}


def setup_devices():
    """Two logical CPU devices (for mirrored) when there is no GPU: before any other TF op."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if not tf.config.list_physical_devices("GPU"):
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )


def forward_flops(model) -> float:
    """Multiply-adds x 2 of the conv and dense layers for one image."""
    import keras
    import numpy as np

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
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def images_per_s(strategy, config, dataset_fn, steps: int, raw_pixels: bool = False, warm=5):
    """(images/s, this process's CPU seconds per step, cores the rest of the machine used
    meanwhile, FLOPs per training image) of `steps` timed steps that follow `warm` steps of
    the same `fit` (compile, then the input pipeline's start: its shuffle buffer and
    prefetch filled, as in an epoch of training)."""
    import contextlib

    import keras

    from zf_tf.core import model as model_lib
    from zf_tf.pipelines import preprocess
    from zf_tf.training import train

    with strategy.scope():
        model = model_lib.build_model(config.model, train.precision(config))
        model = train.compile_model(model, config)
    ds = strategy.distribute_datasets_from_function(dataset_fn)
    marks = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch in (warm - 1, warm + steps - 1):
                marks[batch] = (time.perf_counter(), time.process_time(), machine_busy_s())

    with (
        train.normalized_in_train_step(model, preprocess.pixels(config.data))
        if raw_pixels
        else contextlib.nullcontext()
    ):
        model.fit(ds, epochs=1, steps_per_epoch=warm + steps, verbose=0, callbacks=[Clock()])
    (t0, cpu0, busy0), (t1, cpu1, busy1) = marks[warm - 1], marks[warm + steps - 1]
    wall, cpu = t1 - t0, cpu1 - cpu0
    others = max(0.0, busy1 - busy0 - cpu) / wall
    return steps * config.train.batch_size / wall, cpu / steps, others, 3 * forward_flops(model)


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]) / os.sysconf("SC_CLK_TCK")


def jpeg_folder(source: str | None) -> str:
    """A folder of class subfolders of JPEGs: `source` itself if it has a train/ split,
    else symlinks to its images (default: the ../shared samples, or generated) as one class."""
    if source and os.path.isdir(os.path.join(source, "train")):
        return source
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
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(200):
            array = rng.integers(0, 256, (300 + i % 5 * 60, 400, 3), dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(root, "train", "all", f"{i}.jpg"), quality=90)
    return root


def child(name: str, args) -> dict:
    """One configuration, in this (fresh) process."""
    setup_devices()
    import numpy as np
    import tensorflow as tf

    from tests.conftest import load_config
    from zf_tf.pipelines import inputs
    from zf_tf.training import strategies

    config = load_config(args.config)
    for override in args.set:  # e.g. data.crop_size=112 model.width=0.5
        key, value = override.split("=", 1)
        section, field = key.split(".")
        config[section][field] = type(config[section][field])(value)
    config.train.batch_size = args.batch_size
    config.train.precision = args.precision
    config.train.jit_compile = args.jit_compile == "true"
    s = config.data.crop_size
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(args.batch_size, s, s, 3)) * 60).astype(np.float32)
    y = rng.integers(0, int(config.data.num_classes), size=(args.batch_size,)).astype(np.int64)

    def synthetic(ctx):
        b = ctx.get_per_replica_batch_size(args.batch_size)
        return tf.data.Dataset.from_tensors((x[:b], y[:b])).repeat()

    def real(ctx):
        return inputs.build_inputs(config, "train", ctx, "train", normalize=False)

    if name == "pipeline":
        config.data.source = "folder"
        config.data.folder = jpeg_folder(args.images)
        if config.data.folder != args.images:  # one class of samples
            config.data.num_classes = 1000
    if name == "prepared":
        config.data.source = "prepared"
        config.data.prepared_dir = args.prepared
    mirrored = name == "mirrored" or (name in DATA_CONFIGS and args.strategy == "mirrored")
    strategy = strategies.make_strategy("mirrored") if mirrored else tf.distribute.get_strategy()
    matmul = matmul_flops_per_s()
    rate, cpu, others, flops = images_per_s(
        strategy,
        config,
        real if name in DATA_CONFIGS else synthetic,
        args.steps,
        raw_pixels=name in DATA_CONFIGS,
        warm=args.warmup_steps,
    )
    return {
        "images_per_s": rate,
        "cpu_s_per_step": cpu,
        "others_cpu": others,
        "matmul_flops_per_s": max(matmul, matmul_flops_per_s()),
        "training_flops_per_image": flops,
        "replicas": strategy.num_replicas_in_sync,
        "input_size": int(config.data.crop_size),
        "device": "GPU" if tf.config.list_physical_devices("GPU") else f"CPU x{os.cpu_count()}",
        "tf_version": tf.__version__,
    }


def summarize(runs: dict, args) -> dict:
    mr = fresh.median_range
    rates = {k: [r["images_per_s"] for r in v] for k, v in runs.items()}
    med = {k: mr(v, 2)["median"] for k, v in rates.items()}
    matmul = [r["matmul_flops_per_s"] for v in runs.values() for r in v]
    flops = runs["default"][0]["training_flops_per_image"]
    achieved = [rate * flops for rate in rates["default"]]
    per_round_matmul = [
        max(runs[k][i]["matmul_flops_per_s"] for k in runs) for i in range(args.repeats)
    ]
    in_memory = "mirrored" if args.strategy == "mirrored" else "default"
    data_rates = {f"{k}_images_per_s": mr(rates[k], 2) for k in DATA_CONFIGS if k in rates}
    data_ratios = {
        f"{k}_vs_in_memory": round(med[k] / med[in_memory], 3) for k in DATA_CONFIGS if k in med
    }
    data_ratios.update(
        {
            f"{k}_vs_in_memory_per_round": mr([p / d for p, d in zip(rates[k], rates[in_memory])])
            for k in DATA_CONFIGS
            if k in rates
        }
    )
    if "prepared" in med:
        data_ratios["prepared_vs_pipeline"] = round(med["prepared"] / med["pipeline"], 3)
    out = {
        "config": args.config,
        "overrides": args.set,
        "input_size": runs["default"][0]["input_size"],
        "global_batch": args.batch_size,
        "precision": args.precision,
        "jit_compile": args.jit_compile == "true",
        "steps_timed": args.steps,
        "rounds": args.repeats,
        "replicas_mirrored": runs["mirrored"][0]["replicas"],
        "default_images_per_s": mr(rates["default"], 2),
        "mirrored_images_per_s": mr(rates["mirrored"], 2),
        "data_strategy": args.strategy,
        **data_rates,
        "cpu_s_per_step": {k: mr([r["cpu_s_per_step"] for r in v]) for k, v in runs.items()},
        # Cores other processes used while each configuration trained (2-core machine: 1.0
        # leaves this process one core).
        "others_cpu": {k: mr([r["others_cpu"] for r in v]) for k, v in runs.items()},
        "mirrored_vs_default": round(med["mirrored"] / med["default"], 3),
        "mirrored_vs_default_per_round": mr(
            [m / d for m, d in zip(rates["mirrored"], rates["default"])]
        ),
        **data_ratios,
        "training_gflop_per_image": round(flops / 1e9, 3),
        "achieved_gflop_per_s": mr([a / 1e9 for a in achieved], 1),
        "matmul_gflop_per_s": mr([m / 1e9 for m in matmul], 1),
        "fraction_of_matmul": round(
            med["default"] * flops / fresh.median_range(matmul, 0)["median"], 3
        ),
        "fraction_of_matmul_per_round": mr([a / m for a, m in zip(achieved, per_round_matmul)]),
        "fraction_of_matmul_by_config": {
            k: mr([rate * flops / m for rate, m in zip(v, per_round_matmul)])
            for k, v in rates.items()
        },
        "targets": TARGETS,
        "device": runs["default"][0]["device"],
        "tf_version": runs["default"][0]["tf_version"],
    }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CONFIGS, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=5, help="untimed, same fit")
    parser.add_argument("--images", default=None)
    parser.add_argument("--prepared", default=None, help="prepared shards: adds 'prepared'")
    parser.add_argument("--strategy", default="default", choices=("default", "mirrored"))
    parser.add_argument("--precision", default="float32", help="config.train.precision")
    parser.add_argument("--jit_compile", default="false", choices=("false", "true"))
    parser.add_argument("--config", default="zfnet_imagenet", help="a configs/ module name")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides, e.g. data.crop_size=112"
    )
    args = parser.parse_args()
    if args.only:
        print(json.dumps(child(args.only, args)))
        return
    if args.prepared and not os.path.isfile(os.path.join(args.prepared, "prepared.json")):
        sys.exit(f"error: --prepared={args.prepared} has no prepared.json: run --mode=prepare")
    names = CONFIGS if args.prepared else CONFIGS[:3]
    runs = fresh.interleaved(__file__, names, args.repeats, fresh.passed_args())
    print(json.dumps(summarize(runs, args), indent=1))


if __name__ == "__main__":
    main()
