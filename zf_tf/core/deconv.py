"""Deconvnet projections (Zeiler & Fergus 2014, Sec. 2.1) for ZFNet and any Keras convnet.

To see what excites one activation of a layer, the image is run forward once while every
max pool records where each window's maximum came from (its *switches*). All other activations
of that layer are set to zero and the map is taken down to pixel space, layer by layer:

    conv layer (fused ReLU)  -> rectify (ReLU), then filter (transposed conv, same kernel,
                                stride and padding as forward; bias ignored)
    ReLU / Activation('relu') -> rectify
    max pool                 -> unpool: every value goes back to its switch; where
                                overlapping windows chose the same input, the values add
    average / global pool    -> transposed: each value spread evenly over its window
    batch normalization      -> times its per-channel scale gamma / sqrt(var + eps)
                                (Normalization: 1 / std)
    contrast normalization,  -> identity (not inverted)
    dropout
    zero padding             -> crop
    rescaling by c           -> multiply by c

`build_deconvnet` builds this as one Keras functional model (the *explicit* form) that reuses
the classifier's own layer objects (so later weight changes show up in projections), runs the
forward pass once per image and then M projections at once from gathered switches. `project`
runs it in chunks. Any chain of those layers works, named anything (Sequential nets, VGG,
nested models: see `graph`).

By default the way down only computes each projection inside its unit's receptive field
(`windowed=True`): a (M, S, S, C) window per layer, S growing from 1 at the top, positioned
per request, and switched to full maps once the window covers half of a layer. Nothing outside
the receptive field can be non-zero, so the result is the same as the full computation
(`windowed=False`), for about 4.7x fewer FLOPs at conv5 / 224 px.

The same numbers are a gradient: the projection of activation a equals a * d a / d input when
every ReLU's backward is ReLU of the incoming gradient (the "deconvnet rule", not guided
backprop), max pools back-propagate normally and LRN back-propagates as the identity. This
*rule form* (`rule_tap`: the model's layers, shared weights, each ReLU-bearing layer wrapped)
works on any DAG (ResNet `Add`, Inception `Concatenate`, MobileNet depthwise convs);
`build_deconvnet` uses it where the layers below are not a chain, and `gradient_projection`
computes it directly. `rule_forward` generalizes it to any layer (dense layers and logits
included) and other backward rules (guided backpropagation, the plain gradient), for the
attribution methods.

`receptive_field` / `receptive_field_size` give the input patch a unit can see (`graph`).

Requests are (image, feature map, y, x); a negative y or x means "at the maximum of that
feature map on that image" (the first maximum in row-major order, as numpy's argmax).
"""

from __future__ import annotations

import math
import weakref

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core import activations, graph
from zf_tf.core.model import LocalResponseNorm

__all__ = [
    "SwitchMaxPool",
    "Unpool",
    "TransposedFilter",
    "build_deconvnet",
    "project",
    "gradient_projection",
    "rule_forward",
    "way_down",
    "BACKWARD_RULES",
    "receptive_field",
    "receptive_field_size",
]

_INT32_LIMIT = 2**31


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
        flat = _batched_scatter_add(values, switches, h * w * c)
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
        _check_conv(conv)
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


def _batched_scatter_add(values, index, per_item):
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

    if per_item >= _INT32_LIMIT:
        return scatter(tf.int64)
    fits = tf.cast(batch, tf.int64) * per_item < _INT32_LIMIT
    return tf.cond(fits, lambda: scatter(tf.int32), lambda: scatter(tf.int64))


# ---------------------------------------------------------------------------------------------
# Selection of the requested activations
# ---------------------------------------------------------------------------------------------


