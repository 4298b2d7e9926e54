"""Does `--mode=ablate` train its last variant as fast as its first? Printed as one JSON object.

One child process = one `--mode=ablate` run: `--variants` (default: baseline, the nine other
Table 3 variants, baseline again, so the first and last models are the same network) train
one after another in that one process, through the mode's own code
(`zf_tf.experiments.ablate`: every variant's parameter count built first, then per variant
`train_variant`: `train.train_and_evaluate` with the ablation budget, checkpoints, logs,
image summaries, 10-crop evaluation, train error), each in its own folder of a temporary
workdir (`WORKDIR/ablate/<n>_<variant>`). A Keras callback times each variant's training
steps after the first `--warmup` (tracing and warm-up excluded):
  images_per_s           batch / wall seconds per step
  cpu_ms_per_step        this process's CPU seconds (all threads) per step: what the step
                         costs, whatever else runs on the machine
  cpu_per_wall           cores this process kept busy while stepping (2 on an idle 2-core box)
  others_cpu             cores the rest of the machine used meanwhile (/proc/stat busy time
                         minus this process's): other people's work on a shared machine
  minflt_per_step, rss_mb, threads
Figures: last/first images/s (`last_vs_first`, target >= 0.95) and last/first CPU ms per
step (`last_vs_first_cpu`, 1.0 = the same work per step).

Configurations (`--only`), each in its own fresh process, interleaved over `--repeats`
rounds (bench/fresh.py), every figure as median and [min, max]:
  ablate          the mode as it ships: each variant's custom-gradient registrations are
                  released once it is trained (zf_tf/core/memory.py)
  ablate_leaky    the same without that release: TensorFlow's gradient registry keeps every
                  trained variant's model (the RSS growth `rss_growth_mb` shows)

Data: the embedded dataset's tiny config (generated once into a temporary folder), 64 px
crops, the default config's model (width 0.25) and batch 64; `--size 224 --width 1` gives
the paper-sized model on the same images.

Run from the repo root:  .venv/bin/python bench/ablate.py [--repeats=3] [--steps=100]
[--variants=baseline,no_fc7,baseline] [--size=224 --width=1 --batch_size=32]
"""

from __future__ import annotations

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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402

from zf_tf.configs import ablations  # noqa: E402

CONFIGS = ("ablate", "ablate_leaky")
TARGET = 0.95
# Every variant of configs/ablations.py in order, then the baseline again.
ALL = (*ablations.VARIANTS, "baseline")


def proc_sample():
    """(wall s, process CPU s, minor faults, machine busy CPU s, RSS MB, threads)."""
    with open("/proc/self/stat") as f:
        minflt = int(f.read().rsplit(")", 1)[1].split()[7])  # field 10 of /proc/self/stat
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    busy = (cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]) / os.sysconf("SC_CLK_TCK")
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return (
        time.perf_counter(),
        time.process_time(),
        minflt,
        busy,
        int(status["VmRSS"][0]) // 1024,
        int(status["Threads"][0]),
    )


