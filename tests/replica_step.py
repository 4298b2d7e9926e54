"""One SGD step with 1 replica (global batch 2B) and with 2 replicas (B each).

Run as a script (the CPU must be split into logical devices before any TF op), prints
JSON {"max_abs_diff": ..., "max_abs_update": ...}.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.conftest import load_config  # noqa: E402
from zf_tf.core import model as model_lib  # noqa: E402
from zf_tf.training import train  # noqa: E402

B = 4
config = load_config()
config.model.dropout = 0.0  # dropout masks differ per replica; the test is about the loss
config.train.batch_size = 2 * B
rng = np.random.default_rng(0)
x = (rng.normal(size=(2 * B, 64, 64, 3)) * 60).astype("float32")
y = rng.integers(0, 10, size=(2 * B,)).astype("int64")


def one_step(strategy):
    with strategy.scope():
        model = train.compile_model(model_lib.build_model(config.model), config)
    before = [w.copy() for w in model.get_weights()]

    def dataset(ctx):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.batch(ctx.get_per_replica_batch_size(2 * B))

    model.fit(strategy.distribute_datasets_from_function(dataset), epochs=1, verbose=0)
    return before, model.get_weights()


before, one = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"))
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
_, two = one_step(mirrored)
print(
    json.dumps(
        {
            "replicas": mirrored.num_replicas_in_sync,
            "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(one, two)),
            "max_abs_update": max(float(np.abs(a - b).max()) for a, b in zip(before, one)),
        }
    )
)