def _select(fmap, image_index, feature, y, x):
    """(activation, y, x) of each request; negative y or x -> location of the map's max."""
    w = int(fmap.shape[2])
    maps = tf.gather_nd(tf.transpose(fmap, [0, 3, 1, 2]), tf.stack([image_index, feature], 1))
    flat = tf.reshape(maps, [tf.shape(maps)[0], -1])  # (M, h * w)
    arg = tf.argmax(flat, axis=1, output_type=tf.int32)
    use_max = tf.logical_or(y < 0, x < 0)
    yy = tf.where(use_max, arg // w, y)
    xx = tf.where(use_max, arg % w, x)
    act = tf.gather(flat, yy * w + xx, axis=1, batch_dims=1)
    return act, yy, xx


class _SelectUnits(keras.layers.Layer):
    """Picks one activation per request: (activation, y, x), each (M,).

    Inputs: fmap (N, h, w, C) of the N images; image_index, feature, y, x (M,) int32. A
    negative y or x selects the feature map's maximum (first in row-major order).
    """

    def __init__(self, map_shape, **kwargs):
        super().__init__(**kwargs)
        self.map_shape = tuple(int(d) for d in map_shape)

    def call(self, fmap, image_index, feature, y, x):
        return _select(
            fmap,
            tf.cast(image_index, tf.int32),
            tf.cast(feature, tf.int32),
            tf.cast(y, tf.int32),
            tf.cast(x, tf.int32),
        )


class _SelectedMap(keras.layers.Layer):
    """The layer's maps for each request: zero except `activation` at (y, x, feature)."""

    def __init__(self, map_shape, **kwargs):
        super().__init__(**kwargs)
        self.map_shape = tuple(int(d) for d in map_shape)

    def call(self, activation, feature, y, x):
        m = tf.shape(activation)[0]
        where = tf.stack([tf.range(m), y, x, tf.cast(feature, tf.int32)], axis=1)
        return tf.scatter_nd(where, activation, tf.concat([[m], self.map_shape], 0))


# ---------------------------------------------------------------------------------------------
# Windowed way down: per-request windows (M, Sy, Sx, C) at offsets (oy, ox) of each layer
# ---------------------------------------------------------------------------------------------


def _mask_window(window, oy, ox, size):
    """Zeroes the window's positions outside [0, size) of its layer (padding positions)."""
    sy, sx = int(window.shape[1]), int(window.shape[2])
    rows = oy[:, None] + tf.range(sy)[None]
    cols = ox[:, None] + tf.range(sx)[None]
    vy = tf.cast((rows >= 0) & (rows < size[0]), window.dtype)
    vx = tf.cast((cols >= 0) & (cols < size[1]), window.dtype)
    return window * vy[:, :, None, None] * vx[:, None, :, None]


class _WindowTop(keras.layers.Layer):
    """The selected activation as a 1x1 window at (y, x): (M, 1, 1, C), oy, ox."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)

    def call(self, activation, feature, y, x):
        onehot = tf.one_hot(feature, self.channels, dtype=activation.dtype)
        window = (onehot * activation[:, None])[:, None, None, :]
        return window, y, x


class _WindowFilter(keras.layers.Layer):
    """TransposedFilter on a window: full ('VALID') transposed conv, offsets moved down.

    A window of S positions at offset o maps to (S - 1) * stride + kernel positions at offset
    o * stride - pad_before; positions that fall in the forward pass's padding are zeroed.
    Small windows (the top layers) use a matmul and an overlap-add, several times faster on
    CPU than `conv2d_transpose` at those sizes.
    """

    def __init__(self, conv, geometry, in_shape, matmul_max_positions=49, **kwargs):
        kwargs.setdefault("name", f"{conv.name}_filter")
        super().__init__(**kwargs)
        _check_conv(conv)
        self.conv = conv
        self.geometry = tuple(tuple(int(v) for v in axis) for axis in geometry)
        self.in_shape = tuple(int(d) for d in in_shape)
        self.matmul_max_positions = int(matmul_max_positions)

    def call(self, window, oy, ox):
        (ky, sy, py), (kx, sx, px) = self.geometry
        win_h, win_w = int(window.shape[1]), int(window.shape[2])
        kernel = tf.cast(self.conv.kernel, window.dtype)
        if win_h * win_w <= self.matmul_max_positions:
            down = _transposed_conv_matmul(window, kernel, (sy, sx))
        else:
            out_h, out_w = (win_h - 1) * sy + ky, (win_w - 1) * sx + kx
            down = tf.nn.conv2d_transpose(
                window,
                kernel,
                output_shape=tf.stack([tf.shape(window)[0], out_h, out_w, self.in_shape[2]]),
                strides=[1, sy, sx, 1],
                padding="VALID",
            )
        oy, ox = oy * sy - py, ox * sx - px
        return _mask_window(down, oy, ox, self.in_shape), oy, ox


def _transposed_conv_matmul(x, kernel, strides):
    """conv2d_transpose(x, kernel, 'VALID') as one matmul plus an overlap-add.

    x (B, h, w, C_out), kernel (k_y, k_x, C_in, C_out) -> (B, (h-1)*s_y + k_y, (w-1)*s_x + k_x,
    C_in). Kernel tap (a, b) of input (i, j) lands on output (i*s_y + a, j*s_x + b); taps are
    summed per stride phase (a mod s_y, b mod s_x) on a grid of shifts, then the phases are
    interleaved.
    """
    h, w, c_out = (int(d) for d in x.shape[1:])
    ky, kx, c_in, _ = (int(d) for d in kernel.shape)
    sy, sx = strides
    cols = tf.matmul(tf.reshape(x, [-1, c_out]), tf.reshape(kernel, [-1, c_out]), transpose_b=True)
    cols = tf.reshape(cols, [-1, h, w, ky, kx, c_in])
    th, tw = h - 1 + -(-ky // sy), w - 1 + -(-kx // sx)  # phase grid size
    zeros = None
    rows = []
    for pa in range(sy):
        phase_row = []
        for pb in range(sx):
            terms = [
                tf.pad(
                    cols[:, :, :, a, b, :],
                    [[0, 0], [a // sy, th - h - a // sy], [b // sx, tw - w - b // sx], [0, 0]],
                )
                for a in range(pa, ky, sy)
                for b in range(pb, kx, sx)
            ]
            if not terms:  # kernel smaller than the stride: this phase gets nothing
                if zeros is None:
                    zeros = tf.zeros(tf.stack([tf.shape(x)[0], th, tw, c_in]), x.dtype)
                terms = [zeros]
            phase_row.append(tf.add_n(terms))
        rows.append(tf.stack(phase_row, axis=3))  # (B, th, tw, sx, C_in)
    full = tf.reshape(tf.stack(rows, axis=2), [-1, th * sy, tw * sx, c_in])
    return full[:, : (h - 1) * sy + ky, : (w - 1) * sx + kx]


class _WindowUnpool(keras.layers.Layer):
    """Unpool on a window, with the switches of each request's image gathered for it.

    A window of S pooled positions at offset o maps to (S - 1) * stride + pool positions at
    offset o * stride - pad_before (every switch of the window lies inside).
    """

    def __init__(self, geometry, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.geometry = tuple(tuple(int(v) for v in axis) for axis in geometry)
        self.in_shape = tuple(int(d) for d in in_shape)

    def call(self, window, switches, image_index, oy, ox):
        (ky, sy, py), (kx, sx, px) = self.geometry
        _, in_w, c = self.in_shape
        win_h, win_w = int(window.shape[1]), int(window.shape[2])
        pooled_h, pooled_w = int(switches.shape[1]), int(switches.shape[2])
        out_h, out_w = (win_h - 1) * sy + ky, (win_w - 1) * sx + kx
        per_item = out_h * out_w * c
        # Per image (cheap: N images, not M requests): the switch's flat index in a window of
        # this size placed at the origin; a request's window just subtracts its offset.
        pixel = switches // c
        at_origin = ((pixel // in_w) * out_w + pixel % in_w) * c + switches % c
        m = tf.shape(window)[0]
        # Switches of every window position (clamped where the window leaves the map: the
        # window is zero there, so those values add nothing).
        rows = tf.clip_by_value(oy[:, None] + tf.range(win_h)[None], 0, pooled_h - 1)
        cols = tf.clip_by_value(ox[:, None] + tf.range(win_w)[None], 0, pooled_w - 1)
        where = tf.stack(
            [
                tf.broadcast_to(image_index[:, None, None], [m, win_h, win_w]),
                tf.broadcast_to(rows[:, :, None], [m, win_h, win_w]),
                tf.broadcast_to(cols[:, None, :], [m, win_h, win_w]),
            ],
            axis=-1,
        )
        oy, ox = oy * sy - py, ox * sx - px
        shift = tf.cast((oy * out_w + ox) * c, at_origin.dtype)
        local = tf.gather_nd(at_origin, where) - shift[:, None, None, None]
        local = tf.clip_by_value(local, 0, per_item - 1)
        flat = _batched_scatter_add(window, local, per_item)
        return tf.reshape(flat, [-1, out_h, out_w, c]), oy, ox


class _WindowCrop(keras.layers.Layer):
    """ZeroPadding2D's inverse on a window: offsets move by the padding; pads zeroed."""

    def __init__(self, top, left, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.top, self.left = int(top), int(left)
        self.in_shape = tuple(int(d) for d in in_shape)

    def call(self, window, oy, ox):
        oy, ox = oy - self.top, ox - self.left
        return _mask_window(window, oy, ox, self.in_shape), oy, ox


class _PlaceWindow(keras.layers.Layer):
    """Writes each request's window into full (M, H, W, C) maps (zero outside the window)."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = tuple(int(d) for d in size[:2])

    def call(self, window, oy, ox):
        win_h, win_w = int(window.shape[1]), int(window.shape[2])
        ly = tf.range(self.size[0])[None] - oy[:, None]  # (M, H)
        lx = tf.range(self.size[1])[None] - ox[:, None]  # (M, W)
        vy = tf.cast((ly >= 0) & (ly < win_h), window.dtype)
        vx = tf.cast((lx >= 0) & (lx < win_w), window.dtype)
        t = tf.gather(window, tf.clip_by_value(ly, 0, win_h - 1), axis=1, batch_dims=1)
        t = tf.gather(t, tf.clip_by_value(lx, 0, win_w - 1), axis=2, batch_dims=1)
        return t * vy[:, :, None, None] * vx[:, None, :, None]


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


def _pool_counts(geometry, in_size, out_size) -> np.ndarray:
    """(h, w) number of non-padding inputs under each window of an average pool."""
    counts = []
    for (k, s, p), n, out in zip(geometry, in_size, out_size):
        start = np.arange(out) * s - p
        counts.append(np.minimum(start + k, n) - np.maximum(start, 0))
    return np.outer(counts[0], counts[1]).astype(np.float32)


class _WindowAvgUnpool(keras.layers.Layer):
    """_AvgUnpool on a window: divide by each position's count, spread with a depthwise
    transposed 'VALID' conv of ones, move the offsets down, zero the padding positions."""

    def __init__(self, geometry, in_shape, out_shape, **kwargs):
        super().__init__(**kwargs)
        self.geometry = tuple(tuple(int(v) for v in axis) for axis in geometry)
        self.in_shape = tuple(int(d) for d in in_shape)
        self.counts = _pool_counts(self.geometry, self.in_shape[:2], out_shape[:2])

    def call(self, window, oy, ox):
        (ky, sy, py), (kx, sx, px) = self.geometry
        win_h, win_w = int(window.shape[1]), int(window.shape[2])
        h_out, w_out = self.counts.shape
        rows = tf.clip_by_value(oy[:, None] + tf.range(win_h)[None], 0, h_out - 1)
        cols = tf.clip_by_value(ox[:, None] + tf.range(win_w)[None], 0, w_out - 1)
        counts = tf.gather(
            tf.gather(tf.constant(self.counts, window.dtype), rows), cols, axis=2, batch_dims=1
        )
        c = self.in_shape[2]
        out_h, out_w = (win_h - 1) * sy + ky, (win_w - 1) * sx + kx
        down = tf.nn.depthwise_conv2d_backprop_input(
            input_sizes=tf.stack([tf.shape(window)[0], out_h, out_w, c]),
            filter=tf.ones([ky, kx, c, 1], window.dtype),
            out_backprop=window / counts[..., None],
            strides=[1, sy, sx, 1],
            padding="VALID",
        )
        oy, ox = oy * sy - py, ox * sx - px
        return _mask_window(down, oy, ox, self.in_shape), oy, ox


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
# The model's layers below a chosen layer (explicit form)
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


def _check_conv(conv):
    if not isinstance(conv, keras.layers.Conv2D):
        raise TypeError(f"expected a keras.layers.Conv2D; got {type(conv).__name__}")
    if conv.data_format != "channels_last":
        raise NotImplementedError(f"{conv.name}: only channels_last convolutions are supported")
    if tuple(conv.dilation_rate) != (1, 1) or getattr(conv, "groups", 1) != 1:
        raise NotImplementedError(f"{conv.name}: dilated or grouped convolutions not supported")
    if str(conv.padding).lower() not in ("valid", "same"):
        raise NotImplementedError(f"{conv.name}: padding {conv.padding!r} not supported")


def _has_relu(conv) -> bool:
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


def _down_kind(layer) -> str:
    """What a layer does on the way down: conv, relu, maxpool, avgpool, gap, scale, crop,
    rescale or identity.

    Raises:
      NotImplementedError: the layer has no deconvnet inverse (naming its type).
    """
    if isinstance(layer, keras.layers.Conv2D):
        _check_conv(layer)
        _has_relu(layer)
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


def valid_layers(model: keras.Model) -> list[str]:
    """The layers a unit can be projected from: conv, pool and activation layers."""
    return graph.spatial_layers(model)


def _check_layer(model, layer_name):
    valid = valid_layers(model)
    if layer_name not in valid:
        raise ValueError(f"unknown layer {layer_name!r}; valid layers: {', '.join(valid)}")


def _chain(model: keras.Model, layer_name: str):
    """The model's layers from its input up to and including `layer_name`, each with an
    explicit deconvnet inverse; None when they are not a chain (a DAG: residual or
    concatenating blocks below the layer).

    Raises:
      ValueError: `layer_name` is not a conv, pool or activation layer of the model.
      NotImplementedError: a layer of the chain has no deconvnet inverse.
    """
    _check_layer(model, layer_name)
    chain = graph.chain(model, layer_name)
    if chain is not None:
        for layer in chain:
            _down_kind(layer)
    return chain


def _forward(chain, images):
    """Symbolic forward pass with switches: (top tensor, steps).

    Each step is (layer, input shape, output shape, switches or None); switches are per image
    (N, h, w, C), cast to int32 when an image's pool input has fewer than 2**31 elements. A
    global pool's (N, C) output becomes (N, 1, 1, C) maps.
    """
    t = images
    steps = []
    for layer in chain:
        in_shape = tuple(int(d) for d in t.shape[1:])
        switches = None
        if isinstance(layer, keras.layers.MaxPooling2D):
            t, switches = SwitchMaxPool(layer)(t)
            if math.prod(in_shape) < _INT32_LIMIT:
                switches = keras.ops.cast(switches, "int32")
        else:
            t = layer(t)
            if len(t.shape) == 2:  # global pool
                t = keras.layers.Reshape((1, 1, int(t.shape[-1])), name=f"{layer.name}_maps")(t)
        steps.append((layer, in_shape, tuple(int(d) for d in t.shape[1:]), switches))
    return t, steps


def _pointwise_down(kind, layer, d):
    """The way down through a layer that acts per position (window or full maps alike)."""
    name = layer.name
    if kind == "relu":
        return keras.layers.ReLU(name=f"{name}_rectify")(d)
    if kind == "scale":
        return _ChannelScale(layer, name=f"{name}_scale")(d)
    if kind == "rescale":
        return keras.layers.Rescaling(layer.scale, name=f"{name}_down")(d)
    return d  # identity: dropout, noise, contrast normalization


def _dense_backward(steps, top_map, pair_switches):
    """The way down on full maps; pair_switches(step index, switches) gives per-pair ones."""
    d = top_map
    for i in reversed(range(len(steps))):
        layer, in_shape, _, switches = steps[i]
        name, kind = layer.name, _down_kind(layer)
        if kind == "maxpool":
            d = Unpool(name=f"{name}_unpool")(d, pair_switches(i, switches), output_shape=in_shape)
        elif kind == "avgpool":
            d = _AvgUnpool(layer, in_shape, name=f"{name}_unpool")(d)
        elif kind == "gap":
            d = _GlobalUnpool(in_shape, name=f"{name}_unpool")(d)
        elif kind == "conv":
            if _has_relu(layer):
                d = keras.layers.ReLU(name=f"{name}_rectify")(d)
            d = TransposedFilter(layer, name=f"{name}_filter")(d, output_shape=in_shape)
        elif kind == "crop":
            d = keras.layers.Cropping2D(layer.padding, name=f"{name}_crop")(d)
        else:
            d = _pointwise_down(kind, layer, d)
    return d


def _windowed_backward(steps, activation, feature, y, x, image_index, dense_fraction=0.5):
    """The way down on per-request windows, switching to full maps once a window covers
    `dense_fraction` of its layer's area. Returns the (M, H, W, C) projections."""
    top_shape = steps[-1][2]
    window, oy, ox = _WindowTop(top_shape[2], name="window_top")(activation, feature, y, x)
    win = (1, 1)
    for i in reversed(range(len(steps))):
        layer, in_shape, out_shape, switches = steps[i]
        if win[0] * win[1] >= dense_fraction * out_shape[0] * out_shape[1]:
            d = _PlaceWindow(out_shape, name=f"{layer.name}_place")(window, oy, ox)
            return _dense_backward(
                steps[: i + 1],
                d,
                lambda _, sw: keras.ops.take(sw, image_index, axis=0),
            )
        geometry, _ = graph.window_geometry(layer, in_shape[:2])
        name, kind = layer.name, _down_kind(layer)
        if kind == "maxpool":
            window, oy, ox = _WindowUnpool(geometry, in_shape, name=f"{name}_unpool")(
                window, switches, image_index, oy, ox
            )
        elif kind == "avgpool":
            window, oy, ox = _WindowAvgUnpool(geometry, in_shape, out_shape, name=f"{name}_unpool")(
                window, oy, ox
            )
        elif kind == "conv":
            if _has_relu(layer):
                window = keras.layers.ReLU(name=f"{name}_rectify")(window)
            window, oy, ox = _WindowFilter(layer, geometry, in_shape)(window, oy, ox)
        elif kind == "crop":
            (top, _), (left, _) = layer.padding
            window, oy, ox = _WindowCrop(top, left, in_shape, name=f"{name}_crop")(window, oy, ox)
        else:  # a global pool's 1x1 maps always take the dense branch above
            window = _pointwise_down(kind, layer, window)
        if geometry is not None:
            win = tuple((w - 1) * s + k for w, (k, s, _) in zip(win, geometry))
    return _PlaceWindow(steps[0][1], name="place")(window, oy, ox)


# ---------------------------------------------------------------------------------------------
# Backward rules (activations.TABLE), on a clone sharing the model's weights
# ---------------------------------------------------------------------------------------------


def _identity_backward(layer, x):
    """layer(x) forward, identity backward (contrast normalization is not inverted)."""

    @tf.custom_gradient
    def f(t):
        return layer(t), lambda upstream: upstream

    return f(x)


# Backward rule name -> whether contrast normalization back-propagates as the identity (the
# deconvnet does not invert it, so its rule skips it; guided backprop and the plain gradient
# differentiate through it). What each rule does at each activation: `activations`.
# rule -> whether contrast normalization passes down as the identity
_RULES = {"deconvnet": True, "guided": False, "gradient": False, "redirected": False}
BACKWARD_RULES = tuple(_RULES)


_PRE_ACTIVATION_TYPES = (
    keras.layers.Dense,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


def _pre_activation(layer, x):
    """A conv or dense layer's output before its fused activation (its own weights)."""
    dtype = x.dtype
    if isinstance(layer, keras.layers.Dense):
        z = tf.matmul(x, tf.cast(layer.kernel, dtype))
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        z = keras.ops.depthwise_conv(
            x,
            tf.cast(layer.kernel, dtype),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
    elif isinstance(layer, keras.layers.SeparableConv2D):
        z = keras.ops.separable_conv(
            x,
            tf.cast(layer.depthwise_kernel, dtype),
            tf.cast(layer.pointwise_kernel, dtype),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
    elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        z = layer.convolution_op(x, tf.cast(layer.kernel, dtype))
    else:
        raise NotImplementedError(
            f"layer {layer.name!r} ({type(layer).__name__}) has a fused activation that the "
            "backward rules cannot reach; use a separate activation layer"
        )
    if getattr(layer, "use_bias", False):
        z = z + tf.cast(layer.bias, dtype)
    return z


class _RuleCall(keras.layers.Layer):
    """One layer of the user's model run with its ReLU's backward pass replaced by a rule
    (forward values unchanged; the layer's own weights)."""

    def __init__(self, layer, rule, **kwargs):
        super().__init__(**kwargs)
        self.source = layer
        self.rule = rule

    def call(self, x):
        layer = self.source
        if isinstance(layer, LocalResponseNorm):
            return _identity_backward(layer, x) if _RULES[self.rule] else layer(x)
        name, fused = activations.activation_of(layer)
        if fused:  # the layer's own weights, then its activation under the rule
            return activations.apply(layer.activation, _pre_activation(layer, x), name, self.rule)
        return activations.apply(layer, x, name, self.rule)


def _rule_call(rule):
    """A `graph.trace` call hook running the layers whose activation the rule changes
    (`activations.TABLE`: the rectifier-shaped ones), and contrast normalization, under
    `rule`."""

    def call(layer, *args, **kwargs):
        found = activations.activation_of(layer)
        needs = found is not None and activations.treatment(found[0]) == activations.RECTIFY
        needs = needs or (isinstance(layer, LocalResponseNorm) and _RULES[rule])
        if rule == "gradient" or not needs:
            return layer(*args, **kwargs)
        return _RuleCall(layer, rule, name=f"{layer.name}_{rule}")(args[0])

    return call


def way_down(model: keras.Model, layer_name: str, rule: str = "deconvnet") -> list[dict]:
    """The record of a projection: every activation on the paths from the input to
    `layer_name` (inclusive), in forward order, with what `rule` does at it (one entry of
    `activations.TABLE`): [{'layer', 'activation', 'rule'}]. The same for both forms (the
    explicit deconvnet only takes ReLUs, which it rectifies)."""
    ops = graph.ops_of(model)
    producer = {id(op.output): op for op in ops}
    below, stack = set(), [graph.find(model, layer_name)]
    while stack:
        op = stack.pop()
        if id(op) not in below:
            below.add(id(op))
            stack += [producer[id(t)] for t in op.inputs if id(t) in producer]
    records = []
    for op in ops:
        found = activations.activation_of(op.layer) if id(op) in below else None
        if found is not None and activations.treatment(found[0]) != activations.IDENTITY:
            name = found[0]
            records.append(
                {"layer": op.name, "activation": name, "rule": activations.describe(name, rule)}
            )
    return records


def way_down_counts(records: list[dict]) -> list[tuple[str, int, str]]:
    """(activation, on how many layers, what the rule does there) of `way_down` records, in
    order of first appearance."""
    seen: dict[str, list] = {}
    for r in records:
        seen.setdefault(r["activation"], [0, r["rule"]])[0] += 1
    return [(a, n, what) for a, (n, what) in seen.items()]


def way_down_line(records: list[dict], rule: str = "deconvnet") -> str:
    """One line for `way_down` records ('Way down (deconvnet rule): relu on 5 layers: ReLU
    of the signal (the paper's rule)')."""
    parts = [f"{a} on {n} layer{'s' * (n != 1)}: {w}" for a, n, w in way_down_counts(records)]
    return f"Way down ({rule} rule): {'; '.join(parts) or 'no activation'}"


_RULE_TAPS = weakref.WeakKeyDictionary()


def rule_tap(
    model: keras.Model, layer_name: str, rule: str = "deconvnet", before_rectifier: bool = False
) -> keras.Model:
    """A Model from the images to `layer_name`'s output whose gradient follows `rule`.

    Built on the model's own layers (shared weights; a "clone" whose ReLU-bearing layers
    are wrapped), through nested models and DAGs (residual `Add`, `Concatenate`, depthwise
    convs). Dropout and batch normalization run at inference. Cached per model.

    With `before_rectifier`, a layer that ends in a rectifier (`rectified`) gives its value
    before it: a conv's or dense layer's pre-activation, an activation layer's input.

    Raises:
      ValueError: unknown layer or rule.
    """
    if rule not in _RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(BACKWARD_RULES)}")
    per_model = _RULE_TAPS.setdefault(model, {})
    before = before_rectifier and rectified(model, layer_name)
    key = (layer_name, rule, before)
    if key not in per_model:
        call = _rule_call(rule)
        if before:
            target, ruled = graph.find(model, layer_name).layer, call

            def call(layer, *args, **kwargs):
                if layer is target:
                    return _BeforeRectifier(layer, name=f"{layer.name}_before_rectifier")(args[0])
                return ruled(layer, *args, **kwargs)

        per_model[key] = graph.tap(model, [layer_name], call, name=f"{rule}_tap")
    return per_model[key]


def rectified(model: keras.Model, layer_name: str) -> bool:
    """Whether the layer's output is a rectifier's (a fused ReLU-like activation, or a ReLU
    layer): its values stop at the rectifier's floor."""
    found = activations.activation_of(graph.find(model, layer_name).layer)
    return found is not None and activations.treatment(found[0]) == activations.RECTIFY


class _BeforeRectifier(keras.layers.Layer):
    """A layer's value before its rectifier: a conv's or dense layer's pre-activation (its
    own weights), an activation layer's input."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.source = layer

    def call(self, x):
        _, fused = activations.activation_of(self.source)
        return _pre_activation(self.source, x) if fused else tf.identity(x)


def rule_forward(model: keras.Model, images, layer_name: str = "logits", rule: str = "deconvnet"):
    """The output of `layer_name`, computed so that its gradient follows a backward rule.

    Runs the model's own layers (shared weights) from the input up to `layer_name` (any
    layer: conv, pool, fc6, fc7, logits, ...) at inference (dropout off). Forward values equal
    the model's; only the backward pass changes, so d output / d images under a
    `tf.GradientTape` is:
      'deconvnet': every ReLU back-propagates ReLU(upstream), contrast normalization as the
        identity, max pools normally (the deconvnet of `build_deconvnet`, Zeiler & Fergus),
        batch normalization as its per-channel scale;
      'guided': every ReLU back-propagates upstream * (forward input > 0) * (upstream > 0)
        (guided backpropagation), everything else its true gradient;
      'gradient': the true gradient.

    Args:
      model: the classifier (any Sequential or functional Keras convnet).
      images: (N, H, W, 3) float tensor (watched by the caller's tape).
      layer_name: the last layer to run.
      rule: one of BACKWARD_RULES.

    Returns:
      The layer's output tensor, e.g. (N, num_classes) logits.

    Raises:
      ValueError: unknown layer or rule.
    """
    return rule_tap(model, layer_name, rule)(images, training=False)


class _RuleProjection(keras.layers.Layer):
    """Deconvnet projections in the rule form: a_m * d a_m / d image under the deconvnet
    rule, each request on its own copy of its image (for DAG models)."""

    def __init__(self, tap, map_shape, **kwargs):
        super().__init__(**kwargs)
        self.tap = tap
        self.map_shape = tuple(int(d) for d in map_shape)

    def call(self, images, image_index, feature, y, x):
        per_request = tf.gather(images, image_index)
        with tf.GradientTape() as tape:
            tape.watch(per_request)
            fmap = tf.reshape(self.tap(per_request, training=False), [-1, *self.map_shape])
            index = tf.range(tf.shape(per_request)[0])
            act, yy, xx = _select(fmap, index, feature, y, x)
        grads = tape.gradient(act, per_request, output_gradients=tf.stop_gradient(act))
        return grads, act, yy, xx


def _map_shape(model, layer_name) -> tuple:
    """(h, w, C) of a layer's maps; a global pool's (C,) as (1, 1, C)."""
    shape = tuple(int(d) for d in graph.find(model, layer_name).output.shape[1:])
    return shape if len(shape) == 3 else (1, 1, shape[-1])


# ---------------------------------------------------------------------------------------------
# Deconvnet model
# ---------------------------------------------------------------------------------------------

FORMS = ("auto", "explicit", "rule")


def projection_form(model: keras.Model, layer_name: str) -> tuple[str, str]:
    """('explicit' or 'rule', why): the explicit Model when the layers below `layer_name`
    form a chain of invertible layers, else the backward-rule form. Cheap (no model is
    built): what `build_deconvnet` will refuse is refused here.

    Raises:
      ValueError: `layer_name` is not a conv, pool or activation layer.
      NotImplementedError: the rule form is needed and a layer's fused ReLU is out of its
        reach (a layer type `_pre_activation` does not know).
    """
    _check_layer(model, layer_name)
    chain = graph.chain(model, layer_name)
    why = "the layers below it are not a chain (residual or concatenating blocks)"
    if chain is not None:
        try:
            for layer in chain:
                _down_kind(layer)
            return "explicit", ""
        except NotImplementedError as e:
            why = str(e).split(";")[0]
    for op in graph.ops_of(model):  # the rule form's clone wraps every rectifier it rules
        found = activations.activation_of(op.layer)
        ruled = found is not None and activations.treatment(found[0]) == activations.RECTIFY
        if ruled and found[1] and not isinstance(op.layer, _PRE_ACTIVATION_TYPES):
            raise NotImplementedError(
                f"layer {op.name!r} ({type(op.layer).__name__}) has a fused {found[0]} that "
                "the backward rules cannot reach; use a separate activation layer"
            )
    return "rule", why


def build_deconvnet(
    model: keras.Model, layer_name: str, *, windowed: bool = True, form: str = "auto"
) -> keras.Model:
    """A Keras model projecting single activations of layer `layer_name` to pixel space.

    form='explicit' (the default wherever possible): reuses the model's layer objects for the
    forward part, with a `SwitchMaxPool` in place of each max pool, then goes down with
    Unpool / ReLU / TransposedFilter / average-unpool / scale / crop layers. form='rule': one
    forward pass per request through a clone of the model whose ReLUs back-propagate the
    deconvnet rule, and its gradient (any DAG). 'auto': explicit when the layers below form
    a chain of layers with an inverse (`SUPPORTED`), else rule. Both give the same numbers
    where both exist.

    Inputs (dict): `images` float32 (N, H, W, 3), what the model takes; `image_index`
    int32 (M,) which image each of the M requests is about; `feature` int32 (M,); `y`, `x`
    int32 (M,) the location in the layer's maps, negative = the feature map's maximum.
    Outputs (dict): `projection` float32 (M, H, W, 3); `activation` float32 (M,) the selected
    activation; `y`, `x` int32 (M,) the location used. The forward pass runs once per image
    (explicit) or once per request (rule).

    Args:
      model: the classifier (ZFNet or any Sequential / functional Keras convnet with a
        static input size; see `graph.fixed_input`).
      layer_name: a conv, pool or activation layer (`valid_layers`).
      windowed: explicit form only: compute the way down only inside each unit's receptive
        field (same result, fewer FLOPs; see the module doc). False: on full maps.
      form: 'auto', 'explicit' or 'rule'.

    Raises:
      ValueError: `layer_name` is not a valid layer, or a bad `form`.
      NotImplementedError: form='explicit' and a layer below has no inverse, or a DAG.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
    chosen, why = projection_form(model, layer_name)
    if form == "explicit" and chosen == "rule":
        if graph.chain(model, layer_name) is not None:
            _chain(model, layer_name)  # raises, naming the layer without an inverse
        raise NotImplementedError(f"{layer_name}: {why}; use the rule form")
    if form == "rule":
        chosen = "rule"
    inputs = {
        "images": keras.Input(graph.static_shape(model), dtype="float32", name="images"),
        "image_index": keras.Input((), dtype="int32", name="image_index"),
        "feature": keras.Input((), dtype="int32", name="feature"),
        "y": keras.Input((), dtype="int32", name="y"),
        "x": keras.Input((), dtype="int32", name="x"),
    }
    image_index, feature = inputs["image_index"], inputs["feature"]
    if chosen == "rule":
        projector = _RuleProjection(
            rule_tap(model, layer_name, "deconvnet"),
            _map_shape(model, layer_name),
            name=f"{layer_name}_rule",
        )
        d, activation, y, x = projector(
            inputs["images"], image_index, feature, inputs["y"], inputs["x"]
        )
    else:
        top, steps = _forward(_chain(model, layer_name), inputs["images"])
        activation, y, x = _SelectUnits(top.shape[1:], name=f"{layer_name}_select")(
            top, image_index, feature, inputs["y"], inputs["x"]
        )
        if windowed:
            d = _windowed_backward(steps, activation, feature, y, x, image_index)
        else:
            selected = _SelectedMap(steps[-1][2], name=f"{layer_name}_selected")(
                activation, feature, y, x
            )
            d = _dense_backward(
                steps, selected, lambda _, sw: keras.ops.take(sw, image_index, axis=0)
            )
    outputs = {
        "projection": keras.ops.cast(d, "float32"),
        "activation": keras.ops.cast(activation, "float32"),
        "y": y,
        "x": x,
    }
    return keras.Model(inputs, outputs, name=f"deconvnet_{layer_name}")


_COMPILED = weakref.WeakKeyDictionary()


def _compiled(deconvnet: keras.Model):
    """One traced tf.function per deconvnet (every batch dimension dynamic)."""
    fn = _COMPILED.get(deconvnet)
    if fn is None:
        image_shape = tuple(deconvnet.get_layer("images").output.shape[1:])
        vec = tf.TensorSpec([None], tf.int32)
        signature = {
            "images": tf.TensorSpec([None, *image_shape], tf.float32),
            "image_index": vec,
            "feature": vec,
            "y": vec,
            "x": vec,
        }

        # A weak reference: the function is the value of its deconvnet's weak key, and a
        # strong one would keep both (and every variable the trace captured) alive forever.
        model = weakref.ref(deconvnet)

        @tf.function(input_signature=[signature])
        def fn(inputs):
            return model()(inputs, training=False)

        _COMPILED[deconvnet] = fn
    return fn


def _requests(images, image_index, feature, y, x, map_shape):
    """Validated numpy arrays (images float32, and four int32 (M,) vectors).

    map_shape: (h, w, C) of the layer's maps.
    """
    h, w, num_features = map_shape
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C); got shape {images.shape}")
    image_index = np.atleast_1d(np.asarray(image_index)).astype(np.int32)
    m = image_index.shape[0]
    feature = np.broadcast_to(np.asarray(feature, np.int32), (m,))
    y = np.broadcast_to(np.asarray(-1 if y is None else y, np.int32), (m,))
    x = np.broadcast_to(np.asarray(-1 if x is None else x, np.int32), (m,))
    if m and (image_index.min() < 0 or image_index.max() >= images.shape[0]):
        raise ValueError(f"image_index must lie in [0, {images.shape[0]})")
    if m and (feature.min() < 0 or feature.max() >= num_features):
        raise ValueError(f"feature must lie in [0, {num_features})")
    if m and (y.max() >= h or x.max() >= w):
        raise ValueError(f"y and x must be < the layer's map size {h}x{w} (negative: maximum)")
    return images, image_index, feature, y, x


def _chunks(image_index, batch_size):
    """Per chunk of requests: (slice, images it needs, image_index remapped into those)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    for start in range(0, image_index.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        needed, remapped = np.unique(image_index[sl], return_inverse=True)
        yield sl, needed, remapped.astype(np.int32).reshape(-1)


def project(
    deconvnet: keras.Model, images, image_index, feature, y=None, x=None, batch_size: int = 64
) -> dict:
    """Runs `deconvnet` (from `build_deconvnet`) for M (image, feature, y, x) requests.

    Args:
      deconvnet: the model from `build_deconvnet`.
      images: (N, H, W, 3) float array, classifier inputs.
      image_index: (M,) ints in [0, N).
      feature: (M,) feature map indices (or a scalar for all).
      y, x: (M,) locations in the layer's maps (or scalars); None or negative = the maximum.
      batch_size: requests per call; each call forwards only the images its requests need.

    Returns:
      A dict of numpy arrays: `projection` (M, H, W, 3) float32, `activation` (M,) float32,
      `y`, `x` (M,) int32.
    """
    map_shape = next(
        layer.map_shape
        for layer in deconvnet.layers
        if isinstance(layer, (_SelectUnits, _RuleProjection))
    )
    images, image_index, feature, y, x = _requests(images, image_index, feature, y, x, map_shape)
    fn = _compiled(deconvnet)
    parts = []
    for sl, needed, remapped in _chunks(image_index, batch_size):
        out = fn(
            {
                "images": tf.constant(images[needed]),
                "image_index": tf.constant(remapped),
                "feature": tf.constant(feature[sl]),
                "y": tf.constant(y[sl]),
                "x": tf.constant(x[sl]),
            }
        )
        parts.append({k: v.numpy() for k, v in out.items()})
    if not parts:
        return {
            "projection": np.zeros((0, *images.shape[1:]), np.float32),
            "activation": np.zeros((0,), np.float32),
            "y": np.zeros((0,), np.int32),
            "x": np.zeros((0,), np.int32),
        }
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# Gradient formulation
# ---------------------------------------------------------------------------------------------

_GRADIENT_FNS = weakref.WeakKeyDictionary()


def _gradient_fn(model, layer_name):
    per_model = _GRADIENT_FNS.setdefault(model, {})
    fn = per_model.get(layer_name)
    if fn is None:
        tap = rule_tap(model, layer_name, "deconvnet")
        map_shape = _map_shape(model, layer_name)
        vec = tf.TensorSpec([None], tf.int32)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, *graph.static_shape(model)], tf.float32),
                vec,
                vec,
                vec,
                vec,
            ]
        )
        def fn(images, feature, y, x, seed_with_activation):
            with tf.GradientTape() as tape:
                tape.watch(images)
                fmap = tf.reshape(tap(images, training=False), [-1, *map_shape])
                index = tf.range(tf.shape(images)[0])
                act, _, _ = _select(fmap, index, feature, y, x)
            seed = tf.where(seed_with_activation > 0, tf.stop_gradient(act), tf.ones_like(act))
            grads = tape.gradient(act, images, output_gradients=seed)
            return tf.cast(grads, tf.float32)

        per_model[layer_name] = fn
    return fn


def gradient_projection(
    model: keras.Model,
    layer_name: str,
    images,
    image_index,
    feature,
    y=None,
    x=None,
    *,
    scale_by_activation: bool = True,
    batch_size: int = 64,
) -> np.ndarray:
    """Deconvnet projections computed as gradients (the rule form, for any model).

    For each request m, the gradient of its selected activation a_m (taken on a batch where
    every request has its own copy of its image) w.r.t. the input, through the model's
    layers with the deconvnet rule: each ReLU back-propagates ReLU(upstream); contrast
    normalization back-propagates as the identity; max pools back-propagate normally (which is
    unpooling with the forward switches); batch normalization as its per-channel scale.

    Args:
      model, layer_name: the model and one of its conv, pool or activation layers.
      images, image_index, feature, y, x: as in `project` (None / negative y or x = max).
      scale_by_activation: seed the backward pass with a_m instead of 1, i.e. return
        a_m * d a_m / d input. The deconvnet projects the activation itself, so this (default)
        equals its projection; False gives the plain deconvnet-rule gradient.
      batch_size: requests per call.

    Returns:
      (M, H, W, C) float32 numpy array.
    """
    _check_layer(model, layer_name)
    map_shape = _map_shape(model, layer_name)
    images, image_index, feature, y, x = _requests(images, image_index, feature, y, x, map_shape)
    fn = _gradient_fn(model, layer_name)
    parts = []
    for sl, _, _ in _chunks(image_index, batch_size):
        seed = np.full(feature[sl].shape, int(scale_by_activation), np.int32)
        out = fn(
            tf.constant(images[image_index[sl]]),
            tf.constant(feature[sl]),
            tf.constant(y[sl]),
            tf.constant(x[sl]),
            tf.constant(seed),
        )
        parts.append(out.numpy())
    if not parts:
        return np.zeros((0, *images.shape[1:]), np.float32)
    return np.concatenate(parts)


# Receptive fields (any model; see `graph`).
receptive_field = graph.receptive_field
receptive_field_size = graph.receptive_field_size
