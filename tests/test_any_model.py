"""Deconvnet projections on models that are not ZFNet: every keras.applications name the
command line accepts (random weights, small inputs; an independent rule-gradient oracle,
receptive fields, a 2-layer atlas), VGG16 and ResNet50 in depth, a Sequential
Conv-BN-ReLU-pool net with average pooling, a nested model and a tiny residual net: the
explicit deconvnet Model (windowed and not), the backward-rule form and an independent
GradientTape oracle give the same projections."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import zf_tf
from tests import oracles
from tests.tiny_models import pooled_bn_net
from zf_tf.analyses import atlas_site, sources
from zf_tf.core import deconv, graph, rules

L = keras.layers


def assert_close(actual, expected, rtol=2e-4, what=""):
    scale = float(np.abs(expected).max())
    assert scale > 0, f"{what}: the expected projection is all zero"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=what)


def strongest(model, name, images, n=1):
    """For each image, its `n` feature maps with the highest maximum (live units)."""
    maps = graph.tap(model, [name])(images).numpy()
    maps = maps.reshape(len(images), -1, maps.shape[-1])
    order = np.argsort(-maps.max(1), axis=1)[:, :n]
    index = np.repeat(np.arange(len(images)), n).astype(np.int32)
    return index, order.reshape(-1).astype(np.int32)


def check_layer(model, name, images, oracle=True, windowed=(True, False)):
    """explicit (windowed and not) == rule form == oracle at each image's strongest map."""
    index, feature = strongest(model, name, images)
    minus = np.full(len(index), -1, np.int32)
    rule = deconv.project(deconv.build_deconvnet(model, name, form="rule"), images, index, feature)
    for w in windowed:
        explicit = deconv.project(
            deconv.build_deconvnet(model, name, form="explicit", windowed=w),
            images,
            index,
            feature,
        )
        assert_close(explicit["projection"], rule["projection"], what=f"{name} windowed={w}")
        np.testing.assert_allclose(explicit["activation"], rule["activation"], rtol=1e-5)
        np.testing.assert_array_equal(explicit["y"], rule["y"])
    if oracle:
        chain = graph.chain(model, name)
        expected = oracles.chain_projection(chain, images[index], feature, minus, minus)
        assert_close(rule["projection"], expected, what=f"{name} oracle")
    return rule


# ---------------------------------------------------------------------------------------------
# VGG16
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16():
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))


VGG_CONVS = [
    f"block{b}_conv{c}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for c in range(1, n + 1)
]


@pytest.mark.slow
def test_vgg16_all_13_conv_layers(vgg16):
    assert graph.conv_layers(vgg16) == VGG_CONVS
    images = np.random.default_rng(0).uniform(-100, 100, (2, 32, 32, 3)).astype(np.float32)
    for name in VGG_CONVS:
        assert deconv.projection_form(vgg16, name) == ("explicit", "")
        # The windowed explicit form at each block's last conv (every pool's switches).
        last = name == VGG_CONVS[-1] or VGG_CONVS[VGG_CONVS.index(name) + 1][:6] != name[:6]
        check_layer(vgg16, name, images, windowed=(True, False) if last else (False,))


def test_vgg16_receptive_fields(vgg16):
    assert graph.receptive_field_size(vgg16, "block1_conv1") == 3
    assert graph.receptive_field_size(vgg16, "block2_conv1") == 10  # 3 + 2 + 1 (pool) + 4
    assert graph.receptive_field(vgg16, "block1_conv2", 0, 0) == (0, 0, 3, 3)
    assert graph.receptive_field(vgg16, "block1_pool", 3, 4) == (4, 6, 10, 12)


# ---------------------------------------------------------------------------------------------
# A Sequential Conv-BN-ReLU-pool net with average pooling
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnnet():
    return pooled_bn_net()


@pytest.mark.slow
def test_bn_net_layers(bnnet):
    assert deconv.valid_layers(bnnet) == ["c1", "r1", "p1", "c2", "r2", "a2", "c3", "a3", "gap"]
    images = np.random.default_rng(1).uniform(0, 255, (3, 28, 28, 3)).astype(np.float32)
    for name in deconv.valid_layers(bnnet):
        assert deconv.projection_form(bnnet, name)[0] == "explicit", name
        check_layer(bnnet, name, images)


