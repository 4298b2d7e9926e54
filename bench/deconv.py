"""Deconvnet projection throughput: batched deconvnet vs a per-projection loop vs gradients.

ZFNet at paper scale (configs/zfnet_imagenet.py: 224 px, full width, random N(0, 0.01)
weights), `--layer` conv5, `--images` random images x `--num_features` feature maps, each
request projecting the maximum of its feature map (what the paper's Fig. 2 shows):
  1. batched: `zf_tf.core.deconv.project` on a `build_deconvnet` model (windowed, the default),
     chunks of `--batch_size` requests, every request timed;
  1b. the same deconvnet on full maps (`windowed=False`), first `--dense_pairs` requests;
  2. loop: per (image, map) one forward call (one image: maps + switches) and one backward
     call (one full one-hot map down), as older Keras deconvnet tools do; both compiled
     tf.functions; first `--loop_pairs` requests;
  3. gradient: `zf_tf.core.deconv.gradient_projection` (deconvnet-rule gradients, one image copy
     per request), chunks of `--batch_size`, first `--gradient_pairs` requests.
Every method is warmed up (traced) on 2 requests first; all results are checked against the
batched ones. Also: FLOP/s of a 4096x4096 float32 matmul (best of 5, measured before and
after, the better counts) and the fraction of it the batched deconvnet reaches, counting per
projection the transposed convs conv1..conv5 on full maps (2 * MACs each: the FLOPs of the
algorithm, whatever it skips) plus the shared forward pass amortized over the requests;
`executed_*` counts what the windowed way down actually computes. Since windowing skips
most of the algorithm's FLOPs, `fraction_of_flop_bound` can exceed 1; the executed one cannot.
CPU seconds (all threads of this process) are reported next to wall-clock rates: on a shared
machine they vary less.

Targets: batched >= 4x loop, batched >= 1.5x gradient.

Run from the repo root:  .venv/bin/python bench/deconv.py [--num_features=32] [--images 9]
Prints one JSON object on stdout; progress goes to stderr.
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from zf_tf import cli  # noqa: E402
from zf_tf.core import deconv  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402

TARGETS = {"batched_vs_loop": 4.0, "batched_vs_gradient": 1.5}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


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
    for name in model_lib.CONV_LAYERS:
        layer = model.get_layer(name)
        h, w, c_out = layer.output.shape[1:]
        k_h, k_w, c_in, _ = layer.kernel.shape
        total += 2 * h * w * c_out * k_h * k_w * c_in
        if name == layer_name:
            return total
    raise ValueError(layer_name)


def windowed_flops(model, layer_name, dense_fraction=0.5):
    """2 * MACs of the transposed convs the windowed way down computes (see zf_tf.core.deconv)."""
    chain = deconv._chain(model, layer_name)
    size = tuple(model.inputs[0].shape[1:3])
    levels = []  # (layer, output size, geometry)
    for layer in chain:
        geometry, size = deconv._layer_geometry(layer, size)
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
    down = deconv._dense_backward(steps, top_in, lambda i, _: switch_in[i])
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "zfnet_imagenet.py"))
    parser.add_argument("--layer", default="conv5")
    parser.add_argument("--images", type=int, default=9)
    parser.add_argument("--num_features", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--loop_pairs", type=int, default=32)
    parser.add_argument("--gradient_pairs", type=int, default=128)
    parser.add_argument("--dense_pairs", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = cli.load_config(args.config).model
    model = model_lib.build_model(config)
    size = int(config.input_size)
    channels = int(model.get_layer(args.layer).filters)
    num_features = min(args.num_features, channels)
    rng = np.random.default_rng(args.seed)
    images = (rng.normal(size=(args.images, size, size, 3)) * 50).astype(np.float32)
    index = np.repeat(np.arange(args.images), num_features).astype(np.int32)
    feature = np.tile(np.arange(num_features), args.images).astype(np.int32)
    m = len(index)
    log(f"{args.layer} at {size} px: {args.images} images x {num_features} maps = {m} pairs")
    log("matmul FLOP/s ...")
    peak = matmul_flops()  # measured again at the end; the best counts (shared machine)
    results = {}

    # 1. Batched deconvnet (windowed), and on full maps for a subset.
    for key, windowed, count in (("batched", True, m), ("batched_dense", False, args.dense_pairs)):
        count = min(count, m)
        net = deconv.build_deconvnet(model, args.layer, windowed=windowed)
        deconv.project(net, images, index[:2], feature[:2])  # trace
        out, wall, cpu = timed(
            lambda net=net, c=count: deconv.project(
                net, images, index[:c], feature[:c], batch_size=args.batch_size
            )
        )
        results[key] = dict(pairs=count, seconds=wall, cpu_seconds=cpu, out=out)
        log(f"{key}: {count} projections in {wall:.1f} s ({count / wall:.1f}/s, cpu {cpu:.1f} s)")
    batched = results["batched"]["out"]

    # 2. Per-projection loop.
    project_one = build_loop(model, args.layer)
    project_one(images[0], 0)  # trace
    count = min(args.loop_pairs, m)
    loop, wall, cpu = timed(
        lambda: np.stack([project_one(images[index[i]], feature[i]) for i in range(count)])
    )
    results["loop"] = dict(pairs=count, seconds=wall, cpu_seconds=cpu, out={"projection": loop})
    log(f"loop: {count} projections in {wall:.1f} s ({count / wall:.2f}/s)")

    # 3. Gradient formulation.
    count = min(args.gradient_pairs, m)
    deconv.gradient_projection(model, args.layer, images, index[:2], feature[:2])  # trace
    grads, wall, cpu = timed(
        lambda: deconv.gradient_projection(
            model, args.layer, images, index[:count], feature[:count], batch_size=args.batch_size
        )
    )
    results["gradient"] = dict(
        pairs=count, seconds=wall, cpu_seconds=cpu, out={"projection": grads}
    )
    log(f"gradient: {count} projections in {wall:.1f} s ({count / wall:.2f}/s)")

    agreement = {}
    for key in ("batched_dense", "loop", "gradient"):
        c = results[key]["pairs"]
        agreement[key] = max_rel_diff(results[key]["out"]["projection"], batched["projection"][:c])

    log("matmul FLOP/s ...")
    peak = max(peak, matmul_flops())
    per_image_forward = conv_flops(model, args.layer)
    forward_share = per_image_forward * args.images / m
    dense_flops = conv_flops(model, args.layer) + forward_share
    executed = windowed_flops(model, args.layer) + forward_share

    rate = {k: r["pairs"] / r["seconds"] for k, r in results.items()}
    cpu_ms = {k: round(1000 * r["cpu_seconds"] / r["pairs"], 2) for k, r in results.items()}
    ratios = {
        "batched_vs_loop": rate["batched"] / rate["loop"],
        "batched_vs_gradient": rate["batched"] / rate["gradient"],
    }
    report = {
        "layer": args.layer,
        "input_size": size,
        "num_images": args.images,
        "num_features": num_features,
        "num_pairs": m,
        "batch_size": args.batch_size,
        "projections_per_s": {k: round(v, 2) for k, v in rate.items()},
        "timed_pairs": {k: r["pairs"] for k, r in results.items()},
        "cpu_ms_per_projection": cpu_ms,
        "batched_vs_loop": round(ratios["batched_vs_loop"], 2),
        "batched_vs_gradient": round(ratios["batched_vs_gradient"], 2),
        "batched_vs_batched_dense": round(rate["batched"] / rate["batched_dense"], 2),
        "batched_vs_loop_by_cpu": round(cpu_ms["loop"] / cpu_ms["batched"], 2),
        "batched_vs_gradient_by_cpu": round(cpu_ms["gradient"] / cpu_ms["batched"], 2),
        "targets": TARGETS,
        "meets_targets": all(ratios[k] >= v for k, v in TARGETS.items()),
        "matmul_flops_per_s": int(peak),
        "flops_per_projection": int(dense_flops),
        "fraction_of_flop_bound": round(rate["batched"] * dense_flops / peak, 3),
        "fraction_of_flop_bound_dense": round(rate["batched_dense"] * dense_flops / peak, 3),
        "executed_flops_per_projection": int(executed),
        "executed_fraction_of_flop_bound": round(rate["batched"] * executed / peak, 3),
        "max_rel_diff_vs_batched": {k: float(f"{v:.3g}") for k, v in agreement.items()},
        "nonzero_activations": round(float(np.mean(batched["activation"] > 0)), 4),
        "device": f"CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; GPUs: {len(tf.config.list_physical_devices('GPU'))}",
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    assert math.isfinite(report["fraction_of_flop_bound"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
