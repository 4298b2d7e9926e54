"""The Python API (zf_tf.api): its docstring's example and README's "From Python" block
run as written; results equal the core functions they wrap; bad input is one UsageError."""

import doctest
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import zf_tf
from tests.conftest import ROOT
from zf_tf import api
from zf_tf.core import deconv, topk
from zf_tf.core.errors import UsageError

L = keras.layers


def test_the_docstring_example_runs():
    result = doctest.testmod(api)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.slow
def test_the_readme_example_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["out"]["projection"].shape == (4, 2, 96, 96, 3)
    assert scope["maps"].shape == (4, 96, 96) and scope["drops"].shape == (1, 96, 96)
    assert set(scope["best"]) == {"Conv1_relu", "out_relu"}


@pytest.fixture(scope="module")
def small():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((24, 24, 3)),
            L.Conv2D(6, 5, activation="relu", name="c1"),
            L.MaxPooling2D(2, name="p1"),
            L.Conv2D(8, 3, activation="relu", name="c2"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dense(5, name="logits"),
        ]
    )
    images = np.random.default_rng(1).uniform(-1, 1, (3, 24, 24, 3)).astype(np.float32)
    return model, images


def test_results_equal_the_core_functions(small):
    model, images = small
    out = zf_tf.projections(model, images, "c2", units=[1, 4])
    direct = deconv.project(deconv.build_deconvnet(model, "c2"), images, [2], [4])
    np.testing.assert_array_equal(out["projection"][2, 1], direct["projection"][0])
    assert out["activation"][2, 1] == direct["activation"][0]
    assert out["form"] == "explicit" and [r["layer"] for r in out["way_down"]] == ["c1", "c2"]
    best = zf_tf.top_k(model, images, "c1", k=2)["c1"]
    ds = tf.data.Dataset.from_tensor_slices(images).batch(2)
    again = topk.scan_layers(model, ["c1"], ds, k=2)["c1"]
    np.testing.assert_array_equal(best.image, again.image)
    assert zf_tf.top_k(model, ds, ["c1"], k=2)["c1"].image.tolist() == again.image.tolist()


@pytest.mark.parametrize(
    "call, says",
    [
        (
            lambda m, x: zf_tf.projections(m, x, "logits"),
            "layer 'logits' is not valid for a projection: choose one of c1, p1, c2",
        ),
        (lambda m, x: zf_tf.projections(m, x, "c2", units=[8]), "units must be in 0..7"),
        (lambda m, x: zf_tf.projections(m, x[:, :20], "c2"), "images must be (N, 24, 24, 3)"),
        (lambda m, x: zf_tf.top_k(m, x, ["c9"]), "layer 'c9' is not valid for a scan"),
        (lambda m, x: zf_tf.top_k(m, x, ["c1"], k=4), "k=4 exceeds the 3 images"),
        (
            lambda m, x: zf_tf.attribution(m, x, [0, 1, 2], "lime"),
            "unknown method 'lime': valid methods: deconvnet,",
        ),
        (
            lambda m, x: zf_tf.attribution(m, x, [0, 1], "saliency"),
            "classes must be 3 class ids in 0..4",
        ),
        (lambda m, x: zf_tf.occlusion(m, x, [0, 1, 2], size=2), "size and stride are fractions"),
    ],
)
def test_bad_input_is_one_usage_error(small, call, says):
    model, images = small
    with pytest.raises(UsageError) as e:
        call(model, images)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_model_that_is_not_square_is_refused():
    model = keras.Sequential([keras.Input((16, 24, 3)), L.Conv2D(2, 3, name="c")])
    with pytest.raises(UsageError, match="takes 16 x 24 images: the analyses need square"):
        zf_tf.projections(model, np.zeros((1, 16, 24, 3)), "c")
