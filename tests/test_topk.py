"""Streaming top-k equals a brute-force sort over all activations."""

import keras
import numpy as np
import tensorflow as tf

from tests.conftest import load_config
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
