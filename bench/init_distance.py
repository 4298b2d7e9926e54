"""How far each layer of a trained workdir's model moved from its initialization, printed
as one JSON object: per conv layer (and fc6-fc8), the cosine similarity of each filter
(unit) to its initial value (median, [min, max]) and its RMS now and at initialization
(median). The initial values are rebuilt from the workdir's config.json (model section,
its seed): the same draws training started from.

A cosine near 1 means the filter is still mostly its random initial value (cos^2 of its
energy); BUILD.md uses it to explain noisy layer-1 filters.

Run: .venv/bin/python bench/init_distance.py WORKDIR
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fresh  # noqa: E402


def distances(trained, initial) -> dict:
    """{layer: {cosine: median/range, rms, rms_init}} over the kernels of both models."""
    import numpy as np

    out, initial_names = {}, {x.name for x in initial.layers}
    for layer in trained.layers:
        if not hasattr(layer, "kernel") or layer.name not in initial_names:
            continue
        w = layer.kernel.numpy().reshape(-1, layer.kernel.shape[-1])
        w0 = initial.get_layer(layer.name).kernel.numpy().reshape(w.shape)
        cos = (w * w0).sum(0) / (np.linalg.norm(w, axis=0) * np.linalg.norm(w0, axis=0) + 1e-12)
        out[layer.name] = {
            "cosine_to_init": fresh.median_range(cos),
            "rms": round(float(np.median(np.sqrt((w**2).mean(0)))), 4),
            "rms_init": round(float(np.median(np.sqrt((w0**2).mean(0)))), 4),
        }
    return out


def main():
    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "config.json")):
        sys.exit("usage: bench/init_distance.py WORKDIR (a trained workdir with config.json)")
    import ml_collections

    from zf_tf.core import model as model_lib
    from zf_tf.training import workdirs

    workdir = sys.argv[1]
    with open(os.path.join(workdir, "config.json")) as f:
        model_config = ml_collections.ConfigDict(json.load(f)["model"])
    report = distances(workdirs.load_model(workdir), model_lib.build_model(model_config))
    print(json.dumps({"workdir": workdir, "layers": report}, indent=1))


if __name__ == "__main__":
    main()