def test_bn_net_scale_matters(bnnet):
    """The projection below a BN layer depends on its scale (not treated as identity)."""
    images = np.random.default_rng(2).uniform(0, 255, (1, 28, 28, 3)).astype(np.float32)
    net = deconv.build_deconvnet(bnnet, "r2")
    before = deconv.project(net, images, [0], [0], 2, 2)["projection"]
    bn = bnnet.get_layer("bn1")
    weights = bn.get_weights()
    try:
        bn.set_weights([weights[0] * np.linspace(0.2, 3, len(weights[0])), *weights[1:]])
        after = deconv.project(net, images, [0], [0], 2, 2)["projection"]
    finally:
        bn.set_weights(weights)
    assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()


def test_unsupported_layer_is_named():
    model = keras.Sequential(
        [keras.Input((16, 16, 3)), L.Conv2D(4, 3, activation="tanh", name="c1"), L.ReLU(name="r")]
    )
    with pytest.raises(NotImplementedError, match=r"activation 'tanh'"):
        deconv.build_deconvnet(model, "r", form="explicit")
    with pytest.raises(ValueError, match="valid layers: c1, r$"):
        deconv.build_deconvnet(model, "nope")
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            L.Conv2D(4, 3, name="c1"),
            L.LayerNormalization(name="ln"),
            L.ReLU(name="r"),
        ]
    )
    with pytest.raises(NotImplementedError, match=r"'ln' \(LayerNormalization\) has no deconvnet"):
        deconv.build_deconvnet(model, "r", form="explicit")
    assert deconv.projection_form(model, "r")[0] == "rule"  # auto falls back to the rule form
    out = deconv.project(deconv.build_deconvnet(model, "r"), np.ones((1, 16, 16, 3)), [0], [0])
    assert out["projection"].shape == (1, 16, 16, 3)
    # A fused rectifier the rule form cannot reach is refused up front, before any model is built.
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            L.Conv2DTranspose(4, 3, activation="relu", name="up"),
            L.ReLU(name="r"),
        ]
    )
    with pytest.raises(NotImplementedError, match=r"'up' \(Conv2DTranspose\) has a fused relu"):
        deconv.projection_form(model, "r")


def test_nested_model(vgg16):
    """A classifier wrapping VGG16 as one layer: its inner layers can be chosen and tapped."""
    inp = keras.Input((32, 32, 3))
    x = vgg16(inp)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outer = keras.Model(inp, L.Dense(3, name="head")(x))
    assert graph.chain(outer, "block2_conv1") is not None
    images = np.random.default_rng(3).uniform(-100, 100, (1, 32, 32, 3)).astype(np.float32)
    a = check_layer(outer, "block2_conv1", images, windowed=(True,))
    b = check_layer(vgg16, "block2_conv1", images, oracle=False, windowed=(True,))
    np.testing.assert_array_equal(a["projection"], b["projection"])
    logits = rules.rule_forward(outer, tf.constant(images), "head", "gradient")
    np.testing.assert_allclose(logits.numpy(), outer(images).numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# DAG models: the rule form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["block1_out", "block2_out"])
def test_residual_net_matches_hand_written_oracle(layer):
    model = oracles.tiny_residual_net()
    assert graph.chain(model, layer) is None
    assert deconv.projection_form(model, layer)[0] == "rule"
    images = np.random.default_rng(4).normal(0, 1, (2, 24, 24, 3)).astype(np.float32)
    _, feature = strongest(model, layer, images)
    out = deconv.project(deconv.build_deconvnet(model, layer), images, [0, 1], feature)
    for n in range(2):
        expected, (y, x) = oracles.residual_projection(model, images[n], layer, feature[n])
        assert (out["y"][n], out["x"][n]) == (y, x)
        assert_close(out["projection"][n], expected, what=f"{layer} image {n}")
    with pytest.raises(NotImplementedError, match="not a chain"):
        deconv.build_deconvnet(model, layer, form="explicit")
    # The stem below the first block is a chain: explicit == rule there.
    check_layer(model, "stem_pool", images, oracle=False)


@pytest.mark.slow
def test_vgg16_at_224_with_its_classifier():
    """The full keras.applications VGG16 (classifier top, logits) at 224 px: explicit ==
    rule form == oracle at a deep and a middle layer; the logits through the rule form's
    clone equal the model's."""
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, classifier_activation=None)
    images = np.random.default_rng(6).uniform(-100, 100, (1, 224, 224, 3)).astype(np.float32)
    for name in ("block5_conv3", "block3_conv3"):
        check_layer(model, name, images, windowed=(True,))
    logits = rules.rule_forward(model, tf.constant(images), "predictions", "deconvnet")
    np.testing.assert_allclose(logits.numpy(), model(images).numpy(), rtol=1e-4, atol=1e-4)


