"""Deconvnet projection throughput: batched deconvnet vs a per-projection loop vs gradients.

Configurations (`--only`; default: all, each in its own fresh Python process, interleaved
over `--repeats` rounds, reporting the median and range of every figure):
  zfnet_conv5           ZFNet at paper scale (configs/zfnet_imagenet.py: 224 px, full width,
                        random N(0, 0.01) weights), conv5
  vgg16_block5_conv3    keras.applications.VGG16(weights=None, include_top=False) at 224 px
  vgg16_block3_conv3    the same, block3_conv3 (a 40 px receptive field)
Each: `--images` random images x `--num_features` feature maps, each request projecting
the maximum of its feature map (what the paper's Fig. 2 shows):
  1. batched: `zf_tf.core.deconv.project` on a `build_deconvnet` model (windowed, the default),
     chunks of the configuration's batch size, every request timed;
  1b. the same deconvnet on full maps (`windowed=False`), first `--dense_pairs` requests;
  2. loop: per (image, map) one forward call (one image: maps + switches) and one backward
     call (one full one-hot map down), as older Keras deconvnet tools do; both compiled
     tf.functions; first `--loop_pairs` requests;
  3. gradient: `zf_tf.core.deconv.gradient_projection` (deconvnet-rule gradients, one image copy
     per request, `tf.GradientTape`), first `--gradient_pairs` requests.
Every method is warmed up (traced) on 2 requests first; all results are checked against the
batched ones. Also: FLOP/s of a 4096x4096 float32 matmul (best of 5, measured before and
after, the better counts) and the fraction of it the batched deconvnet reaches, counting per
projection the transposed convs of the chain on full maps (2 * MACs each: the FLOPs of the
algorithm, whatever it skips) plus the shared forward pass amortized over the requests;
`executed_*` counts what the windowed way down actually computes. Since windowing skips
most of the algorithm's FLOPs, `fraction_of_flop_bound` can exceed 1; the executed one cannot.
CPU seconds (all threads of this process) are reported next to wall-clock rates: on a shared
machine they vary less.

Targets: batched >= 4x loop, batched >= 1.5x gradient (each configuration).

Run from the repo root:  .venv/bin/python bench/deconv.py [--only=vgg16_block3_conv3]
[--repeats=3]. Prints one JSON object on stdout; progress goes to stderr.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from zf_tf import cli  # noqa: E402
from zf_tf.core import deconv, deconv_layers, graph  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402

TARGETS = {"batched_vs_loop": 4.0, "batched_vs_gradient": 1.5}
# name -> model, layer and sizes: images x maps requested, requests per projection call
# (VGG's full-map way down at 224 px takes 13 MB per request and channel block), and how
# many requests the slower methods time.
CONFIGS = {
    "zfnet_conv5": dict(
        model="zfnet",
        layer="conv5",
        images=9,
        num_features=256,
        batch_size=64,
        loop_pairs=32,
        gradient_pairs=128,
        dense_pairs=128,
    ),
    "vgg16_block5_conv3": dict(
        model="vgg16",
        layer="block5_conv3",
        images=4,
        num_features=64,
        batch_size=16,
        loop_pairs=16,
        gradient_pairs=32,
        dense_pairs=32,
    ),
    "vgg16_block3_conv3": dict(
        model="vgg16",
        layer="block3_conv3",
        images=4,
        num_features=128,
        batch_size=64,
        loop_pairs=16,
        gradient_pairs=64,
        dense_pairs=64,
    ),
}


def build(name: str):
    """The model of a configuration (random weights, 224 px)."""
    if name == "zfnet":
        return model_lib.build_model(cli.load_config("configs/zfnet_imagenet.py").model)
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))


log = fresh.log


def timed(fn):
    """(result, wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def matmul_flops(n=4096, repeats=5):
    a = tf.random.normal([n, n], seed=0)
    mm = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x)))
    mm(a).numpy()
    best = min(timed(lambda: mm(a).numpy())[1] for _ in range(repeats))
    return 2 * n**3 / best


def conv_flops(model, layer_name):
    """2 * MACs of each conv layer up to layer_name, on full maps (forward = transposed)."""
    total = 0
    for layer in deconv._chain(model, layer_name):
        if isinstance(layer, keras.layers.Conv2D):
            h, w, c_out = graph.find(model, layer.name).output.shape[1:]
            k_h, k_w, c_in, _ = layer.kernel.shape
            total += 2 * h * w * c_out * k_h * k_w * c_in
    return total


