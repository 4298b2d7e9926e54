"""The explicit deconvnet's windowed way down: each projection only inside its unit's
receptive field.

Per request, a (M, Sy, Sx, C) window at offsets (oy, ox) of each layer, S growing from 1 at
the top as the window goes down through filters (`_WindowFilter`: a matmul and an
overlap-add for small windows), unpools (`_WindowUnpool`, the switches of each request's
image), average unpools and crops; `windowed_backward` switches to full maps
(`deconv_layers.dense_backward`) once the window covers half of a layer. Nothing outside the
receptive field can be non-zero, so the result is the full computation's.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core import graph
from zf_tf.core.deconv_layers import (
    batched_scatter_add,
    check_conv,
    dense_backward,
    down_kind,
    has_relu,
    pointwise_down,
)

__all__ = ["windowed_backward"]


# ---------------------------------------------------------------------------------------------
# Per-request windows (M, Sy, Sx, C) at offsets (oy, ox) of each layer
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
        check_conv(conv)
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
        flat = batched_scatter_add(window, local, per_item)
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


# ---------------------------------------------------------------------------------------------
# The way down
# ---------------------------------------------------------------------------------------------


def windowed_backward(steps, activation, feature, y, x, image_index, dense_fraction=0.5):
    """The way down on per-request windows, switching to full maps once a window covers
    `dense_fraction` of its layer's area. Returns the (M, H, W, C) projections."""
    top_shape = steps[-1][2]
    window, oy, ox = _WindowTop(top_shape[2], name="window_top")(activation, feature, y, x)
    win = (1, 1)
    for i in reversed(range(len(steps))):
        layer, in_shape, out_shape, switches = steps[i]
        if win[0] * win[1] >= dense_fraction * out_shape[0] * out_shape[1]:
            d = _PlaceWindow(out_shape, name=f"{layer.name}_place")(window, oy, ox)
            return dense_backward(
                steps[: i + 1],
                d,
                lambda _, sw: keras.ops.take(sw, image_index, axis=0),
            )
        geometry, _ = graph.window_geometry(layer, in_shape[:2])
        name, kind = layer.name, down_kind(layer)
        if kind == "maxpool":
            window, oy, ox = _WindowUnpool(geometry, in_shape, name=f"{name}_unpool")(
                window, switches, image_index, oy, ox
            )
        elif kind == "avgpool":
            window, oy, ox = _WindowAvgUnpool(geometry, in_shape, out_shape, name=f"{name}_unpool")(
                window, oy, ox
            )
        elif kind == "conv":
            if has_relu(layer):
                window = keras.layers.ReLU(name=f"{name}_rectify")(window)
            window, oy, ox = _WindowFilter(layer, geometry, in_shape)(window, oy, ox)
        elif kind == "crop":
            (top, _), (left, _) = layer.padding
            window, oy, ox = _WindowCrop(top, left, in_shape, name=f"{name}_crop")(window, oy, ox)
        else:  # a global pool's 1x1 maps always take the dense branch above
            window = pointwise_down(kind, layer, window)
        if geometry is not None:
            win = tuple((w - 1) * s + k for w, (k, s, _) in zip(win, geometry))
    return _PlaceWindow(steps[0][1], name="place")(window, oy, ox)