def step_timer(batch_size: int, warmup: int):
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Per training step after the first `warmup` of the run: wall, CPU, faults."""

        def __init__(self):
            super().__init__()
            self.steps = []
            self._seen = 0

        def on_train_batch_begin(self, batch, logs=None):
            self._start = proc_sample()

        def on_train_batch_end(self, batch, logs=None):
            end = proc_sample()
            self._seen += 1
            if self._seen > warmup:
                self.steps.append([e - s for e, s in zip(end[:4], self._start[:4])] + [*end[4:]])

        def summary(self) -> dict:
            wall = sum(s[0] for s in self.steps)
            cpu = sum(s[1] for s in self.steps)
            return {
                "steps_timed": len(self.steps),
                "images_per_s": round(batch_size * len(self.steps) / wall, 2),
                "cpu_ms_per_step": round(1000 * cpu / len(self.steps), 2),
                "cpu_per_wall": round(cpu / wall, 3),
                "others_cpu": round(max(0.0, sum(s[3] for s in self.steps) - cpu) / wall, 3),
                "minflt_per_step": round(statistics.median(s[2] for s in self.steps)),
                "rss_mb": self.steps[-1][4],
                "threads": self.steps[-1][5],
            }

    return StepTimer()


def child(name: str, args) -> dict:
    from zf_tf.configs.ablations import VARIANTS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: valid: {', '.join(VARIANTS)}")
    tmp = tempfile.mkdtemp(prefix="bench_ablate_")
    try:
        return _run_variants(name, args, variants, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # every variant's workdir: ~40 MB each


def _run_variants(name, args, variants, tmp) -> dict:
    import keras
    import tensorflow as tf

    from tests.conftest import load_config
    from zf_tf.core import memory
    from zf_tf.experiments import ablate
    from zf_tf.pipelines import embedded
    from zf_tf.training import callbacks

    if name == "ablate_leaky":
        memory.released_custom_gradients = contextlib.nullcontext
    data_dir = args.data_dir or os.path.join(tmp, "tfds")
    embedded.builder(data_dir, "tiny").download_and_prepare()  # no-op once generated
    base = load_config("default")
    base.data.data_dir = data_dir
    base.data.tfds_config = "tiny"
    base.data.shuffle_buffer = 256
    base.data.crop_size = args.size
    base.data.resize_size = args.size * 9 // 8
    base.model.width = args.width
    base.train.batch_size = args.batch_size
    base.train.eval_batch_size = args.batch_size
    base.ablate.epochs = 1
    base.ablate.steps_per_epoch = args.steps
    base.ablate.train_error_images = args.batch_size

    # Every variant's step timer rides along with the mode's own optional callbacks.
    timers = []
    from_config = callbacks.from_config

    def with_timer(config, out):
        timers.append(step_timer(config.train.batch_size, args.warmup))
        return [*from_config(config, out), timers[-1]]

    callbacks.from_config = with_timer
    strategy = tf.distribute.get_strategy()
    # As ablate.run: every variant's model is built (parameter count) before any training.
    for v in variants:
        ablate.parameter_count(ablate.variant_config(base, v))
    rows = []
    for n, v in enumerate(variants, 1):
        fresh.log(f"  variant {n}/{len(variants)}: {v}")
        t = time.perf_counter()
        vdir = os.path.join(tmp, "workdir", ablate.MODE, f"{n}_{v}")
        ablate.train_variant(base, v, vdir, strategy, retrain=False)
        rows.append(
            {
                "variant": v,
                **timers[-1].summary(),
                "wall_s": round(time.perf_counter() - t, 1),
                "custom_gradients_registered": len(memory.custom_gradient_names()),
            }
        )
        fresh.log("   ", json.dumps(rows[-1]))
    keras.utils.clear_session()
    first, last = rows[0], rows[-1]
    return {
        "variants": variants,
        "rows": rows,
        "last_vs_first": last["images_per_s"] / first["images_per_s"],
        "last_vs_first_cpu": last["cpu_ms_per_step"] / first["cpu_ms_per_step"],
        "first_images_per_s": first["images_per_s"],
        "last_images_per_s": last["images_per_s"],
        "first_others_cpu": first["others_cpu"],
        "last_others_cpu": last["others_cpu"],
        "rss_growth_mb": last["rss_mb"] - first["rss_mb"],
        "custom_gradients_registered": last["custom_gradients_registered"],
    }


def summarize(runs: dict, args) -> dict:
    out = {}
    for name, rounds in runs.items():
        same = rounds[0]["variants"][0] == rounds[0]["variants"][-1]
        out[name] = {
            "first_and_last_same_variant": same,
            **{
                key: fresh.median_range([r[key] for r in rounds])
                for key in (
                    "last_vs_first",
                    "last_vs_first_cpu",
                    "first_images_per_s",
                    "last_images_per_s",
                    "first_others_cpu",
                    "last_others_cpu",
                    "rss_growth_mb",
                    "custom_gradients_registered",
                )
            },
            "per_variant_cpu_ms_per_step": {
                f"{i + 1}_{v}": fresh.median_range(
                    [r["rows"][i]["cpu_ms_per_step"] for r in rounds]
                )
                for i, v in enumerate(rounds[0]["variants"])
            },
            "per_variant_minflt_per_step": [
                statistics.median(r["rows"][i]["minflt_per_step"] for r in rounds)
                for i in range(len(rounds[0]["variants"]))
            ],
            "threads": sorted({row["threads"] for r in rounds for row in r["rows"]}),
            "meets_target": fresh.median_range([r["last_vs_first"] for r in rounds])["median"]
            >= TARGET,
        }
    return {
        "setup": {
            "size": args.size,
            "width": args.width,
            "batch_size": args.batch_size,
            "steps_per_variant": args.steps,
            "timed_steps_per_variant": args.steps - args.warmup,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
        },
        "target_last_vs_first": TARGET,
        **out,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CONFIGS, default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(ALL))
    parser.add_argument("--steps", type=int, default=100, help="training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--data_dir", default="", help="tfds dir with zf_shapes/tiny")
    args = parser.parse_args()
    if args.only:
        with contextlib.redirect_stdout(sys.stderr):  # the mode's tables and progress
            result = child(args.only, args)
        print(json.dumps(result))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs={args.configs!r}: choose from {', '.join(CONFIGS)}")
    passed = fresh.passed_args()
    if not args.data_dir:  # generated once, shared by the children
        from zf_tf.pipelines import embedded

        data_dir = os.path.join(tempfile.mkdtemp(prefix="bench_ablate_data_"), "tfds")
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
            embedded.builder(data_dir, "tiny").download_and_prepare()
        passed.append(f"--data_dir={data_dir}")
    runs = fresh.interleaved(__file__, names, args.repeats, passed)
    print(json.dumps(summarize(runs, args), indent=1))


if __name__ == "__main__":
    main()
