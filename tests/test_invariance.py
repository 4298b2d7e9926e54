"""--mode=invariance (Fig. 5): transforms against numpy oracles and TF's own kernel,
distances and probabilities against a direct computation, and the mode end to end on a tiny
untrained workdir."""

import csv
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import run_analysis, workdir_with_model
from tests.helpers import events
from tests.tiny_models import named_convnet, saved_bn_net
from zf_tf.analyses import base, invariance, sources
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError, inputs
from zf_tf.pipelines import examples as examples_lib


def random_images(n, size, seed=0):
    return np.random.default_rng(seed).normal(0, 50, (n, size, size, 3)).astype(np.float32)


def bilinear_oracle(image, inverse_map):
    """Samples image at inverse_map(y, x) -> (y_in, x_in), bilinear, zero outside."""
    h, w, c = image.shape
    padded = np.zeros((h + 4, w + 4, c), np.float64)
    padded[2:-2, 2:-2] = image
    out = np.zeros(image.shape, np.float64)
    for y in range(h):
        for x in range(w):
            yi, xi = inverse_map(y, x)
            if not (-2 < yi < h + 1 and -2 < xi < w + 1):
                continue  # every neighbour is outside: zero
            y0, x0 = int(np.floor(yi)), int(np.floor(xi))
            fy, fx = yi - y0, xi - x0
            p = padded[y0 + 2 : y0 + 4, x0 + 2 : x0 + 4]
            out[y, x] = (
                p[0, 0] * (1 - fy) * (1 - fx)
                + p[0, 1] * (1 - fy) * fx
                + p[1, 0] * fy * (1 - fx)
                + p[1, 1] * fy * fx
            )
    return out


def oracle(image, kind, amount):
    """The module docstring's definitions, written independently of transform_matrix."""
    c = (image.shape[0] - 1) / 2
    if kind == "translation":
        return bilinear_oracle(image, lambda y, x: (y - amount * image.shape[0], x))
    if kind == "scale":
        return bilinear_oracle(image, lambda y, x: (c + (y - c) / amount, c + (x - c) / amount))
    a = np.deg2rad(amount)  # counterclockwise on screen: output = R(a) applied to the input

    def inverse(y, x):
        dy, dx = y - c, x - c
        return (c + np.sin(a) * dx + np.cos(a) * dy, c + np.cos(a) * dx - np.sin(a) * dy)

    return bilinear_oracle(image, inverse)


def transform(image, kind, amount):
    m = invariance.transform_matrix(kind, amount, image.shape[0])
    return invariance.apply_transforms(image[None], m[None])[0]


@pytest.mark.parametrize("kind", invariance.TRANSFORMS)
def test_identity_amounts_change_nothing(kind):
    image = random_images(1, 16)[0]
    np.testing.assert_array_equal(transform(image, kind, invariance.IDENTITY[kind]), image)


@pytest.mark.parametrize("fraction, pixels", [(0.25, 4), (-0.125, -2), (0.0625, 1)])
def test_integer_translation_is_a_zero_filled_shift(fraction, pixels):
    image = random_images(1, 16, seed=1)[0]
    expected = np.zeros_like(image)
    if pixels > 0:  # positive amounts move the content down
        expected[pixels:] = image[:-pixels]
    else:
        expected[:pixels] = image[-pixels:]
    np.testing.assert_array_equal(transform(image, "translation", fraction), expected)


@pytest.mark.parametrize("size", [16, 15])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rotation_by_quarter_turns_is_rot90_counterclockwise(size, k):
    image = random_images(1, size, seed=2)[0]
    np.testing.assert_array_equal(transform(image, "rotation", 90 * k), np.rot90(image, k))


@pytest.mark.parametrize(
    "kind, amount",
    [
        ("translation", 0.1),
        ("translation", -0.23),
        ("scale", 0.7),
        ("scale", 1.3),
        ("rotation", 30),
        ("rotation", -75),
    ],
)
def test_transforms_match_a_bilinear_oracle(kind, amount):
    image = random_images(1, 12, seed=3)[0]
    np.testing.assert_allclose(
        transform(image, kind, amount), oracle(image, kind, amount), atol=2e-3
    )


