"""--mode=invariance (Fig. 5): transforms against numpy oracles, distances and probabilities
against a direct computation, and the mode end to end on a tiny untrained workdir."""

import csv
import types

import keras
import numpy as np
import pytest
from PIL import Image

from pipelines import inputs
from tests.test_train import events
from zf_tf.analyses import invariance
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.training import workdirs


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


def tiny_workdir(tiny_config, tmp_path):
    model = small_model(tiny_config)
    workdir = str(tmp_path / "w")
    workdirs.prepare_for_training(tiny_config, workdir, False)
    workdirs.save_model_atomic(model, workdirs.checkpoint_path(workdir))
    return workdir


def test_mode_end_to_end_and_refuses_to_overwrite(tiny_config, tmp_path):
    workdir = tiny_workdir(tiny_config, tmp_path)
    config = workdirs.load_config(workdir, tiny_config)
    # Short sweeps: the figures' cost grows with them, the code paths do not.
    config.analysis.invariance.translations = (-0.1, 0.0, 0.2)
    config.analysis.invariance.scales = (1.0, 1.5)
    config.analysis.invariance.rotations = (0, 90, 180, 270)
    opts = types.SimpleNamespace(overwrite=False, split="", num_images=2)
    out = invariance.run_mode(config, workdir, opts)
    paths = out["paths"]
    sweep = invariance.sweeps(config)
    amounts = sum(len(a) for a in sweep.values())
    with open(paths["invariance.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == invariance.CSV_HEADER
    assert amounts == 9 and len(rows) == 2 * amounts
    assert {r["label"] for r in rows} <= set(inputs.class_names(config.data))
    identity = [r for r in rows if float(r["amount"]) == invariance.IDENTITY[r["transform"]]]
    assert len(identity) == 2 * 3 and all(float(r["dist_layer1"]) == 0 for r in identity)
    npz = np.load(paths["invariance.npz"])
    assert npz["rotation_dist_layer7"].shape == (2, len(sweep["rotation"]))
    assert list(npz["layers"]) == ["conv1", "fc7"]
    for name in ("invariance.png", "invariance_examples.png"):
        assert Image.open(paths[name]).size[0] > 300
    tags = events(f"{workdir}/logs/invariance")
    assert {"invariance/curves", "invariance/examples"} <= set(tags)
    stamp = open(paths["invariance.csv"]).read()
    with pytest.raises(UsageError, match="--overwrite"):
        invariance.run_mode(config, workdir, opts)
    assert open(paths["invariance.csv"]).read() == stamp
