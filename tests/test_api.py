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
from zf_tf.analyses import atlas_site
from zf_tf.core import deconv, topk
from zf_tf.core.errors import UsageError

L = keras.layers


def test_the_docstring_example_runs():
    result = doctest.testmod(api)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the example's atlas goes
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["out"]["projection"].shape == (4, 2, 96, 96, 3)
    assert scope["maps"].shape == (4, 96, 96) and scope["drops"].shape == (1, 96, 96)
    assert set(scope["best"]) == {"Conv1_relu", "out_relu"}
    assert scope["site"]["units"] == 32 and os.path.isfile("atlas/index.html")


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
        (lambda m, x: zf_tf.sanity(m, x[:1], [0]), "the sanity checks need at least 2 images"),
        (
            lambda m, x: zf_tf.sanity(m, x, [0, 1, 2], methods=["lime"]),
            "methods: 'lime' is not a method: choose from deconvnet,",
        ),
        (lambda m, x: zf_tf.atlas(m, x, "unused", k=4), "k=4: give 1 to 3"),
        (
            lambda m, x: zf_tf.atlas(m, x, "unused", layers=["c9"], k=2),
            "--layers: 'c9' is not a layer of the model: choose from c1, p1, c2",
        ),
        (
            lambda m, x: zf_tf.featvis(m, "gap", objective="neuron"),
            "layer 'gap': the neuron objective needs spatial maps",
        ),
        (lambda m, x: zf_tf.featvis(m, "c2", steps=0), "steps=0: give an integer of at least 1"),
        (
            lambda m, x: zf_tf.featvis(m, "nope"),
            "layer 'nope' is not valid for a picture: choose one of c1, p1, c2, gap, logits",
        ),
        (
            lambda m, x: zf_tf.atlas(m, x, "unused", preprocessing="imagenet", k=2),
            "preprocessing 'imagenet' is not valid: choose one of zfnet, caffe",
        ),
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


def test_sanity_compares_the_model_with_randomized_copies(small):
    """The original maps are the API's own attribution maps; each cascade step re-draws one
    more layer of a copy (the model keeps its weights); a fully randomized copy's saliency
    is less like the original than the copy with only the top layer re-drawn."""
    model, images = small
    before = [w.copy() for w in model.get_weights()]
    out = zf_tf.sanity(model, images, [0, 1, 2], methods=["saliency"], steps=4, projection_units=2)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert out["layers"] == ["logits", "c2", "c1"]
    np.testing.assert_allclose(
        out["original"]["saliency"], zf_tf.attribution(model, images, [0, 1, 2], "saliency")
    )
    cascade = out["similarity"]["cascade"]
    assert set(cascade) == {"saliency", "projection"} and len(cascade["saliency"]) == 3
    assert cascade["saliency"][-1]["spearman_abs"] < cascade["saliency"][0]["spearman_abs"]
    curves = out["faithfulness"]["saliency"]
    assert curves["deletion"].shape == curves["insertion"].shape == (3, 5)
    assert (out["others"] != [0, 1, 2]).all()


def test_atlas_writes_a_site_whose_winners_are_the_scans(small, tmp_path):
    """The site holds a page per layer and an image per winner; atlas.json's unit count is
    every unit of the layers; a second call reads the cached scans and projections (its
    files are left untouched) and replaces the site."""
    model, images = small
    folder = str(tmp_path / "site")
    summary = zf_tf.atlas(model, images, folder, labels=[0, 1, 2], class_names="abcde", k=2)
    assert summary["units"] == 6 + 8
    assert os.path.isfile(os.path.join(folder, "index.html"))
    (pages,) = atlas_site.pages_folders(folder)
    best = zf_tf.top_k(model, images, ["c1", "c2"], k=2)
    for layer, units in (("c1", 6), ("c2", 8)):
        img = os.path.join(folder, pages, atlas_site.slug(layer), "img")
        shown = {f for f in os.listdir(img) if "_p" in f}
        assert len(shown) == units * 2
        cached = np.load(os.path.join(folder, "cache", atlas_site.slug(layer), "scan.npz"))
        np.testing.assert_array_equal(cached["image"], best[layer].image)
    cache = sorted(str(p) for p in (tmp_path / "site" / "cache").rglob("*.npz"))
    stamps = [os.stat(p).st_mtime_ns for p in cache]
    zf_tf.atlas(model, images, folder, labels=[0, 1, 2], class_names="abcde", k=2)
    assert [os.stat(p).st_mtime_ns for p in cache] == stamps
    assert atlas_site.pages_folders(folder) != [pages]


def test_featvis_equals_the_optimizer_it_wraps(small):
    """The API's pictures are zf_tf.core.featvis' with the same seed, through the 'tf'
    pixel normalization (RGB [0, 1] -> [-1, 1]), two batches of one unit each."""
    from zf_tf.core import featvis

    model, _ = small
    out = zf_tf.featvis(model, "c2", units=[2, 6], steps=6, preprocessing="tf", batch_size=1)
    to_input = lambda x: x * 2.0 - 1.0  # noqa: E731
    direct = featvis.Optimizer(model, "c2", to_input, featvis.Params(steps=6)).run([2, 6])
    np.testing.assert_allclose(out["image"], direct["image"], atol=1e-5)
    assert out["units"].tolist() == [2, 6] and out["value"].shape == (2,)