def test_keras_affine_transform_is_the_raw_tf_kernel_bit_for_bit():
    # apply_transforms called tf.raw_ops.ImageProjectiveTransformV3 before it used
    # keras.ops.image.affine_transform: the results must not change by a single bit.
    images = random_images(3, 20, seed=6)
    sweep = {"translation": (-0.23, 0.1), "scale": (0.7, 1.3), "rotation": (30.0, -75.0, 200.0)}
    keys = [(kind, a) for kind in sweep for a in sweep[kind]]
    matrices = np.stack([invariance.transform_matrix(kind, a, 20) for kind, a in keys])
    batch = np.repeat(images, len(keys), axis=0)
    matrices = np.tile(matrices, (len(images), 1))
    raw = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(batch),
        transforms=tf.constant(matrices, tf.float32),
        output_shape=tf.constant([20, 20]),
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    ).numpy()
    got = invariance.apply_transforms(batch, matrices)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, raw)
    assert (got == 0).any()  # the fill is exercised


def test_transformed_copies_are_one_batch_in_sweep_order():
    image = random_images(1, 12, seed=4)[0]
    sweep = {"translation": (0.0, 0.25), "rotation": (90.0,)}
    copies, keys = invariance.transformed_copies(image, sweep)
    assert keys == [("translation", 0.0), ("translation", 0.25), ("rotation", 90.0)]
    np.testing.assert_array_equal(copies[0], image)
    np.testing.assert_array_equal(copies[2], np.rot90(image))


def small_model(tiny_config, **model_overrides):
    config = tiny_config
    config.model.width = 0.125
    for key, value in model_overrides.items():
        config.model[key] = value
    return model_lib.build_model(config.model)


