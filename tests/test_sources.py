"""Model sources (--model, --weights): keras.applications builders offline, .keras files, the
config adapted to the model, the deconv mode on a model that is not ZFNet, and one-line
refusals of bad --model / --weights / --layer."""

import json
import os

import keras
import numpy as np
import pytest

from tests.conftest import run_analysis
from tests.tiny_models import pooled_bn_net
from zf_tf.analyses import base, sources
from zf_tf.core import deconv
from zf_tf.core.errors import UsageError


def request(**fields):
    return base.Request(workdir="/nowhere", **fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(model="vgg17"), "no such file, and not a keras.applications name: .* vgg16, vgg19"),
        (dict(model="vgg16", weights="/no/such.h5"), r"--weights=/no/such.h5: no such file"),
        (dict(weights="w.h5"), "--weights needs --model"),
        (dict(model="/"), "is a directory .*SavedModel"),
        (dict(model=__file__), "not a Keras model file"),
    ],
)
def test_bad_model_flags(fields, message):
    with pytest.raises(UsageError, match=message):
        sources.check(request(**fields))


def test_application_at_a_free_size_is_random_and_says_so(tiny_config):
    r = request(model="vgg16", overridden=("data.crop_size",))
    tiny_config.data.crop_size = 32
    source = sources.open_source(tiny_config, r)
    assert source.model.inputs[0].shape[1:] == (32, 32, 3)
    assert "RANDOM weights" in source.description and "without its top" in source.description
    data = source.config.data
    assert (data.crop_size, data.preprocessing) == (32, "caffe")
    assert data.resize_size == 72  # the command line's config: only the crop was set
    assert not source.own_labels and not source.labels_apply("validation")
    # The command line's preprocessing wins over the family's.
    r = request(model="vgg16", overridden=("data.crop_size", "data.preprocessing"))
    tiny_config.data.preprocessing = "tf"
    assert sources.open_source(tiny_config, r).config.data.preprocessing == "tf"


def test_local_weights_load_and_a_wrong_file_is_refused(tiny_config, tmp_path):
    tiny_config.data.crop_size = 32
    keras.utils.set_random_seed(1)
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg16_notop.weights.h5")
    vgg.save_weights(path)
    r = request(model="vgg16", weights=path, overridden=("data.crop_size",))
    source = sources.open_source(tiny_config, r)
    assert f"weights from {path}" in source.description
    for a, b in zip(source.model.get_weights(), vgg.get_weights()):
        np.testing.assert_array_equal(a, b)
    r = request(model="vgg19", weights=path, overridden=("data.crop_size",))
    with pytest.raises(
        UsageError,
        match="does not fit vgg19: the file holds the weights of 13 layers, vgg19 has layers "
        r"with weights: 16 without its top \(weights of another network\?\)$",
    ):
        sources.open_source(tiny_config, r)


def test_foreign_models_and_damaged_files_are_one_line(tiny_config, tmp_path, recwarn):
    """Two inputs, a damaged .keras (as --model or --weights), a file that is no weights
    file: one line each, no Keras warnings."""
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Add()([a, b])))
    two = str(tmp_path / "two.keras")
    keras.Model([a, b], out).save(two)
    with pytest.raises(UsageError, match=r"two.keras has 2 inputs \(input_layer"):
        sources.open_source(tiny_config, request(model=two))
    cut = str(tmp_path / "cut.keras")
    with open(two, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[:300])
    with pytest.raises(UsageError, match=r"cut.keras is damaged or not a Keras file \("):
        sources.open_source(tiny_config, request(model=cut))
    text = str(tmp_path / "notes.weights.h5")
    with open(text, "w") as f:
        f.write("not HDF5")
    for weights in (cut, text):
        with pytest.raises(UsageError, match=f"--weights={weights} is damaged or not a Keras"):
            sources.open_source(
                tiny_config, request(model="vgg16", weights=weights, overridden=("data.crop_size",))
            )
    assert not [str(w.message)[:200] for w in recwarn if w.category is UserWarning]
    # Not square; channels-first (the shape alone would read "takes 32-channel images").
    L = keras.layers
    for name, layers, says in (
        (
            "wide",
            [keras.Input((24, 32, 3)), L.Conv2D(4, 3)],
            "takes 24 x 32 images: the analyses need square",
        ),
        (
            "first",
            [keras.Input((3, 32, 32)), L.Conv2D(4, 3, data_format="channels_first")],
            r"is channels-first \(layer 'conv2d.*'; input \(3, 32, 32\)\)",
        ),
    ):
        path = str(tmp_path / f"{name}.keras")
        keras.Sequential([*layers, L.Flatten(), L.Dense(2)]).save(path)
        with pytest.raises(UsageError, match=f"--model={path} {says}"):
            sources.open_source(tiny_config, request(model=path))


def test_keras_file_round_trip(tiny_config, tmp_path):
    model = pooled_bn_net()
    path = str(tmp_path / "bn_net.keras")
    model.save(path)
    source = sources.open_source(tiny_config, request(model=path))
    data = source.config.data
    assert (data.crop_size, data.preprocessing) == (28, "zfnet")
    assert data.resize_size == 32  # 28 x 72 / 64 = 31.5: the config's resize ratio kept
    images = np.random.default_rng(0).uniform(0, 255, (2, 28, 28, 3)).astype(np.float32)
    for m in (model, source.model):
        out = deconv.project(deconv.build_deconvnet(m, "r2"), images, [0, 1], [3, 5])
        if m is model:
            expected = out
    for key in expected:
        np.testing.assert_array_equal(out[key], expected[key])
    with pytest.raises(UsageError, match="data.crop_size=64 differs"):
        sources.open_source(tiny_config, request(model=path, overridden=("data.crop_size",)))
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match=f"--model={bad} is damaged or not a Keras file"):
        sources.open_source(tiny_config, request(model=str(bad)))


def test_deconv_mode_on_a_keras_file(tiny_config, tmp_path):
    """The Fig. 2 scan on a model that is not ZFNet: its own layer names, written under
    WORKDIR/deconv/<layer>/; a bad --layer names the valid ones and writes nothing."""
    model = pooled_bn_net()
    path = str(tmp_path / "bn_net.keras")
    model.save(path)
    workdir = tmp_path / "out"
    with pytest.raises(UsageError, match=r"--layer='fc' is not valid: choose one of c1, r1, p1"):
        run_analysis("deconv", tiny_config, workdir, model=path, layer="fc")
    assert not workdir.exists()
    result = run_analysis("deconv", tiny_config, workdir, model=path, num_features=3, top_k=4)
    png = result.paths["top4_validation.png"]
    assert png == str(workdir / "deconv" / "c3" / "top4_validation.png")  # last conv
    assert keras.utils.load_img(png).size[0] > 100
    index = json.load(open(result.paths["top4_validation.json"]))
    assert index["layer"] == "c3" and len(index["winners"]) == 3 * 4
    assert result.result["projection"].shape == (12, 28, 28, 3)
    for f in index["features"]:  # strongest first, per map
        acts = [w["activation"] for w in index["winners"] if w["feature"] == f]
        assert acts == sorted(acts, reverse=True) and len(acts) == 4
    assert max(w["activation"] for w in index["winners"]) > 0
    assert os.path.isdir(workdir / "logs" / "deconv")
