"""Independent oracles for deconvnet projections, written from the paper's definition with
TensorFlow ops only (no zf_tf code): a GradientTape over a chain of layers with the
deconvnet ReLU, and an explicit hand-written way down through a tiny residual net."""

import keras
import numpy as np
import tensorflow as tf

from tests.tiny_models import randomize_batch_norm


@tf.custom_gradient
def deconv_relu(x):
    """ReLU forward; backward ReLU(upstream) (Zeiler & Fergus' rectification on the way down)."""
    return tf.nn.relu(x), lambda up: tf.nn.relu(up)


@tf.custom_gradient
def deconv_relu6(x):
    """ReLU6 forward; backward ReLU(upstream) (the deconvnet rule)."""
    return tf.nn.relu6(x), lambda up: tf.nn.relu(up)


def _pad(layer):
    (t, b), (l, r) = layer.padding
    return [[0, 0], [t, b], [l, r], [0, 0]]


def chain_forward(layer, t):
    """One Keras layer written out with TF ops; ReLUs use `deconv_relu`; contrast
    normalization and dropout are the identity on the way down."""
    name = type(layer).__name__
    if name == "Conv2D":
        z = tf.nn.conv2d(t, layer.kernel, layer.strides, layer.padding.upper())
        if layer.use_bias:
            z = z + layer.bias
        act = layer.activation.__name__
        return deconv_relu(z) if act == "relu" else z
    if name == "DepthwiseConv2D":
        z = tf.nn.depthwise_conv2d(t, layer.kernel, [1, *layer.strides, 1], layer.padding.upper())
        return z + layer.bias if layer.use_bias else z
    if name == "ReLU" and layer.max_value == 6:
        return deconv_relu6(t)
    if name == "ReLU" or (name == "Activation" and layer.activation.__name__ == "relu"):
        return deconv_relu(t)
    if name == "MaxPooling2D":
        return tf.nn.max_pool2d(t, layer.pool_size, layer.strides, layer.padding.upper())
    if name == "AveragePooling2D":
        return tf.nn.avg_pool2d(t, layer.pool_size, layer.strides, layer.padding.upper())
    if name == "GlobalAveragePooling2D":
        return tf.reduce_mean(t, axis=[1, 2], keepdims=True)
    if name == "BatchNormalization":
        gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
        return (t - mean) / np.sqrt(var + layer.epsilon) * gamma + beta
    if name == "Normalization":
        mean, var = np.asarray(layer.mean), np.asarray(layer.variance)
        return (t - mean) / np.maximum(np.sqrt(var), 1e-7)
    if name == "Rescaling":
        return t * layer.scale + layer.offset
    if name == "ZeroPadding2D":
        return tf.pad(t, _pad(layer))
    if name in ("Dropout", "InputLayer") or (name == "Activation"):
        return t
    if name == "LocalResponseNorm":
        lrn = tf.nn.local_response_normalization(
            t, layer.depth_radius, layer.bias, layer.alpha, layer.beta
        )
        return t + tf.stop_gradient(lrn - t)  # identity backward
    raise AssertionError(f"oracle has no rule for {name}")