def test_measure_matches_a_direct_computation(tiny_config):
    model = small_model(tiny_config)
    image = random_images(1, 64, seed=5)[0]
    label = 3
    sweep = {"translation": (0.0, 0.1), "scale": (0.8,), "rotation": (45.0,)}
    result = invariance.measure(model, image[None], np.array([label]), sweep)
    assert result["layer1"] == "conv1" and result["layer7"] == "fc7" and not result["note"]
    conv1 = keras.Model(model.input, model.get_layer("conv1").output)
    fc7 = keras.Model(model.input, model.get_layer("fc7").output)

    def direct(x):
        logits = np.asarray(model(x[None], training=False), np.float64)[0]
        p = np.exp(logits - logits.max())
        return (
            np.asarray(conv1(x[None]), np.float64).ravel(),
            np.asarray(fc7(x[None]), np.float64).ravel(),
            p[label] / p.sum(),
        )

    o1, o7, _ = direct(image)
    np.testing.assert_allclose(result["norm_layer1"], [np.linalg.norm(o1)], rtol=1e-5)
    for kind, amounts in sweep.items():
        np.testing.assert_array_equal(result[f"{kind}/amounts"], amounts)
        for a, amount in enumerate(amounts):
            t1, t7, p = direct(oracle(image, kind, amount).astype(np.float32))
            d1, d7 = np.linalg.norm(t1 - o1), np.linalg.norm(t7 - o7)
            assert result[f"{kind}/dist_layer1"].shape == (1, len(amounts))
            close = dict(rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(result[f"{kind}/dist_layer1"][0, a], d1, **close)
            np.testing.assert_allclose(result[f"{kind}/dist_layer7"][0, a], d7, **close)
            np.testing.assert_allclose(result[f"{kind}/p_true"][0, a], p, rtol=1e-4)
    assert result["translation/dist_layer1"][0, 0] == 0.0  # the identity copy
    assert result["translation/dist_layer1"][0, 1] > 0.0


def test_a_model_without_fc7_uses_its_last_fc_layer(tiny_config):
    model = small_model(tiny_config, remove=("fc7",))
    l1, l7, note = invariance.feature_layers(model)
    assert (l1, l7) == ("conv1", "fc6") and "no fc7" in note and "fc6" in note
    assert [o.shape[-1] for o in invariance.tap_model(model).outputs] == [12, 512, 10]


def test_mode_end_to_end_and_refuses_to_overwrite(tiny_config, tmp_path, capsys):
    # A model without fc7: the mode's note (printed and in the figure title) is exercised too.
    model = small_model(tiny_config, remove=("fc7",))
    config = tiny_config
    # Short sweeps: the figures' cost grows with them, the code paths do not.
    config.analysis.invariance.translations = (-0.1, 0.0, 0.2)
    config.analysis.invariance.scales = (1.0, 1.5)
    config.analysis.invariance.rotations = (0, 90, 180, 270)
    workdir = workdir_with_model(config, model, tmp_path / "w")
    capsys.readouterr()
    out = run_analysis("invariance", config, workdir, num_images=2)
    paths = out.paths
    assert list(paths) == list(invariance.OUTPUTS)
    note = "the model has no fc7: 'layer 7' is fc6, its last fc layer"
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"Note: {note}", f"Wrote {', '.join(paths.values())}"]
    assert out.report.lines == [f"Note: {note}"]

    # The CSV, row by row, against the examples and an independent run of `measure`.
    ex = examples_lib.load_examples(config, "validation", 2)
    sweep = {
        "translation": (-0.1, 0.0, 0.2),
        "scale": (1.0, 1.5),
        "rotation": (0.0, 90.0, 180.0, 270.0),
    }
    ref = invariance.measure(model, ex.images, ex.labels, sweep)
    names = inputs.class_names(config.data)
    with open(paths["invariance.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == invariance.CSV_HEADER
    expected = [
        (str(i), names[int(y)], kind, f"{a:g}")
        for kind in invariance.TRANSFORMS
        for i, y in zip(ex.indices, ex.labels)
        for a in sweep[kind]
    ]
    assert [(r["image"], r["label"], r["transform"], r["amount"]) for r in rows] == expected
    values = [
        [ref[f"{kind}/{key}"][n, a] for key in ("dist_layer1", "dist_layer7", "p_true")]
        for kind in invariance.TRANSFORMS
        for n in range(2)
        for a in range(len(sweep[kind]))
    ]
    got = [[float(r[k]) for k in ("dist_layer1", "dist_layer7", "p_true")] for r in rows]
    np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-6)
    # The identity amounts (0, 1, 0) leave the image, hence its features, unchanged; a quarter
    # turn does change conv1's output (the copies really are transformed).
    identity = [r for r in rows if float(r["amount"]) == invariance.IDENTITY[r["transform"]]]
    assert [r["transform"] for r in identity] == ["translation"] * 2 + ["scale"] * 2 + [
        "rotation"
    ] * 2
    assert all(float(r["dist_layer1"]) == 0 for r in identity)
    assert all(float(r["dist_layer1"]) > 0 for r in rows if r["amount"] == "90")

    with np.load(paths["invariance.npz"]) as npz:
        assert list(npz["layers"]) == ["conv1", "fc6"] and str(npz["note"]) == note
        np.testing.assert_array_equal(npz["indices"], ex.indices)
        np.testing.assert_array_equal(npz["labels"], ex.labels)
        for kind in invariance.TRANSFORMS:
            np.testing.assert_array_equal(npz[f"{kind}_amounts"], sweep[kind])
            for key in ("dist_layer1", "dist_layer7", "p_true"):
                np.testing.assert_allclose(npz[f"{kind}_{key}"], ref[f"{kind}/{key}"], rtol=1e-6)
        np.testing.assert_allclose(npz["norm_layer7"], ref["norm_layer7"], rtol=1e-6)
    for name in ("invariance.png", "invariance_examples.png"):
        assert Image.open(paths[name]).size[0] > 300
    tags = events(f"{workdir}/logs/invariance")
    assert {"invariance/curves", "invariance/examples"} <= set(tags)

    stamp = open(paths["invariance.csv"]).read()
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("invariance", config, workdir, num_images=2)
    assert open(paths["invariance.csv"]).read() == stamp


def test_bad_settings_are_refused_before_anything_loads(tiny_config, tmp_path):
    # tmp_path holds no model: these errors come from the settings, before the model loads.
    with pytest.raises(DataError, match="valid splits"):
        run_analysis("invariance", tiny_config, tmp_path, split="nope")
    tiny_config.analysis.invariance.scales = (1.0, 0.0)
    with pytest.raises(UsageError, match="scale factors must be positive; got 0.0"):
        run_analysis("invariance", tiny_config, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------------------------
# Any model: layers 1 and 7 follow the model; labels that are not its classes
# ---------------------------------------------------------------------------------------------


def test_resolve_picks_the_models_own_layers(tiny_config):
    s = invariance.settings(tiny_config, base.Request("/nowhere"))
    assert s.layers == ("", "")
    model = named_convnet(classes=1000)
    brought = sources.Source(model=model, config=tiny_config, own_labels=False)
    r = invariance.resolve(s, model, brought)
    assert (r.layers, r.labels) == (("a", "h"), False)
    assert len(r.class_names) == 1000 and r.class_names[999] == "class 999"
    named = dataclasses.replace(s, layers=("b", "gap"))
    assert invariance.resolve(named, model, brought).layers == ("b", "gap")
    with pytest.raises(UsageError) as error:
        invariance.resolve(dataclasses.replace(s, layers=("a", "zz")), model, brought)
    assert str(error.value) == (
        "config.analysis.invariance.layers: no layer 'zz'; valid layers: a, p, b, gap, h"
    )
    own = sources.Source(model=None, config=tiny_config)
    r = invariance.resolve(s, small_model(tiny_config), own)
    assert (r.layers, r.labels, r.class_names) == (("conv1", "fc7"), True, s.class_names)
    tiny_config.analysis.invariance.layers = ("conv1",)
    with pytest.raises(UsageError, match="give 2 names"):
        invariance.settings(tiny_config, base.Request("/nowhere"))


def test_layer_7_without_hidden_dense_layers(tiny_config):
    l1, l7, note = invariance.feature_layers(small_model(tiny_config, remove=("fc6", "fc7")))
    assert (l1, l7) == ("conv1", "flatten") and "no hidden dense layer" in note


def test_predicted_class_where_labels_do_not_apply():
    model = named_convnet()
    images = random_images(2, 64, seed=1)
    sweep = {"translation": (0.0, 0.2), "scale": (1.0,), "rotation": (0.0, 90.0)}
    got = invariance.measure(model, images, np.array([-1, -1]), sweep, predicted=True)
    probs = tf.nn.softmax(model(images, training=False)).numpy()
    predicted = probs.argmax(axis=1)
    assert got["target"] == "predicted" and (got["layer1"], got["layer7"]) == ("a", "h")
    np.testing.assert_array_equal(got["classes"], predicted)
    identity = probs[[0, 1], predicted]  # the untransformed copies: the clean probability
    np.testing.assert_allclose(got["translation/p_true"][:, 0], identity, rtol=1e-5)
    np.testing.assert_allclose(got["rotation/p_true"][:, 0], identity, rtol=1e-5)
    text = invariance.csv_text(got, [-1, -1], [0, 1], [f"class {i}" for i in range(10)])
    rows = list(csv.DictReader(text.splitlines()))
    assert tuple(rows[0]) == invariance.CSV_HEADER_PREDICTED
    assert rows[0]["predicted"] == f"class {predicted[0]}"


def test_mode_on_a_model_brought_along(tiny_config, tmp_path, capsys):
    config = tiny_config
    config.analysis.invariance.translations = (0.0, 0.2)
    config.analysis.invariance.scales = (1.0, 1.5)
    config.analysis.invariance.rotations = (0, 90)
    path = saved_bn_net(tmp_path)
    out = run_analysis("invariance", config, tmp_path / "w", model=path, num_images=2)
    assert list(out.paths) == list(invariance.OUTPUTS)
    with np.load(out.paths["invariance.npz"]) as npz:
        assert list(npz["layers"]) == ["c1", "gap"] and str(npz["target"]) == "predicted"
        assert npz["translation_p_true"].shape == (2, 2)
    with open(out.paths["invariance.csv"]) as fh:
        assert tuple(next(csv.reader(fh))) == invariance.CSV_HEADER_PREDICTED
    for name in ("invariance.png", "invariance_examples.png"):
        with Image.open(out.paths[name]) as png:
            assert png.size[0] >= 200  # decodes (the strip is 2 copies wide)
    note = out.report.lines[-1]
    assert note.startswith("Note: the labels of 'validation' are not classes of this model")
    assert note in capsys.readouterr().out.splitlines()
