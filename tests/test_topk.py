"""Streaming top-k equals a brute-force sort over all activations; several layers in one
pass equal one scan per layer; ties break by image index; merging is exact; a scan split
over 2 mirrored replicas equals the single-device scan."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, load_config
from tests.helpers import random_images, run_workers
from zf_tf.core import model as model_lib
from zf_tf.core import topk


def test_scan_matches_brute_force():
    config = load_config()
    model = model_lib.build_model(config.model)
    rng = np.random.default_rng(0)
    images = (rng.normal(size=(37, 64, 64, 3)) * 60).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(images).batch(8)
    seen = []
    best = topk.scan(model, "conv3", ds, k=4, progress=seen.append)
    assert seen == [8, 8, 8, 8, 5]
    act = keras.Model(model.inputs, model.get_layer("conv3").output).predict(images, verbose=0)
    n, h, w, f = act.shape
    flat = act.reshape(n, h * w, f)
    per_image = flat.max(axis=1)  # (N, F): each image counts once per map
    assert best.activation.shape == (4, f) and best.image.shape == (4, f)
    order = np.argsort(-per_image, axis=0, kind="stable")[:4]  # (k, F)
    np.testing.assert_allclose(best.activation, np.take_along_axis(per_image, order, 0), rtol=1e-5)
    for feat in range(f):
        for r in range(4):
            i = best.image[r, feat]
            value = best.activation[r, feat]
            # The recorded location holds the recorded value in the recorded image.
            np.testing.assert_allclose(
                act[i, best.y[r, feat], best.x[r, feat], feat], value, rtol=1e-5
            )
            if value > 0 and np.sum(np.isclose(per_image[:, feat], value)) == 1:
                assert i == order[r, feat]
    assert len(set(best.image[:, 0].tolist())) == 4  # k different images


def test_first_maximum_is_numpys_argmax_in_row_major_order():
    rng = np.random.default_rng(1)
    # Few distinct values: many ties inside each map, and maps that are all one value.
    act = rng.integers(0, 4, size=(5, 7, 9, 6)).astype("float32")
    act[2, :, :, 3] = 1.0
    best, y, x = (np.asarray(t) for t in topk._first_maximum(tf.constant(act)))
    flat = act.reshape(5, 7 * 9, 6)
    np.testing.assert_array_equal(best, flat.max(axis=1))
    np.testing.assert_array_equal(y * 9 + x, flat.argmax(axis=1))  # numpy: the first maximum
    assert (y[2, 3], x[2, 3]) == (0, 0)


def test_records_and_gather():
    best = topk.TopK(
        activation=np.array([[3.0, 2.0], [1.0, -np.inf]], np.float32),
        image=np.array([[4, 0], [2, -1]]),
        y=np.array([[1, 0], [2, 0]], np.int32),
        x=np.array([[0, 1], [3, 0]], np.int32),
    )
    rows = best.records()
    assert [(r["feature"], r["rank"], r["image"]) for r in rows] == [
        (0, 0, 4),
        (0, 1, 2),
        (1, 0, 0),
    ]
    images = np.arange(6 * 2 * 2 * 3, dtype="float32").reshape(6, 2, 2, 3)
    found = topk.gather_images(tf.data.Dataset.from_tensor_slices(images).batch(4), best.image)
    assert sorted(found) == [0, 2, 4]
    np.testing.assert_array_equal(found[4], images[4])


def assert_same(a: topk.TopK, b: topk.TopK):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.activation, b.activation)


def test_multi_layer_scan_equals_one_scan_per_layer():
    model = model_lib.build_model(load_config().model)
    ds = tf.data.Dataset.from_tensor_slices(random_images(21)).batch(8)
    seen = []
    layers = ["conv1", "conv3", "conv5", "pool5"]
    every = topk.scan_layers(model, layers, ds, k=3, progress=seen.append)
    assert list(every) == layers and seen == [8, 8, 5]  # one pass over the data
    for layer in layers:
        assert_same(every[layer], topk.scan(model, layer, ds, k=3))
    assert every["conv3"].activation.shape == (3, model.get_layer("conv3").output.shape[-1])


def test_ties_break_by_image_index_and_merging_is_exact():
    model = model_lib.build_model(load_config().model)
    one = random_images(1)
    same = tf.data.Dataset.from_tensor_slices(np.repeat(one, 7, 0)).batch(3)
    best = topk.scan(model, "conv2", same, k=4)
    # Seven identical images: every map ties 7 ways; the first four images win, in order.
    assert (best.image == np.arange(4)[:, None]).all()
    # Merging the top-k's of two halves (indices shifted to the second half's) is the
    # top-k of the whole, whatever the order of the parts.
    images = random_images(30, seed=1)
    images[20] = images[3]  # a tie across the halves: image 3 ranks before image 20
    whole = topk.scan(model, "conv4", tf.data.Dataset.from_tensor_slices(images).batch(8), k=5)
    a = topk.scan(model, "conv4", tf.data.Dataset.from_tensor_slices(images[:13]).batch(8), k=5)
    b = topk.scan(model, "conv4", tf.data.Dataset.from_tensor_slices(images[13:]).batch(8), k=5)
    b.image = np.where(b.image >= 0, b.image + 13, -1)
    for parts in ([a, b], [b, a]):
        merged = topk.merge(parts)
        np.testing.assert_array_equal(merged.image, whole.image)
        np.testing.assert_array_equal(merged.y, whole.y)
        np.testing.assert_array_equal(merged.x, whole.x)
        np.testing.assert_allclose(merged.activation, whole.activation, rtol=1e-6)


SPLIT_SCAN = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from zf_tf.training import strategies
strategy = strategies.make_strategy({strategy!r}, 2)
import tensorflow as tf
from tests.conftest import ROOT, load_config
from tests.helpers import random_images
from zf_tf.core import model as model_lib, topk
with strategy.scope():
    model = model_lib.build_model(load_config().model)
images = random_images(37, seed=2)
labels = np.arange(37) % 10
ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)  # last batch: 3 + 2
layers = ["conv2", "conv5", "fc7"]
seen = []
split = topk.scan_layers(model, layers, ds, k=4, progress=seen.append, strategy=strategy)
alone = topk.scan_layers(model, layers, ds, k=4)
out = {{"replicas": strategy.num_replicas_in_sync, "seen": seen}}
for layer in layers:
    a, b = split[layer], alone[layer]
    # Relative to the layer's scale: the replicas' smaller batches round differently.
    rel = np.abs(a.activation - b.activation) / np.abs(b.activation).max()
    out[layer] = [bool((a.image == b.image).all()), bool((a.y == b.y).all()),
                  bool((a.x == b.x).all()), float(rel.max())]
print(json.dumps(out))
"""


def check_split_scan(stdout):
    out = json.loads(stdout.splitlines()[-1])
    assert out["replicas"] == 2
    for layer in ("conv2", "conv5", "fc7"):
        same_image, same_y, same_x, rel = out[layer]
        assert same_image and same_y and same_x, layer
        assert rel < 1e-5, layer
    return out


@pytest.mark.slow
def test_scan_split_over_two_mirrored_replicas_equals_one_device():
    script = SPLIT_SCAN.format(root=ROOT, strategy="mirrored")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(check_split_scan(proc.stdout)["seen"]) == 37


@pytest.mark.slow
def test_scan_split_over_two_workers_equals_one_device(tmp_path):

    script = SPLIT_SCAN.format(root=ROOT, strategy="multi_worker")
    outs = run_workers(tmp_path, [sys.executable, "-c", script], timeout=300)
    seen = 0
    for returncode, stdout, stderr in outs:
        assert returncode == 0, stderr[-3000:]
        seen += sum(check_split_scan(stdout)["seen"])
    assert seen == 37  # each worker scans (and counts) its own share