def windowed_flops(model, layer_name, dense_fraction=0.5):
    """2 * MACs of the transposed convs the windowed way down computes (see zf_tf.core.windowed)."""
    chain = deconv._chain(model, layer_name)
    size = tuple(model.inputs[0].shape[1:3])
    levels = []  # (layer, output size, geometry)
    for layer in chain:
        geometry, size = graph.window_geometry(layer, size)
        levels.append((layer, size, geometry))
    win, dense, total = (1, 1), False, 0
    for layer, out_size, geometry in reversed(levels):
        dense = dense or win[0] * win[1] >= dense_fraction * out_size[0] * out_size[1]
        if isinstance(layer, keras.layers.Conv2D):
            k_h, k_w, c_in, c_out = layer.kernel.shape
            positions = out_size[0] * out_size[1] if dense else win[0] * win[1]
            total += 2 * positions * c_out * k_h * k_w * c_in
        if geometry is not None:
            win = tuple((w - 1) * s + k for w, (k, s, _) in zip(win, geometry))
    return total


def build_loop(model, layer_name):
    """Old-style tools: a forward model (maps + switches of one image) and a backward model
    (one full one-hot map + those switches -> pixels), each called once per projection."""
    chain = deconv._chain(model, layer_name)
    image = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    top, steps = deconv._forward(chain, image)
    switch_steps = [i for i, step in enumerate(steps) if step[3] is not None]
    forward = keras.Model(image, [top] + [steps[i][3] for i in switch_steps])
    top_in = keras.Input(tuple(top.shape[1:]), name="map")
    switch_in = {
        i: keras.Input(tuple(steps[i][3].shape[1:]), dtype=steps[i][3].dtype, name=f"sw{i}")
        for i in switch_steps
    }
    down = deconv_layers.dense_backward(steps, top_in, lambda i, _: switch_in[i])
    backward = keras.Model([top_in] + [switch_in[i] for i in switch_steps], down)
    forward_fn = tf.function(lambda x: forward(x, training=False))
    backward_fn = tf.function(lambda xs: backward(xs, training=False))

    def project_one(img, feature):
        maps, *switches = forward_fn(tf.constant(img[None]))
        fmap = maps.numpy()[0, :, :, feature]
        y, x = np.unravel_index(np.argmax(fmap), fmap.shape)
        onehot = np.zeros((1, *maps.shape[1:]), np.float32)
        onehot[0, y, x, feature] = fmap[y, x]
        return backward_fn([tf.constant(onehot)] + list(switches)).numpy()[0]

    return project_one


