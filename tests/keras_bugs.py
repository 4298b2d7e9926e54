"""Minimal reproductions of the Keras bugs that zf_tf/training/keras_fixes.py works around.

Run as a script (the CPU must be split into logical devices before any TF op; a worker of
a multi-worker cluster reads TF_CONFIG):

  python tests/keras_bugs.py CASE PATCHES [PATCHES ...]

CASE 'mirrored_uneven': `fit`, 1 step, with 2 mirrored CPU replicas on one global batch of
3 examples (split 2 + 1). CASE 'multi_worker': `fit`, 1 step, on one worker of the cluster
in TF_CONFIG (a batch of 4 per worker). Each PATCHES is 'none' (Keras as it is) or a
comma-separated list of the keras_fixes context managers to apply ('prebuild',
'scalar_reduce'); each gets a fresh model (a 4 -> 3 Dense layer), in the order given.
Prints JSON {"replicas": n, "results": {PATCHES: {"ok": bool, "error": "Type: first line"
or ""}}}.
"""

import contextlib
import json
import os
import sys

import numpy as np
import tensorflow as tf

case, patch_sets = sys.argv[1], sys.argv[2:] or ["none"]
if case == "mirrored_uneven":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    batch = 3
elif case == "multi_worker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    batch = 4 * strategy.num_replicas_in_sync
else:
    raise SystemExit(f"unknown case {case!r}")

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zf_tf.training import keras_fixes  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(size=(batch, 4)).astype("float32")
y = rng.integers(0, 3, size=(batch,)).astype("int64")
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).with_options(options)
example = (x[:1], y[:1])


def fit(patches):
    """Trains a fresh model 1 step with `patches`; {"ok": ..., "error": ...}."""
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        )
    with contextlib.ExitStack() as stack:
        if "prebuild" in patches:
            stack.enter_context(keras_fixes.prebuilt_from_shapes(model, strategy, example))
        if "scalar_reduce" in patches:
            stack.enter_context(keras_fixes.scalar_safe_multi_worker_reduce())
        try:
            model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
            return {"ok": True, "error": ""}
        except Exception as e:  # noqa: BLE001 - the point is which error Keras raises
            lines = [line for line in str(e).splitlines() if line.strip()]
            return {"ok": False, "error": f"{type(e).__name__}: {lines[0] if lines else ''}"}


results = {p: fit([] if p == "none" else p.split(",")) for p in patch_sets}
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "results": results}), flush=True)
