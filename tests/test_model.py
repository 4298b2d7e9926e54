"""ZFNet architecture: every layer's shape, exact parameter counts, init, constraint."""

import os

import keras
import ml_collections
import numpy as np
import pytest

from tests.conftest import load_config
from zf_tf.core import model as model_lib

PAPER_SHAPES = {
    "conv1": (110, 110, 96),
    "pool1": (55, 55, 96),
    "norm1": (55, 55, 96),
    "conv2": (26, 26, 256),
    "pool2": (13, 13, 256),
    "norm2": (13, 13, 256),
    "conv3": (13, 13, 384),
    "conv4": (13, 13, 384),
    "conv5": (13, 13, 256),
    "pool5": (6, 6, 256),
    "fc6": (4096,),
    "fc7": (4096,),
    "logits": (1000,),
}


def paper_model_config(**overrides):
    config = load_config("zfnet_imagenet").model
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


@pytest.fixture(scope="module")
def paper_model():
    return model_lib.build_model(paper_model_config())


def test_paper_layer_shapes(paper_model):
    for name, shape in PAPER_SHAPES.items():
        assert tuple(paper_model.get_layer(name).output.shape[1:]) == shape, name


def test_paper_parameter_count(paper_model):
    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    def dense(n_in, n_out):
        return n_in * n_out + n_out

    expected = (
        conv(7, 3, 96)
        + conv(5, 96, 256)
        + conv(3, 256, 384)
        + conv(3, 384, 384)
        + conv(3, 384, 256)
        + dense(6 * 6 * 256, 4096)
        + dense(4096, 4096)
        + dense(4096, 1000)
    )
    assert paper_model.count_params() == expected == 62_357_608


def test_paper_init_and_dropout(paper_model):
    w, b = paper_model.get_layer("fc7").get_weights()
    assert abs(w.mean()) < 1e-4 and abs(w.std() - 0.01) < 1e-4
    assert not b.any()
    for name in ("drop6", "drop7"):
        assert paper_model.get_layer(name).rate == 0.5
    names = [layer.name for layer in paper_model.layers]
    assert names.index("drop6") == names.index("fc6") + 1
    assert names.index("drop7") == names.index("fc7") + 1
    assert isinstance(paper_model.get_layer("norm1"), model_lib.LocalResponseNorm)


def test_conv1_init_stddev_changes_conv1_alone():
    config = load_config()
    he = model_lib.build_model(config.model)
    config.model.conv1_init_stddev = 0.01
    small = model_lib.build_model(config.model)
    w = small.get_layer("conv1").kernel.numpy()
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.01) < 5e-4
    assert abs(he.get_layer("conv1").kernel.numpy().std() - np.sqrt(2 / w[..., 0].size)) < 5e-3
    for name in ("conv2", "conv5", "fc6", "logits"):
        np.testing.assert_array_equal(
            small.get_layer(name).kernel.numpy(), he.get_layer(name).kernel.numpy()
        )


def test_filter_rms_constraint():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 7, 3, 2)).astype("float32")
    rms = np.sqrt((w**2).mean(axis=(0, 1, 2)))
    w[..., 0] *= 0.5 / rms[0]
    w[..., 1] *= 0.05 / rms[1]
    out = np.asarray(model_lib.FilterRMS(0.1)(w))
    out_rms = np.sqrt((out**2).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(out_rms[0], 0.1, rtol=1e-5)
    np.testing.assert_array_equal(out[..., 1], w[..., 1])
    # Direction is kept: the big filter is only rescaled.
    np.testing.assert_allclose(out[..., 0], w[..., 0] * 0.1 / 0.5, rtol=1e-5)


def test_constraint_applied_after_each_update():
    config = load_config()
    model = model_lib.build_model(config.model)
    conv1 = model.get_layer("conv1")
    kernel = conv1.get_weights()[0]
    conv1.set_weights([kernel * 100.0, conv1.get_weights()[1]])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype("float32")
    model.train_on_batch(x, np.zeros((4, 10), "float32"))
    for name in model_lib.CONV_LAYERS:
        k = model.get_layer(name).get_weights()[0]
        assert np.sqrt((k**2).mean(axis=(0, 1, 2))).max() <= 0.1 + 1e-6, name


@pytest.mark.parametrize(
    "overrides",
    [
        dict(width=0.25, input_size=96, num_classes=10),
        dict(width=0.5, input_size=128, num_classes=7),
        dict(layer1="alexnet"),
    ],
)
def test_variants_keep_topology_and_names(overrides):
    model = model_lib.build_model(paper_model_config(**overrides))
    names = [layer.name for layer in model.layers]
    for name in PAPER_SHAPES:
        assert name in names
    conv1 = model.get_layer("conv1")
    assert conv1.kernel_size == ((11, 11) if overrides.get("layer1") == "alexnet" else (7, 7))
    assert conv1.strides == ((4, 4) if overrides.get("layer1") == "alexnet" else (2, 2))
    width = overrides.get("width", 1.0)
    assert model.get_layer("conv5").filters == round(256 * width)
    assert model.get_layer("logits").units == overrides.get("num_classes", 1000)


def test_alexnet_layer1_shapes():
    model = model_lib.build_model(paper_model_config(layer1="alexnet"))
    assert tuple(model.get_layer("conv1").output.shape[1:]) == (55, 55, 96)


def test_alexnet_layer1_at_cpu_scale_clips_pool5():
    # 64 px with 11x11/4 leaves conv5 1x1: pool5's window is clipped to the map.
    config = load_config()
    config.model.layer1 = "alexnet"
    model = model_lib.build_model(config.model)
    shapes = {n: tuple(model.get_layer(n).output.shape[1:3]) for n in ("conv1", "conv5", "pool5")}
    assert shapes == {"conv1": (15, 15), "conv5": (1, 1), "pool5": (1, 1)}
    assert model.get_layer("pool5").pool_size == (1, 1)
    # The default (zfnet) topology still pools 3x3 at 64 px.
    default = model_lib.build_model(load_config().model)
    assert default.get_layer("pool5").pool_size == (3, 3)


def test_unknown_layer1_is_an_error():
    with pytest.raises(ValueError, match="zfnet, alexnet"):
        model_lib.build_model(paper_model_config(layer1="vgg"))


def test_save_and_load_roundtrip(tmp_path):
    config = load_config()
    model = model_lib.build_model(config.model)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-5)
    assert isinstance(loaded.get_layer("conv1").kernel_constraint, model_lib.FilterRMS)