def max_rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def measure(name: str, args) -> dict:
    """One configuration, measured in this process."""
    c = {**CONFIGS[name], **{k: v for k, v in vars(args).items() if v is not None}}
    model = build(c["model"])
    size = int(model.inputs[0].shape[1])
    channels = int(graph.find(model, c["layer"]).output.shape[-1])
    num_features = min(c["num_features"], channels)
    rng = np.random.default_rng(c["seed"])
    images = (rng.normal(size=(c["images"], size, size, 3)) * 50).astype(np.float32)
    index = np.repeat(np.arange(c["images"]), num_features).astype(np.int32)
    feature = np.tile(np.arange(num_features), c["images"]).astype(np.int32)
    m = len(index)
    log(f"{name}: {c['layer']} at {size} px: {c['images']} images x {num_features} maps")
    log("matmul FLOP/s ...")
    peak = matmul_flops()  # measured again at the end; the best counts (shared machine)
    results = {}
    batch = c["batch_size"]

    # 1. Batched deconvnet (windowed), and on full maps for a subset.
    for key, windowed, count in (("batched", True, m), ("batched_dense", False, c["dense_pairs"])):
        count = min(count, m)
        net = deconv.build_deconvnet(model, c["layer"], windowed=windowed)
        deconv.project(net, images, index[:2], feature[:2])  # trace
        out, wall, cpu = timed(
            lambda net=net, n=count: deconv.project(
                net, images, index[:n], feature[:n], batch_size=batch
            )
        )
        results[key] = dict(pairs=count, seconds=wall, cpu_seconds=cpu, out=out)
        log(f"{key}: {count} projections in {wall:.1f} s ({count / wall:.1f}/s, cpu {cpu:.1f} s)")
    batched = results["batched"]["out"]

    # 2. Per-projection loop.
    project_one = build_loop(model, c["layer"])
    project_one(images[0], 0)  # trace
    count = min(c["loop_pairs"], m)
    loop, wall, cpu = timed(
        lambda: np.stack([project_one(images[index[i]], feature[i]) for i in range(count)])
    )
    results["loop"] = dict(pairs=count, seconds=wall, cpu_seconds=cpu, out={"projection": loop})
    log(f"loop: {count} projections in {wall:.1f} s ({count / wall:.2f}/s)")

    # 3. Gradient formulation.
    count = min(c["gradient_pairs"], m)
    deconv.gradient_projection(model, c["layer"], images, index[:2], feature[:2])  # trace
    grads, wall, cpu = timed(
        lambda: deconv.gradient_projection(
            model, c["layer"], images, index[:count], feature[:count], batch_size=batch
        )
    )
    results["gradient"] = dict(
        pairs=count, seconds=wall, cpu_seconds=cpu, out={"projection": grads}
    )
    log(f"gradient: {count} projections in {wall:.1f} s ({count / wall:.2f}/s)")

    agreement = {}
    for key in ("batched_dense", "loop", "gradient"):
        n = results[key]["pairs"]
        agreement[key] = max_rel_diff(results[key]["out"]["projection"], batched["projection"][:n])

    log("matmul FLOP/s ...")
    peak = max(peak, matmul_flops())
    forward_share = conv_flops(model, c["layer"]) * c["images"] / m
    dense_flops = conv_flops(model, c["layer"]) + forward_share
    executed = windowed_flops(model, c["layer"]) + forward_share

    rate = {k: r["pairs"] / r["seconds"] for k, r in results.items()}
    cpu_ms = {k: round(1000 * r["cpu_seconds"] / r["pairs"], 2) for k, r in results.items()}
    ratios = {
        "batched_vs_loop": rate["batched"] / rate["loop"],
        "batched_vs_gradient": rate["batched"] / rate["gradient"],
    }
    report = {
        "model": c["model"],
        "layer": c["layer"],
        "input_size": size,
        "num_images": c["images"],
        "num_features": num_features,
        "num_pairs": m,
        "batch_size": batch,
        "projections_per_s": {k: round(v, 2) for k, v in rate.items()},
        "timed_pairs": {k: r["pairs"] for k, r in results.items()},
        "cpu_ms_per_projection": cpu_ms,
        "batched_vs_loop": round(ratios["batched_vs_loop"], 2),
        "batched_vs_gradient": round(ratios["batched_vs_gradient"], 2),
        "batched_vs_batched_dense": round(rate["batched"] / rate["batched_dense"], 2),
        "batched_vs_loop_by_cpu": round(cpu_ms["loop"] / cpu_ms["batched"], 2),
        "batched_vs_gradient_by_cpu": round(cpu_ms["gradient"] / cpu_ms["batched"], 2),
        "matmul_flops_per_s": int(peak),
        "flops_per_projection": int(dense_flops),
        "fraction_of_flop_bound": round(rate["batched"] * dense_flops / peak, 3),
        "fraction_of_flop_bound_dense": round(rate["batched_dense"] * dense_flops / peak, 3),
        "executed_flops_per_projection": int(executed),
        "executed_fraction_of_flop_bound": round(rate["batched"] * executed / peak, 3),
        "max_rel_diff_vs_batched": {k: float(f"{v:.3g}") for k, v in agreement.items()},
        "nonzero_activations": round(float(np.mean(batched["activation"] > 0)), 4),
    }
    assert math.isfinite(report["fraction_of_flop_bound"])
    return report


def summarize(runs: list[dict]) -> dict:
    """Median and [min, max] of the numbers of several runs of one configuration; the
    last run's other fields."""
    out = dict(runs[-1])
    for key in ("batched_vs_loop", "batched_vs_gradient", "batched_vs_batched_dense"):
        values = [r[key] for r in runs]
        out[key] = round(float(np.median(values)), 2)
        out[f"{key}_range"] = [min(values), max(values)]
    out["projections_per_s"] = {
        k: round(float(np.median([r["projections_per_s"][k] for r in runs])), 2)
        for k in runs[-1]["projections_per_s"]
    }
    out["repeats"] = len(runs)
    out["meets_targets"] = all(out[k] >= v for k, v in TARGETS.items())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=tuple(CONFIGS), help="measure one, in this process")
    parser.add_argument("--repeats", type=int, default=3)
    for name in (
        "images",
        "num_features",
        "batch_size",
        "loop_pairs",
        "gradient_pairs",
        "dense_pairs",
    ):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", default=None, help="with --only: another layer")
    args = parser.parse_args()
    if args.only:
        print(
            json.dumps(
                measure(
                    args.only,
                    argparse.Namespace(
                        **{k: v for k, v in vars(args).items() if k not in ("only", "repeats")}
                    ),
                )
            )
        )
        return
    runs = fresh.interleaved(__file__, CONFIGS, args.repeats, fresh.passed_args())
    report = {name: summarize(r) for name, r in runs.items()}
    report["targets"] = TARGETS
    report["meets_targets"] = {name: report[name]["meets_targets"] for name in CONFIGS}
    report["device"] = (
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}"
    )
    report["tf_version"] = tf.__version__
    report["keras_version"] = keras.__version__
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
