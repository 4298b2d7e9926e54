"""Deconvnet projections (zf_tf.deconv): layers, agreement with the gradient oracle, batching,
shared weights, argmax locations and receptive fields."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import load_config
from zf_tf.core import deconv, deconv_layers, graph, windowed
from zf_tf.core import model as model_lib

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def small_config(**overrides):
    config = load_config().model  # 64 px, width 0.25, He-normal
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def random_images(n, size, seed=0):
    return (np.random.default_rng(seed).normal(size=(n, size, size, 3)) * 50).astype(np.float32)


def layer_maps(model, name, images):
    return keras.Model(model.input, model.get_layer(name).output)(images).numpy()


def assert_close(actual, expected, rtol=1e-4):
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def small_model():
    return model_lib.build_model(small_config())


@pytest.fixture(scope="module")
def images():
    return random_images(3, 64)


@pytest.fixture(scope="module")
def deconvnets(small_model):
    """Deconvnets of the small model, built once per (layer, windowed)."""
    cache = {}

    def get(name, windowed=True):
        if (name, windowed) not in cache:
            cache[name, windowed] = deconv.build_deconvnet(small_model, name, windowed=windowed)
        return cache[name, windowed]

    return get


def live_requests(model, name, images, per_image=2, seed=0):
    """Requests at positive activations: the strongest maps at their max, and at a fixed
    location with a positive activation, for every image."""
    maps = layer_maps(model, name, images)
    rng = np.random.default_rng(seed)
    index, feature, ys, xs = [], [], [], []
    for i, m in enumerate(maps):
        strongest = np.argsort(m.reshape(-1, m.shape[-1]).max(0))[::-1]
        for f in strongest[:per_image]:  # at the maximum
            index.append(i), feature.append(f), ys.append(-1), xs.append(-1)
        live = np.argwhere(m > 0)
        y, x, f = live[rng.integers(len(live))]  # at a given location
        index.append(i), feature.append(f), ys.append(y), xs.append(x)
    return [np.asarray(v, np.int32) for v in (index, feature, ys, xs)]


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def pool_inputs(kind, shape, rng):
    if kind == "ties":  # many equal values in every window
        return rng.integers(0, 3, size=shape).astype(np.float32)
    if kind == "zeros":  # post-ReLU-like, with constant (all-zero) regions
        x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
        x[:, : shape[1] // 2] = 0
        return x
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("shape", [(3, 11, 12, 4), (2, 10, 9, 3)])
def test_switch_max_pool_matches_keras(padding, shape):
    rng = np.random.default_rng(1)
    pool = keras.layers.MaxPooling2D(3, 2, padding=padding)
    for kind in ("ties", "normal"):
        x = pool_inputs(kind, shape, rng)
        pooled, switches = deconv_layers.SwitchMaxPool(pool)(x)
        np.testing.assert_array_equal(pooled.numpy(), pool(x).numpy())
        assert switches.dtype == tf.int64
        # Switches point at an element holding the max, in the same channel.
        flat = x.reshape(shape[0], -1)
        picked = np.take_along_axis(flat, switches.numpy().reshape(shape[0], -1), axis=1)
        np.testing.assert_array_equal(picked.reshape(pooled.shape), pooled.numpy())
        channel = np.broadcast_to(np.arange(shape[3]), switches.shape)
        np.testing.assert_array_equal(switches.numpy() % shape[3], channel)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kind", ["ties", "zeros", "normal"])
def test_unpool_is_max_pool_gradient(padding, kind):
    rng = np.random.default_rng(2)
    shape = (3, 11, 12, 4)
    x = tf.constant(pool_inputs(kind, shape, rng))
    pool = keras.layers.MaxPooling2D(3, 2, padding=padding)
    pooled, switches = deconv_layers.SwitchMaxPool(pool)(x)
    values = tf.constant(rng.normal(size=pooled.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = pool(x)
    expected = tape.gradient(out, x, output_gradients=values).numpy()
    unpooled = deconv_layers.Unpool()(values, switches, output_shape=shape[1:]).numpy()
    np.testing.assert_allclose(unpooled, expected, rtol=0, atol=1e-6)
    # Overlapping windows really did choose the same inputs (the sums are exercised).
    per_image = [np.unique(s).size for s in switches.numpy().reshape(shape[0], -1)]
    assert min(per_image) < np.prod(pooled.shape[1:])
    # int32 switches give the same.
    same = deconv_layers.Unpool()(values, tf.cast(switches, tf.int32), output_shape=shape[1:])
    np.testing.assert_array_equal(same.numpy(), unpooled)


@pytest.mark.parametrize("padding,strides", [("valid", 2), ("same", 1)])
def test_transposed_filter_is_conv_gradient(padding, strides):
    rng = np.random.default_rng(3)
    conv = keras.layers.Conv2D(5, 3, strides=strides, padding=padding, activation="relu")
    x = tf.constant(rng.normal(size=(2, 9, 9, 4)).astype(np.float32))
    out_shape = conv(x).shape
    layer = deconv_layers.TransposedFilter(conv)
    assert layer.conv is conv
    g = tf.constant(rng.normal(size=out_shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = conv.convolution_op(x, conv.kernel)
    expected = tape.gradient(z, x, output_gradients=g).numpy()
    assert_close(layer(g, output_shape=(9, 9, 4)).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (5, 2), (7, 2), (1, 2), (3, 3)])
def test_matmul_transposed_conv(kernel, stride):
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(3, 4, 5, 6)).astype(np.float32))
    k = tf.constant(rng.normal(size=(kernel, kernel, 2, 6)).astype(np.float32))
    out = ((4 - 1) * stride + kernel, (5 - 1) * stride + kernel)
    expected = tf.nn.conv2d_transpose(x, k, [3, *out, 2], stride, "VALID").numpy()
    actual = windowed._transposed_conv_matmul(x, k, (stride, stride)).numpy()
    assert actual.shape == expected.shape
    assert_close(actual, expected, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Projections = gradients with the deconvnet rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize("name", LAYERS)
def test_projection_matches_gradient(small_model, images, deconvnets, name, windowed):
    index, feature, y, x = live_requests(small_model, name, images)
    out = deconv.project(deconvnets(name, windowed), images, index, feature, y, x)
    expected = deconv.gradient_projection(small_model, name, images, index, feature, y, x)
    assert out["projection"].shape == (len(index), 64, 64, 3)
    assert np.all(out["activation"] > 0)
    for m in range(len(index)):
        assert np.abs(out["projection"][m]).max() > 0
        assert_close(out["projection"][m], expected[m])
        y0, x0, y1, x1 = graph.receptive_field(small_model, name, out["y"][m], out["x"][m])
        outside = np.ones((64, 64), bool)
        outside[y0:y1, x0:x1] = False
        assert not np.any(out["projection"][m][outside])


def test_gradient_unit_seed_is_projection_over_activation(small_model, images, deconvnets):
    index, feature, y, x = live_requests(small_model, "conv3", images, per_image=1)
    out = deconv.project(deconvnets("conv3"), images, index, feature, y, x)
    unit = deconv.gradient_projection(
        small_model, "conv3", images, index, feature, y, x, scale_by_activation=False
    )
    assert_close(out["projection"], unit * out["activation"][:, None, None, None])


@pytest.fixture(scope="module")
def paper_model():
    return model_lib.build_model(load_config("zfnet_imagenet").model)


def check_paper_scale(paper_model, name, windowed=True):
    image = random_images(1, 224, seed=5)
    maps = layer_maps(paper_model, name, image)[0]
    strongest = np.argsort(maps.reshape(-1, maps.shape[-1]).max(0))[::-1]
    feature = np.asarray(strongest[:2], np.int32)  # at their maxima
    index = np.zeros(2, np.int32)
    net = deconv.build_deconvnet(paper_model, name, windowed=windowed)
    out = deconv.project(net, image, index, feature)
    expected = deconv.gradient_projection(paper_model, name, image, index, feature)
    assert out["projection"].shape == (2, 224, 224, 3)
    for m in range(2):
        assert out["activation"][m] > 0
        assert np.abs(out["projection"][m]).max() > 0
        assert_close(out["projection"][m], expected[m])
        y0, x0, y1, x1 = graph.receptive_field(paper_model, name, out["y"][m], out["x"][m])
        inside = np.zeros((224, 224), bool)
        inside[y0:y1, x0:x1] = True
        assert not np.any(out["projection"][m][~inside])


@pytest.mark.parametrize("name", ["conv1", "conv5"])
def test_paper_scale_matches_gradient(paper_model, name):
    check_paper_scale(paper_model, name)


@pytest.mark.parametrize(
    "name,windowed",
    [("conv2", True), ("conv3", True), ("conv4", True), ("conv5", False), ("conv2", False)],
)
def test_paper_scale_other_layers_and_dense(paper_model, name, windowed):
    check_paper_scale(paper_model, name, windowed)


# --------------------------------------------------------------------------------------------
# Shape, argmax locations, batching, shared weights, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_negative_location_picks_argmax(small_model, images, deconvnets, name):
    maps = layer_maps(small_model, name, images)
    channels = maps.shape[-1]
    index = np.repeat(np.arange(3), 4).astype(np.int32)
    feature = np.tile([0, 1, channels // 2, channels - 1], 3).astype(np.int32)
    y = np.tile([-1, -1, -1, 0], 3).astype(np.int32)  # y or x negative -> max
    x = np.tile([-1, 0, -5, -1], 3).astype(np.int32)
    out = deconv.project(deconvnets(name), images, index, feature, y, x)
    for m, (i, f) in enumerate(zip(index, feature)):
        fmap = maps[i, :, :, f]
        ey, ex = np.unravel_index(np.argmax(fmap), fmap.shape)
        assert (out["y"][m], out["x"][m]) == (ey, ex)
        assert out["activation"][m] == pytest.approx(fmap.max(), rel=1e-5, abs=1e-6)
    # None means the maximum too.
    default = deconv.project(deconvnets(name), images, index, feature)
    np.testing.assert_array_equal(default["y"], out["y"])
    np.testing.assert_array_equal(default["x"], out["x"])


def test_ties_and_dead_maps(small_model, deconvnets):
    """All-zero images: every map is constant (zero), argmax ties go to (0, 0), projections
    are zero."""
    zeros = np.zeros((2, 64, 64, 3), np.float32)
    out = deconv.project(deconvnets("conv2"), zeros, [0, 1, 1], [0, 3, 5])
    np.testing.assert_array_equal(out["y"], 0)
    np.testing.assert_array_equal(out["x"], 0)
    np.testing.assert_array_equal(out["activation"], 0)
    np.testing.assert_array_equal(out["projection"], 0)


@pytest.mark.parametrize("name", ["conv2", "conv5"])
def test_batched_equals_one_by_one(small_model, images, deconvnets, name):
    index, feature, y, x = live_requests(small_model, name, images, per_image=2)
    net = deconvnets(name)
    batched = deconv.project(net, images, index, feature, y, x)
    chunked = deconv.project(net, images, index, feature, y, x, batch_size=4)
    for m in range(len(index)):
        one = deconv.project(net, images[index[m] : index[m] + 1], 0, feature[m], y[m], x[m])
        assert (one["y"][0], one["x"][0]) == (batched["y"][m], batched["x"][m])
        # The forward pass over 1 or 3 images may differ in the last bit (oneDNN).
        np.testing.assert_allclose(one["activation"][0], batched["activation"][m], rtol=1e-5)
        assert_close(one["projection"][0], batched["projection"][m], rtol=1e-5)
    for key in batched:
        np.testing.assert_allclose(chunked[key], batched[key], rtol=0, atol=1e-5)


def test_shared_weights():
    model = model_lib.build_model(small_config(seed=7))
    image = random_images(1, 64, seed=8)
    net = deconv.build_deconvnet(model, "conv2")
    before = deconv.project(net, image, [0, 0], [0, 1])
    conv1 = model.get_layer("conv1")
    kernel, bias = conv1.get_weights()
    conv1.set_weights([np.ascontiguousarray(kernel[::-1, ::-1]) * 1.5, bias])
    after = deconv.project(net, image, [0, 0], [0, 1])
    fresh = deconv.project(deconv.build_deconvnet(model, "conv2"), image, [0, 0], [0, 1])
    assert np.abs(after["projection"] - before["projection"]).max() > 1e-3
    for key in after:
        np.testing.assert_allclose(after[key], fresh[key], rtol=0, atol=1e-6)
    assert any(w is conv1.kernel for w in net.weights)


@pytest.mark.parametrize("bad", ["norm2", "fc6", "logits", "conv6"])
def test_unknown_layer(small_model, bad):
    valid = "valid layers: conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5$"
    for call in (
        lambda: deconv.build_deconvnet(small_model, bad),
        lambda: deconv.gradient_projection(small_model, bad, np.zeros((1, 64, 64, 3)), 0, 0),
    ):
        with pytest.raises(ValueError, match=valid):
            call()
    if bad == "conv6":  # receptive fields exist for every layer of the model
        with pytest.raises(ValueError, match="unknown layer 'conv6'"):
            graph.receptive_field_size(small_model, bad)


def test_bad_requests(images, deconvnets):
    net = deconvnets("conv5")
    with pytest.raises(ValueError, match="image_index"):
        deconv.project(net, images, [3], [0])
    with pytest.raises(ValueError, match="feature"):
        deconv.project(net, images, [0], [1000])
    with pytest.raises(ValueError, match="map size"):
        deconv.project(net, images, [0], [0], 0, 99)
    empty = deconv.project(net, images, [], [])
    assert empty["projection"].shape == (0, 64, 64, 3)


# --------------------------------------------------------------------------------------------
# Receptive fields
# --------------------------------------------------------------------------------------------


def test_receptive_field_known_cases(paper_model):
    rf = graph.receptive_field
    # conv1: 7x7 stride 2 after 1 pixel of zero padding.
    assert rf(paper_model, "conv1", 0, 0) == (0, 0, 6, 6)  # rows [-1, 6) clipped
    assert rf(paper_model, "conv1", 5, 5) == (9, 9, 16, 16)
    assert rf(paper_model, "conv1", 109, 3) == (217, 5, 224, 12)  # rows [217, 224)
    sizes = {name: graph.receptive_field_size(paper_model, name) for name in LAYERS}
    assert sizes == {"conv1": 7, "conv2": 27, "conv3": 75, "conv4": 107, "conv5": 139}
    # conv2 unit (0, 0): pool1 rows [0, 4]; conv1 rows [0, 10] ('same' pool1 pads 0 before,
    # 1 after); padded input rows [0, 26]; input rows [-1, 26) -> [0, 26).
    assert rf(paper_model, "conv2", 0, 0) == (0, 0, 26, 26)
    # conv5 (6, 6): conv3..5 'same' pad 1 each -> norm2 rows [3, 9]; pool2 [6, 20]; conv2
    # [12, 44]; pool1 [24, 90]; conv1 [48, 186]; input [47, 186).
    assert rf(paper_model, "conv5", 6, 6) == (47, 47, 186, 186)
    with pytest.raises(ValueError, match="outside"):
        rf(paper_model, "conv5", 13, 0)


@pytest.mark.parametrize("size", [64, 224])
def test_geometry_matches_layer_shapes(size):
    config = small_config(input_size=size)
    model = model_lib.build_model(config)
    for name in LAYERS:
        hw = (size, size)
        for layer in deconv._chain(model, name):
            _, hw = graph.window_geometry(layer, hw)
        assert hw == tuple(model.get_layer(name).output.shape[1:3]), name


def linear_unit_gradient(model, name, y, x, rng):
    """|d unit / d input| of a linear, all-positive version of the layers below `name`:
    |kernels|, no ReLU, average pools of the same geometry, LRN as identity."""
    chain = deconv._chain(model, name)
    image = tf.constant(rng.normal(size=(1, *model.inputs[0].shape[1:])).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(image)
        t = image
        for layer in chain:
            if isinstance(layer, keras.layers.Conv2D):
                t = tf.nn.conv2d(t, tf.abs(layer.kernel), layer.strides, layer.padding.upper())
            elif isinstance(layer, keras.layers.MaxPooling2D):
                t = tf.nn.avg_pool2d(t, layer.pool_size, layer.strides, layer.padding.upper())
            elif isinstance(layer, model_lib.LocalResponseNorm):
                pass
            else:
                t = layer(t)
        unit = t[0, y, x, 0]
    return np.abs(tape.gradient(unit, image).numpy()[0]).sum(-1)


@pytest.mark.parametrize("name", LAYERS)
def test_receptive_field_matches_gradient_support(small_model, name):
    rng = np.random.default_rng(9)
    h, w = small_model.get_layer(name).output.shape[1:3]
    for y, x in [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (0, w - 1)]:
        support = linear_unit_gradient(small_model, name, y, x, rng) > 0
        y0, x0, y1, x1 = graph.receptive_field(small_model, name, y, x)
        expected = np.zeros_like(support)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(support, expected, err_msg=f"{name} ({y}, {x})")


def test_receptive_field_matches_gradient_support_paper(paper_model):
    rng = np.random.default_rng(10)
    for y, x in [(0, 0), (6, 6), (12, 3)]:
        support = linear_unit_gradient(paper_model, "conv5", y, x, rng) > 0
        y0, x0, y1, x1 = graph.receptive_field(paper_model, "conv5", y, x)
        assert support[y0:y1, x0:x1].all() and support.sum() == (y1 - y0) * (x1 - x0)


def test_a_dropped_deconvnet_is_freed_with_its_compiled_function():
    """`project` caches one traced function per deconvnet, weakly keyed by it: dropping the
    deconvnet frees both (a strong reference from the function kept every one alive)."""
    import gc
    import weakref

    config = load_config().model
    config.width = 0.125
    net = deconv.build_deconvnet(model_lib.build_model(config), "conv2")
    out = deconv.project(net, np.zeros((2, 64, 64, 3), np.float32), [0, 1], 0)
    assert out["projection"].shape == (2, 64, 64, 3)
    assert net in deconv._COMPILED
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None  # and its entry of _COMPILED with it (a weak key)


def test_receptive_fields_follow_dense_paths_back_into_the_maps():
    """A squeeze-and-excitation block (global pool -> dense -> reshape -> multiply): every
    unit after the gate depends on the whole image, and its gradient says so (non-zero
    outside the local window); below the gate the field is local, and the gradient is zero
    outside it."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    x = inp = keras.Input((32, 32, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    gate = L.Dense(4, activation="sigmoid", name="excite")(L.GlobalAveragePooling2D()(x))
    x = L.Multiply(name="scale")([x, L.Reshape((1, 1, 4))(gate)])
    x = L.Conv2D(4, 3, padding="same", name="c2")(x)
    model = keras.Model(inp, x)
    images = tf.constant(np.random.default_rng(0).uniform(0, 1, (1, 32, 32, 3)), tf.float32)

    def gradient(layer, y, x):
        tap = graph.tap(model, [layer])
        with tf.GradientTape() as tape:
            tape.watch(images)
            unit = tap(images)[0, y, x, 0]
        return np.abs(tape.gradient(unit, images).numpy()[0]).sum(-1)

    local = (15, 15, 18, 18)  # c1's 3x3 window around (16, 16)
    for layer, field in (("c1", local), ("scale", (0, 0, 32, 32)), ("c2", (0, 0, 32, 32))):
        assert graph.receptive_field(model, layer, 16, 16) == field, layer
        g = gradient(layer, 16, 16)

        def outside(box, g=g):
            y0, x0, y1, x1 = box
            rest = g.copy()
            rest[y0:y1, x0:x1] = 0
            return rest.max()

        assert outside(field) == 0, layer  # nothing outside the claimed field
        assert (outside(local) > 0) == (layer != "c1"), layer  # the gate reaches everywhere
    assert graph.receptive_field_size(model, "c2") >= 32  # unclipped: padding included