def chain_projection(layers, images, feature, y, x):
    """a * d a / d image for unit (feature, y, x) (y, x < 0: the map's maximum) of the last
    layer of `layers`, on each image of `images` (one request per image)."""
    images = tf.constant(images, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        t = images
        for layer in layers:
            t = chain_forward(layer, t)
        acts = []
        for n in range(images.shape[0]):
            m = t[n, :, :, int(feature[n])]
            if y[n] < 0:
                flat = tf.reshape(m, [-1])
                acts.append(flat[int(tf.argmax(flat))])
            else:
                acts.append(m[int(y[n]), int(x[n])])
        acts = tf.stack(acts)
    return tape.gradient(acts, images, output_gradients=tf.stop_gradient(acts)).numpy()


# ---------------------------------------------------------------------------------------------
# A tiny residual net and its deconvnet written out by hand
# ---------------------------------------------------------------------------------------------


def tiny_residual_net(size=24, seed=0):
    """stem conv-BN-ReLU, max pool 3x3/2, then two residual blocks (identity shortcut; 1x1
    stride-2 projection shortcut), each conv-BN-ReLU-conv-BN + shortcut, Add, ReLU.
    BN statistics are randomized so that the scales matter."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    x = inp = keras.Input((size, size, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    x = L.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)

    def block(x, filters, stride, name):
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(x)
            shortcut = L.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
        y = L.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
        y = L.BatchNormalization(name=f"{name}_bn1")(y)
        y = L.Activation("relu", name=f"{name}_relu1")(y)
        y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
        y = L.BatchNormalization(name=f"{name}_bn2")(y)
        y = L.Add(name=f"{name}_add")([shortcut, y])
        return L.Activation("relu", name=f"{name}_out")(y)

    x = block(x, 8, 1, "block1")
    x = block(x, 12, 2, "block2")
    model = keras.Model(inp, x, name="tiny_resnet")
    return randomize_batch_norm(model, seed)


def _bn_scale(layer):
    gamma, _, _, var = (np.asarray(w) for w in layer.get_weights())
    return gamma / np.sqrt(var + layer.epsilon)


def _conv_down(layer, d, in_shape):
    return tf.nn.conv2d_transpose(
        d, layer.kernel, [d.shape[0], *in_shape], layer.strides, layer.padding.upper()
    )


def residual_projection(model, image, layer_name, feature):
    """The deconvnet projection of `layer_name`'s feature map maximum (one image), written
    out by hand for `tiny_residual_net`: unpool with switches, rectify, transposed filters,
    BN as its per-channel scale, and at every Add the signal goes down both branches and
    sums where they meet."""
    g = model.get_layer
    x = tf.constant(image[None], tf.float32)
    acts = {}
    names = ["stem_conv", "stem_bn", "stem_relu"]
    t = x
    for n in names:
        t = g(n)(t, training=False)
        acts[n] = t
    pooled, switches = tf.nn.max_pool_with_argmax(t, 3, 2, "SAME", include_batch_in_index=False)
    acts["stem_pool"] = pooled
    t = pooled
    for b in ("block1", "block2"):
        inp = t
        y = g(f"{b}_relu1")(g(f"{b}_bn1")(g(f"{b}_conv1")(inp), training=False))
        y = g(f"{b}_bn2")(g(f"{b}_conv2")(y), training=False)
        s = inp
        if b == "block2":
            s = g(f"{b}_proj_bn")(g(f"{b}_proj")(inp), training=False)
        t = tf.nn.relu(s + y)
        acts[f"{b}_in"], acts[f"{b}_out"] = inp, t
    top = acts[layer_name].numpy()[0]
    m = top[:, :, feature]
    yy, xx = np.unravel_index(np.argmax(m), m.shape)
    d = np.zeros_like(top)
    d[yy, xx, feature] = top[yy, xx, feature]
    d = tf.constant(d[None])

    def block_down(b, d):
        inp_shape = acts[f"{b}_in"].shape[1:]
        d = tf.nn.relu(d)  # block output ReLU
        # residual branch
        r = d * _bn_scale(g(f"{b}_bn2"))
        mid_shape = g(f"{b}_conv2").input.shape[1:]
        r = _conv_down(g(f"{b}_conv2"), r, mid_shape)
        r = tf.nn.relu(r)  # relu1
        r = r * _bn_scale(g(f"{b}_bn1"))
        r = _conv_down(g(f"{b}_conv1"), r, inp_shape)
        # shortcut branch
        s = d
        if b == "block2":
            s = _conv_down(g(f"{b}_proj"), s * _bn_scale(g(f"{b}_proj_bn")), inp_shape)
        return r + s

    blocks = {"block1_out": ["block1"], "block2_out": ["block2", "block1"]}[layer_name]
    for b in blocks:
        d = block_down(b, d)
    # unpool: every value back to its switch (overlapping windows add)
    h, w, c = acts["stem_relu"].shape[1:]
    flat = tf.math.unsorted_segment_sum(tf.reshape(d, [-1]), tf.reshape(switches, [-1]), h * w * c)
    d = tf.reshape(flat, [1, h, w, c])
    d = tf.nn.relu(d) * _bn_scale(g("stem_bn"))
    d = _conv_down(g("stem_conv"), d, x.shape[1:])
    return d.numpy()[0], (int(yy), int(xx))


# ---------------------------------------------------------------------------------------------
# Any functional model: the stated rule at every rectifier, by cloning (no zf_tf code)
# ---------------------------------------------------------------------------------------------

RECTIFYING = {"relu", "relu6", "gelu", "silu", "hard_silu", "leaky_relu", "elu"}


def _relu_of_signal(activation, x):
    """activation(x), back-propagating ReLU of the signal."""

    @tf.custom_gradient
    def f(t):
        return activation(t), lambda up: tf.nn.relu(up)

    return f(x)


class _Rectified(keras.layers.Layer):
    """A rectifier layer run as it is, its backward pass replaced by ReLU of the signal."""

    def __init__(self, inner, **kwargs):
        super().__init__(name=f"{inner.name}_rectified", **kwargs)
        self.inner = inner

    def call(self, x):
        return _relu_of_signal(self.inner, x)


class _FusedRectified(keras.layers.Layer):
    """A layer with a fused rectifier (Conv2D(..., activation="relu")): its linear part run
    as it is, then the rectifier back-propagating ReLU of the signal."""

    def __init__(self, inner, **kwargs):
        super().__init__(name=f"{inner.name}_fused_rectified", **kwargs)
        self.inner = inner

    def call(self, x):
        activation = self.inner.activation
        self.inner.activation = keras.activations.linear
        try:
            linear = self.inner(x)
        finally:
            self.inner.activation = activation
        return _relu_of_signal(activation, linear)


def rectifiers_ruled(model):
    """A clone of `model` sharing its weights whose ReLU layers and rectifier activations
    (RECTIFYING; separate Activation layers or fused into a conv/dense layer) back-propagate
    ReLU(signal); every other layer (and gate) its true gradient."""

    def clone(layer):
        name = getattr(getattr(layer, "activation", None), "__name__", "")
        if isinstance(layer, keras.layers.ReLU) or (
            isinstance(layer, keras.layers.Activation) and name in RECTIFYING
        ):
            return _Rectified(layer)
        if name in RECTIFYING:
            return _FusedRectified(layer)
        return layer

    return keras.models.clone_model(model, clone_function=clone)


def rule_projection(model, layer_name, images, feature):
    """For each image: the projection of `feature`'s strongest activation in `layer_name`
    (the activation times its gradient under the rules, as the deconvnet projects it)."""
    tap = rectifiers_ruled(keras.Model(model.inputs, model.get_layer(layer_name).output))
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        maps = tap(x)[..., feature]
        best = tf.reduce_max(tf.reshape(maps, [len(images), -1]), axis=1)
    grads = tape.gradient(best, x, output_gradients=tf.stop_gradient(best))
    return grads.numpy(), best.numpy()