# --------------------------------------------------------------------------------------------
# Layer removal (paper Table 3 ablations: config.model.remove)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "remove",
    [("conv3", "conv4"), ("fc7",), ("fc6", "fc7"), ("conv3", "conv4", "fc6", "fc7")],
)
def test_removed_layers_are_absent_and_the_others_keep_names_and_shapes(remove):
    config = load_config().model
    full = model_lib.build_model(config)
    config.remove = remove
    model = model_lib.build_model(config)
    names = [layer.name for layer in model.layers]
    dropped = set(remove) | {f"drop{n[2]}" for n in remove if n.startswith("fc")}
    assert dropped.isdisjoint(names)
    kept = [layer.name for layer in full.layers if layer.name not in dropped]
    assert names == kept  # same order, no placeholders
    for name in kept:
        expected = tuple(full.get_layer(name).output.shape[1:])
        assert tuple(model.get_layer(name).output.shape[1:]) == expected, name


def test_removing_conv3_conv4_feeds_conv5_from_norm2():
    config = load_config().model  # 64 px, width 0.25: conv2 64 maps, conv4 96, conv5 64
    config.remove = ("conv3", "conv4")
    model = model_lib.build_model(config)
    conv5 = model.get_layer("conv5")
    assert conv5.input is model.get_layer("norm2").output
    assert conv5.kernel.shape == (3, 3, 64, 64)  # norm2's 64 maps in, not conv4's 96
    assert tuple(model.get_layer("pool5").output.shape[1:]) == (1, 1, 64)


def test_unknown_removed_layer_is_an_error():
    with pytest.raises(ValueError, match="'conv2'.*conv3, conv4, fc6, fc7"):
        model_lib.build_model(paper_model_config(remove=("conv2",)))


def test_config_without_remove_field_builds_the_full_model():
    # config.json of workdirs trained before `remove` existed has no such field.
    config = load_config().model.to_dict()
    del config["remove"]
    model = model_lib.build_model(ml_collections.ConfigDict(config))
    assert model.count_params() == model_lib.build_model(load_config().model).count_params()


def test_deconv_conv5_on_a_model_without_conv3_conv4():
    from zf_tf.core import deconv

    config = load_config().model
    config.width, config.remove = 0.125, ("conv3", "conv4")
    model = model_lib.build_model(config)
    images = (np.random.default_rng(3).normal(size=(2, 64, 64, 3)) * 50).astype("float32")
    chain = [layer.name for layer in deconv._chain(model, "conv5")]
    assert chain[-4:] == ["conv2", "pool2", "norm2", "conv5"]
    with pytest.raises(ValueError, match="valid layers: conv1, pool1, conv2, pool2, conv5, pool5$"):
        deconv.build_deconvnet(model, "conv3")
    index = np.array([0, 1], np.int32)
    maps = keras.Model(model.input, model.get_layer("conv5").output)(images).numpy()
    feature = maps.reshape(2, -1, maps.shape[-1]).max(1).argmax(1).astype("int32")  # live maps
    out = deconv.project(deconv.build_deconvnet(model, "conv5"), images, index, feature)
    expected = deconv.gradient_projection(model, "conv5", images, index, feature)
    assert out["projection"].shape == (2, 64, 64, 3)
    assert np.all(out["activation"] > 0)
    for m in range(2):
        scale = np.abs(expected[m]).max()
        assert scale > 0
        np.testing.assert_allclose(out["projection"][m], expected[m], rtol=0, atol=1e-4 * scale)
