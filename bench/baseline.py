"""ZFNet's Imagenette recipe against a plain Keras baseline, on the same wall-clock budget.

Configurations (`--only`; default: both, each in its own fresh Python process, interleaved
over `--repeats` rounds; bench/fresh.py):
  zfnet   `python main.py --mode=train --strategy=mirrored --config=configs/imagenette.py`
          from prepared shards (written once into `--prepared` if missing), in a fresh
          workdir, for the config's epochs (chosen to fit 60 minutes); its curve is
          history.csv's validation top-1 (center crop) against the cumulative
          `epoch_seconds` (training and validation), its final figure eval.json's
          10-crop top-1. `--zfnet-workdir=DIR` reads an existing training run's
          history.csv and eval.json instead (a run of the same command, alone on the
          machine), so one 60-minute training is not repeated for the comparison.
  keras   the model of keras.io's "Image classification from scratch" (a small Xception:
          separable convolutions, batch normalization, residual connections), as that
          example writes it: `keras.utils.image_dataset_from_directory` at the same input
          size as ZFNet's crops, `RandomFlip("horizontal")` and `RandomRotation(0.1)`,
          pixels rescaled by 1/255, Adam(3e-4), batch 128, cross-entropy; validated after
          every epoch, stopped once `--minutes` of wall-clock time (training and
          validation) have passed, mid-epoch if need be (then validated once more).
Both read the same folder (`--folder`, its train/ and val/ splits) on the same 2 cores.

Prints one JSON object (each figure: median and [min, max] over the rounds) and draws
validation top-1 against wall-clock minutes for both (`--figure`).

Run: .venv/bin/python bench/baseline.py [--minutes 60] [--repeats 1]
     [--folder ../shared/data/imagenette] [--figure docs/figures/baseline.png]
     [--zfnet-workdir runs/imagenette]
     .venv/bin/python bench/baseline.py --replot OUT.json   (redraws the figure)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402

CONFIGS = ("zfnet", "keras")
DEFAULT_FOLDER = os.path.join(ROOT, "..", "shared", "data", "imagenette")


def keras_io_model(input_shape, num_classes: int):
    """keras.io/examples/vision/image_classification_from_scratch's `make_model`."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape)
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(128, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    previous = x
    for size in (256, 512, 728):
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(size, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(size, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = layers.Conv2D(size, 1, strides=2, padding="same")(previous)
        x = layers.add([x, residual])
        previous = x
    x = layers.SeparableConv2D(1024, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.25)(x)
    outputs = layers.Dense(num_classes, activation=None)(x)
    return keras.Model(inputs, outputs)


def run_keras(args) -> dict:
    import keras
    import tensorflow as tf

    from tests.conftest import load_config

    size = int(load_config("imagenette").data.crop_size)
    kwargs = dict(image_size=(size, size), batch_size=128, label_mode="int", seed=1337)
    train = keras.utils.image_dataset_from_directory(
        os.path.join(args.folder, "train"), shuffle=True, **kwargs
    )
    val = keras.utils.image_dataset_from_directory(
        os.path.join(args.folder, "val"), shuffle=False, **kwargs
    )
    num_classes = len(train.class_names)
    augment = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    train = train.map(
        lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
    ).prefetch(tf.data.AUTOTUNE)
    val = val.cache().prefetch(tf.data.AUTOTUNE)
    model = keras_io_model((size, size, 3), num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
    )
    budget = args.minutes * 60.0
    curve = []

    class Budget(keras.callbacks.Callback):
        """Stops training once `budget` seconds have passed since it began (training and
        validation, as ZFNet's `epoch_seconds` count them)."""

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if time.perf_counter() - self.start >= budget:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            minutes = (time.perf_counter() - self.start) / 60.0
            acc = float(logs.get("val_acc", float("nan")))
            curve.append((minutes, acc))
            train_top1.append(float(logs.get("acc", float("nan"))))
            fresh.log(f"keras: {minutes:.1f} min, val top-1 {acc:.4f}, train {train_top1[-1]:.4f}")

    train_top1 = []
    model.fit(train, epochs=10_000, validation_data=val, callbacks=[Budget()], verbose=0)
    return {
        "curve": curve,
        "train_top1": train_top1,
        "final_top1": curve[-1][1],
        "epochs": len(curve),
    }


def read_zfnet(workdir: str) -> dict:
    """The curve and final figures of a finished `--mode=train` run of the config."""
    curve, train_top1, trained = [], [], 0.0
    with open(os.path.join(workdir, "history.csv")) as f:
        for row in csv.DictReader(f):
            trained += float(row["epoch_seconds"])
            curve.append((trained / 60.0, float(row["val_top1"])))
            train_top1.append(float(row["top1"]))
    with open(os.path.join(workdir, "eval.json")) as f:
        ten_crop_error = json.load(f)["ten_crop"]["top1_error"]  # percent
    return {
        "curve": curve,
        "train_top1": train_top1,
        "final_top1": curve[-1][1],
        "ten_crop_top1": round(1 - ten_crop_error / 100, 4),
        "epochs": len(curve),
    }


def run_zfnet(args) -> dict:
    if args.zfnet_workdir:
        return read_zfnet(args.zfnet_workdir)
    workdir = tempfile.mkdtemp(prefix="bench_baseline_zfnet_")
    main = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/imagenette.py"]
    data = [f"--config.data.folder={args.folder}"]
    prepared = [f"--config.data.prepared_dir={args.prepared}"]
    try:
        if not os.path.exists(os.path.join(args.prepared, "prepared.json")):
            subprocess.run([*main, "--mode=prepare", *data, *prepared], check=True, cwd=ROOT)
        subprocess.run(
            [
                *main,
                "--mode=train",
                "--strategy=mirrored",
                "--config.data.source=prepared",
                *prepared,
                f"--workdir={workdir}",
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        return read_zfnet(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def plot(runs: dict, path: str, minutes: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "zfnet": "ZFNet, configs/imagenette.py (SGD, scale augmentation)",
        "keras": "keras.io 'Image classification from scratch' (Adam, BN, flip + rotation)",
    }
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, color in zip(CONFIGS, ("tab:blue", "tab:orange")):
        for i, run in enumerate(runs.get(name, [])):
            x, y = zip(*run["curve"])
            ax.plot(x, y, color=color, marker=".", label=labels[name] if i == 0 else None)
            if run.get("ten_crop_top1"):
                ax.plot(x[-1], run["ten_crop_top1"], "*", ms=12, color=color)
                ax.annotate(
                    f"{run['ten_crop_top1']:.1%} with 10 crops",
                    (x[-1], run["ten_crop_top1"]),
                    textcoords="offset points",
                    xytext=(-40, 8),
                    fontsize=8,
                )
    ax.set_xlabel("training wall-clock minutes (2 CPU cores)")
    ax.set_ylabel("Imagenette val top-1 (one crop)")
    ax.set_xlim(0, minutes)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.axhline(0.1, color="gray", ls=":", lw=1)
    ax.annotate("chance", (1, 0.1), textcoords="offset points", xytext=(0, 3), fontsize=8)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CONFIGS, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--folder", default=DEFAULT_FOLDER)
    parser.add_argument("--zfnet-workdir", default=None, help="a finished run to read")
    parser.add_argument("--prepared", default=os.path.join(ROOT, "runs", "imagenette_prepared"))
    parser.add_argument("--figure", default=os.path.join(ROOT, "docs", "figures", "baseline.png"))
    parser.add_argument("--replot", default=None, help="redraw the figure from a printed JSON")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            out = json.load(f)
        runs = {
            name: [
                {"curve": curve, "ten_crop_top1": out["zfnet_ten_crop_top1"]["median"]}
                if name == "zfnet"
                else {"curve": curve}
                for curve in curves
            ]
            for name, curves in out["curves"].items()
        }
        plot(runs, args.figure, out["minutes"])
        return
    if not os.path.isdir(os.path.join(args.folder, "train")):
        sys.exit(f"error: {args.folder} has no train/ folder: pass --folder=IMAGENETTE_ROOT")
    if args.zfnet_workdir and not all(
        os.path.isfile(os.path.join(args.zfnet_workdir, f)) for f in ("history.csv", "eval.json")
    ):
        sys.exit(f"error: --zfnet-workdir={args.zfnet_workdir} has no history.csv and eval.json")
    if args.only:
        print(json.dumps(run_zfnet(args) if args.only == "zfnet" else run_keras(args)))
        return
    runs = fresh.interleaved(__file__, CONFIGS, args.repeats, fresh.passed_args())
    mr = fresh.median_range
    out = {"minutes": args.minutes, "rounds": args.repeats}
    for name, rs in runs.items():
        out[f"{name}_val_top1"] = mr([r["final_top1"] for r in rs])
        out[f"{name}_epochs"] = mr([r["epochs"] for r in rs], 0)
    out["zfnet_ten_crop_top1"] = mr([r["ten_crop_top1"] for r in runs["zfnet"]])
    out["curves"] = {name: [r["curve"] for r in rs] for name, rs in runs.items()}
    out["train_top1"] = {name: [r.get("train_top1") for r in rs] for name, rs in runs.items()}
    plot(runs, args.figure, args.minutes)
    out["figure"] = os.path.relpath(args.figure, ROOT)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
