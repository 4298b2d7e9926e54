"""The explicit deconvnet's layers, and its way down on full maps.

The layers that take a projection down through one model layer each (Zeiler & Fergus 2014,
Sec. 2.1): `SwitchMaxPool` (a max pool that records its switches), `Unpool` (values back to
their switches), `TransposedFilter` (a conv's kernel, transposed), and the pieces without
switches: an average pool transposed, a global pool spread out, batch normalization's
per-channel scale. `down_kind` says what each model layer does on the way down (`SUPPORTED`,
else NotImplementedError naming it); `dense_backward` chains these layers on full
(M, H, W, C) maps. The windowed way down is in `windowed`; the model built from both,
`deconv.build_deconvnet`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core.model import LocalResponseNorm

__all__ = [
    "SwitchMaxPool",
    "Unpool",
    "TransposedFilter",
    "SUPPORTED",
    "down_kind",
    "dense_backward",
]

INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------
# Public layers
# ---------------------------------------------------------------------------------------------


class SwitchMaxPool(keras.layers.Layer):
    """A 2-D max pool that also returns its switches (the argmax of every window).

    Built from a `keras.layers.MaxPooling2D` (channels_last), whose pool size, strides and
    padding it copies. `call(x)` returns `(pooled, switches)`: pooled equals the Keras layer's
    output; switches (int64, same shape) hold the flat index, within each image, of the input
    element each window's maximum came from: (y * W + x) * C + c. Ties go to the first element
    in row-major order, as in TF's max-pool gradient.
    """

    def __init__(self, pool: keras.layers.MaxPooling2D, **kwargs):
        kwargs.setdefault("name", f"{pool.name}_switches")
        super().__init__(**kwargs)
        if getattr(pool, "data_format", "channels_last") != "channels_last":
            raise NotImplementedError("SwitchMaxPool supports channels_last pools only")
        self.pool_size = tuple(int(k) for k in pool.pool_size)
        self.strides = tuple(int(s) for s in pool.strides)
        self.padding = str(pool.padding).upper()

    def call(self, x):
        # Grappler rewrites MaxPool(Relu(x)) as Relu(MaxPool(x)) and, for the argmax pool,
        # wires the switches' consumers to the wrong output (TF 2.21: a warning, the rewrite
        # discarded); an opaque no-op in between keeps it from matching.
        x = tf.raw_ops.Snapshot(input=x)
        pooled, switches = tf.nn.max_pool_with_argmax(
            x,
            ksize=[1, *self.pool_size, 1],
            strides=[1, *self.strides, 1],
            padding=self.padding,
            include_batch_in_index=False,
        )
        return pooled, switches


class Unpool(keras.layers.Layer):
    """Inverse of a max pool given its switches: puts every value back where its max came from.

    `call(values, switches, output_shape)`: values and switches are (B, h, w, C) (switches as
    returned by `SwitchMaxPool`, flat per-image indices, int32 or int64); `output_shape` is the
    static (H, W, C) of the pooling layer's input. Returns (B, H, W, C), zero except at switch
    locations; values of overlapping windows that chose the same input element are added (which
    makes unpooling exactly max pooling's gradient). One batched scatter (segment sum).
    """

    def call(self, values, switches, output_shape):
        h, w, c = (int(d) for d in output_shape)
        flat = batched_scatter_add(values, switches, h * w * c)
        return tf.reshape(flat, [-1, h, w, c])


class TransposedFilter(keras.layers.Layer):
    """The 'filter' step of a deconvnet: a transposed convolution with a conv layer's kernel.

    Holds a reference to the forward `keras.layers.Conv2D` and reads its kernel variable at
    call time, so weight updates to the classifier (`set_weights`, training) change the
    projections. `call(x, output_shape)`: x is (B, h, w, filters); `output_shape` is the static
    (H, W, C_in) of the conv layer's input. Uses the conv's strides and padding; no bias.
    """

    def __init__(self, conv: keras.layers.Conv2D, **kwargs):
        kwargs.setdefault("name", f"{conv.name}_filter")
        super().__init__(**kwargs)
        check_conv(conv)
        self.conv = conv

    def call(self, x, output_shape):
        h, w, c = (int(d) for d in output_shape)
        conv = self.conv
        return tf.nn.conv2d_transpose(
            x,
            tf.cast(conv.kernel, x.dtype),
            output_shape=tf.stack([tf.shape(x)[0], h, w, c]),
            strides=[1, *conv.strides, 1],
            padding=conv.padding.upper(),
        )


def batched_scatter_add(values, index, per_item):
    """Flat (B * per_item,) sums of `values` (B, ...) at per-item flat positions `index`.

    Index arithmetic runs in int32 when B * per_item allows (about 2.5x faster on CPU than
    int64), else in int64.
    """
    batch = tf.shape(values)[0]
    flat_values = tf.reshape(values, [-1])
    rank = index.shape.rank

    def scatter(dtype):
        b = tf.cast(batch, dtype)
        offsets = tf.reshape(tf.range(b, dtype=dtype) * per_item, [-1] + [1] * (rank - 1))
        ids = tf.reshape(tf.cast(index, dtype) + offsets, [-1])
        return tf.math.unsorted_segment_sum(flat_values, ids, b * per_item)

    if per_item >= INT32_LIMIT:
        return scatter(tf.int64)
    fits = tf.cast(batch, tf.int64) * per_item < INT32_LIMIT
    return tf.cond(fits, lambda: scatter(tf.int32), lambda: scatter(tf.int64))


# ---------------------------------------------------------------------------------------------
# Layers with no switches on the way down: average pools, per-channel scales
# ---------------------------------------------------------------------------------------------


class _AvgUnpool(keras.layers.Layer):
    """An average pool transposed: every value spread evenly over its window (divided by the
    number of non-padding inputs, as TF's pool counts them); overlapping windows add."""

    def __init__(self, pool, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(int(k) for k in pool.pool_size)
        self.strides = tuple(int(s) for s in pool.strides)
        self.padding = str(pool.padding).upper()
        self.in_shape = tuple(int(d) for d in in_shape)

    def call(self, x):
        return tf.raw_ops.AvgPoolGrad(
            orig_input_shape=tf.stack([tf.shape(x)[0], *self.in_shape]),
            grad=x,
            ksize=[1, *self.pool_size, 1],
            strides=[1, *self.strides, 1],
            padding=self.padding,
        )


class _GlobalUnpool(keras.layers.Layer):
    """GlobalAveragePooling2D transposed: (M, 1, 1, C) spread evenly over (M, H, W, C)."""

    def __init__(self, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.in_shape = tuple(int(d) for d in in_shape)

    def call(self, x):
        h, w, c = self.in_shape
        x = tf.reshape(x, [-1, 1, 1, c]) / float(h * w)
        return tf.broadcast_to(x, tf.stack([tf.shape(x)[0], h, w, c]))


def _channel_scale(layer):
    """The per-channel factor of BatchNormalization (inference) or Normalization: its
    derivative, which the way down multiplies by (the shift does not matter)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        scale = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + layer.epsilon)
        if layer.gamma is not None:
            scale = scale * tf.convert_to_tensor(layer.gamma)
        return scale
    variance = tf.convert_to_tensor(layer.variance)
    return 1.0 / tf.maximum(tf.sqrt(variance), keras.backend.epsilon())


class _ChannelScale(keras.layers.Layer):
    """BatchNormalization / Normalization on the way down: times its per-channel scale
    (read at call time, so weight changes show)."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.source = layer

    def call(self, x):
        return x * tf.cast(_channel_scale(self.source), x.dtype)


# ---------------------------------------------------------------------------------------------
# What each layer of the model does on the way down
# ---------------------------------------------------------------------------------------------

_IDENTITY_DOWN = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.InputLayer,
    LocalResponseNorm,  # contrast normalization is not inverted (paper Sec. 2.1)
)
SUPPORTED = (
    "Conv2D (ReLU or linear)",
    "ReLU",
    "Activation('relu')",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "BatchNormalization",
    "Normalization",
    "ZeroPadding2D",
    "Rescaling",
    "LocalResponseNorm",
    "Dropout",
)


def check_conv(conv):
    """Raises unless `conv` is a channels_last, undilated, ungrouped Conv2D with 'valid' or
    'same' padding (TypeError: not a Conv2D; NotImplementedError: naming what is not)."""
    if not isinstance(conv, keras.layers.Conv2D):
        raise TypeError(f"expected a keras.layers.Conv2D; got {type(conv).__name__}")
    if conv.data_format != "channels_last":
        raise NotImplementedError(f"{conv.name}: only channels_last convolutions are supported")
    if tuple(conv.dilation_rate) != (1, 1) or getattr(conv, "groups", 1) != 1:
        raise NotImplementedError(f"{conv.name}: dilated or grouped convolutions not supported")
    if str(conv.padding).lower() not in ("valid", "same"):
        raise NotImplementedError(f"{conv.name}: padding {conv.padding!r} not supported")


def has_relu(conv) -> bool:
    """Whether a conv's (or dense layer's) fused activation is ReLU (True) or linear."""
    name = getattr(conv.activation, "__name__", "")
    if name == "relu":
        return True
    if name == "linear":
        return False
    raise NotImplementedError(f"{conv.name}: activation {name!r} not supported (relu or linear)")


def _unsupported(layer, why: str = ""):
    return NotImplementedError(
        f"layer {layer.name!r} ({type(layer).__name__}{why}) has no deconvnet inverse; "
        f"supported: {', '.join(SUPPORTED)}"
    )


def down_kind(layer) -> str:
    """What a layer does on the way down: conv, relu, maxpool, avgpool, gap, scale, crop,
    rescale or identity.

    Raises:
      NotImplementedError: the layer has no deconvnet inverse (naming its type).
    """
    if isinstance(layer, keras.layers.Conv2D):
        check_conv(layer)
        has_relu(layer)
        return "conv"
    if isinstance(layer, keras.layers.ReLU):
        if layer.max_value is not None or layer.negative_slope or layer.threshold:
            raise _unsupported(layer, " with max_value, negative_slope or threshold")
        return "relu"
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", "")
        if name in ("relu", "linear"):
            return "relu" if name == "relu" else "identity"
        raise _unsupported(layer, f" {name!r}")
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    if isinstance(layer, keras.layers.MaxPooling2D) and channels_last:
        return "maxpool"
    if isinstance(layer, keras.layers.AveragePooling2D) and channels_last:
        return "avgpool"
    if isinstance(layer, keras.layers.GlobalAveragePooling2D) and channels_last:
        return "gap"
    if isinstance(layer, keras.layers.BatchNormalization):
        if tuple(np.atleast_1d(layer.axis)) not in ((-1,), (3,)):
            raise _unsupported(layer, f" on axis {layer.axis}")
        return "scale"
    if isinstance(layer, keras.layers.Normalization):
        if layer.invert:
            raise _unsupported(layer, " with invert=True")
        return "scale"
    if isinstance(layer, keras.layers.ZeroPadding2D) and channels_last:
        return "crop"
    if isinstance(layer, keras.layers.Rescaling):
        return "rescale"
    if isinstance(layer, _IDENTITY_DOWN):
        return "identity"
    raise _unsupported(layer)


# ---------------------------------------------------------------------------------------------
# The way down on full maps
# ---------------------------------------------------------------------------------------------


def pointwise_down(kind, layer, d):
    """The way down through a layer that acts per position (window or full maps alike)."""
    name = layer.name
    if kind == "relu":
        return keras.layers.ReLU(name=f"{name}_rectify")(d)
    if kind == "scale":
        return _ChannelScale(layer, name=f"{name}_scale")(d)
    if kind == "rescale":
        return keras.layers.Rescaling(layer.scale, name=f"{name}_down")(d)
    return d  # identity: dropout, noise, contrast normalization


def dense_backward(steps, top_map, pair_switches):
    """The way down on full maps; pair_switches(step index, switches) gives per-pair ones.

    steps: (layer, input shape, output shape, switches or None) of each layer, bottom first,
    as `deconv._forward` records them; top_map: (M, h, w, C) maps at the top of the steps.
    """
    d = top_map
    for i in reversed(range(len(steps))):
        layer, in_shape, _, switches = steps[i]
        name, kind = layer.name, down_kind(layer)
        if kind == "maxpool":
            d = Unpool(name=f"{name}_unpool")(d, pair_switches(i, switches), output_shape=in_shape)
        elif kind == "avgpool":
            d = _AvgUnpool(layer, in_shape, name=f"{name}_unpool")(d)
        elif kind == "gap":
            d = _GlobalUnpool(in_shape, name=f"{name}_unpool")(d)
        elif kind == "conv":
            if has_relu(layer):
                d = keras.layers.ReLU(name=f"{name}_rectify")(d)
            d = TransposedFilter(layer, name=f"{name}_filter")(d, output_shape=in_shape)
        elif kind == "crop":
            d = keras.layers.Cropping2D(layer.padding, name=f"{name}_crop")(d)
        else:
            d = pointwise_down(kind, layer, d)
    return d