def test_depthwise_relu6_chain_rule_form_matches_oracle():
    """Depthwise convs and ReLU6 have no explicit inverse here: the rule form runs and
    equals the GradientTape oracle (ReLU6 forward, ReLU of the signal backward)."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((20, 20, 3)),
            L.Conv2D(8, 3, strides=2, padding="same", name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(6.0, name="r1"),
            L.DepthwiseConv2D(3, padding="same", name="dw"),
            L.ReLU(6.0, name="r2"),
            L.Conv2D(12, 1, name="pw"),
        ]
    )
    assert deconv.projection_form(model, "pw")[0] == "rule"
    images = np.random.default_rng(8).uniform(-2, 2, (2, 20, 20, 3)).astype(np.float32)
    check_layer(model, "pw", images, windowed=())


def test_mobilenet_v2_depthwise_relu6_rule_form():
    """MobileNetV2: depthwise convs, ReLU6 and residual adds, through the rule form; the
    rule form differs from the plain gradient exactly by the ReLUs' backward rule."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35
    )
    name = "block_6_expand_relu"
    assert graph.chain(model, name) is None and deconv.projection_form(model, name)[0] == "rule"
    images = np.random.default_rng(7).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    index, feature = strongest(model, name, images)
    out = deconv.project(deconv.build_deconvnet(model, name), images, index, feature)
    proj = out["projection"]
    assert proj.shape == (2, 32, 32, 3) and np.isfinite(proj).all() and np.abs(proj).max() > 0
    x = tf.constant(images)
    grads = {}
    for rule in ("deconvnet", "gradient"):
        with tf.GradientTape() as tape:
            tape.watch(x)
            maps = rules.rule_forward(model, x, name, rule)
            score = tf.reduce_sum(
                tf.reduce_max(maps, axis=(1, 2)) * tf.one_hot(feature, maps.shape[-1])
            )
        grads[rule] = tape.gradient(score, x).numpy()
    forward = graph.tap(model, [name])(images).numpy()
    np.testing.assert_allclose(maps.numpy(), forward, rtol=1e-5, atol=1e-5)  # same forward
    assert (
        np.abs(grads["deconvnet"] - grads["gradient"]).max()
        > 1e-3 * np.abs(grads["gradient"]).max()
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(sources.APPLICATIONS))
def test_every_application_against_an_independent_rule_gradient(name, tmp_path):
    """Every --model name, built as the command line builds it (random weights, no top, at
    a small size): the projection of a unit (live in both images) of a conv layer 60% of
    the way up equals the activation times its gradient through a clone (tests/oracles.py,
    no zf_tf code) whose
    rectifiers (ReLU, ReLU6, GELU, swish, hard swish: separate or fused) pass ReLU(signal)
    down and whose gates pass their gradient; its support lies inside the unit's receptive
    field (through SE gates and other global paths: the whole image); the atlas of its first
    two conv layers is written, one page and one projection per unit."""
    from tests.oracles import rule_projection

    keras.utils.set_random_seed(0)
    size = 80 if name in ("inception_v3", "xception") else 64  # their smallest: 75, 71
    model, _ = sources._build_application(name, "", size, {"data.crop_size"})
    convs = graph.conv_layers(model)
    layer = convs[int(0.6 * len(convs))]
    images = np.random.default_rng(3).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    maps = graph.tap(model, [layer])(images).numpy()
    feature = int(maps.reshape(2, -1, maps.shape[-1]).max(1).min(0).argmax())  # live in both
    out = deconv.project(deconv.build_deconvnet(model, layer), images, [0, 1], [feature, feature])
    want, best = rule_projection(model, layer, images, feature)
    np.testing.assert_allclose(out["activation"], best, rtol=1e-5)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(out["projection"], want, rtol=1e-3, atol=1e-4 * scale)
    for m in range(2):
        y0, x0, y1, x1 = graph.receptive_field(model, layer, out["y"][m], out["x"][m])
        outside = np.ones((size, size), bool)
        outside[y0:y1, x0:x1] = False
        assert not np.abs(out["projection"][m][outside]).any()
    summary = zf_tf.atlas(model, images, str(tmp_path), layers=convs[:2], k=1)
    units = [int(graph.find(model, c).output.shape[-1]) for c in convs[:2]]
    assert summary["units"] == sum(units)
    (pages,) = atlas_site.pages_folders(str(tmp_path))
    for c, n in zip(convs[:2], units):
        img = os.listdir(os.path.join(tmp_path, pages, atlas_site.slug(c), "img"))
        assert len([f for f in img if "_p0." in f]) == n
