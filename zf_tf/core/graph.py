"""Any Keras convnet as a flat list of layer calls: taps, chains and receptive fields.

`trace(model, x, call)` runs a model's graph on a symbolic tensor `x`, calling
`call(layer, *args, **kwargs)` for every layer, and descends into nested Sequential and
Functional models so that their layers appear as if the model were flat (the cause of
"Graph disconnected" errors when a model is tapped through `model.get_layer(name).output`
of a nested or re-wrapped model). It returns the output and the calls ("ops") in execution
order. The rest of the package builds on it:

  tap(model, names)             one Model: images -> the outputs of the named layers
  chain(model, name)            the layers from the input up to `name`, when they form a
                                chain (each takes the previous one's output), else None
  receptive_field(model, name)  the input pixels a unit depends on, by interval
                                propagation through the graph (residual and concatenating
                                blocks included)
  spatial_layers(model)         layers a unit can be chosen in (conv, pool, activation)
  first_conv, last_conv,        the layers the analyses default to (ZFNet: conv1, conv5,
  penultimate_dense(model)      fc7), whatever the model calls them

Only single-input models of channels_last images are supported.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import keras

__all__ = [
    "Op",
    "trace",
    "input_shape",
    "static_shape",
    "fixed_input",
    "tap",
    "chain",
    "find",
    "spatial_layers",
    "receptive_field",
    "receptive_field_size",
    "conv_layers",
    "dense_layers",
    "first_conv",
    "last_conv",
    "penultimate_dense",
    "output_layer",
    "num_outputs",
    "feature_layers",
]


@dataclasses.dataclass
class Op:
    """One layer call of a traced model.

    Attributes:
      layer: the layer (or Keras operation) called.
      inputs: the symbolic tensors it consumed, flattened.
      output: its output tensor (the first, for layers with several).
    """

    layer: object
    inputs: list
    output: object

    @property
    def name(self) -> str:
        return self.layer.name


def _default_call(layer, *args, **kwargs):
    return layer(*args, **kwargs)


def trace(model, x, call=None):
    """Runs `model` on the symbolic tensor `x`, one hooked call per (flattened) layer.

    Args:
      model: a Sequential or Functional Keras model with one input.
      x: a symbolic tensor (`keras.Input`) of the model's input.
      call: callable(layer, *args, **kwargs) -> output, used in place of every layer call
        (default: the layer itself); nested models are descended into, never passed to it.

    Returns:
      (output, [Op]) the model's output and its calls in execution order.

    Raises:
      NotImplementedError: a subclassed (non-functional) model, or a multi-input one.
    """
    call = call or _default_call
    ops = []

    def hook(layer, *args, **kwargs):
        if isinstance(layer, keras.Model):
            if len(args) != 1 or kwargs.keys() - {"training", "mask"}:
                raise NotImplementedError(f"nested model {layer.name!r}: one input only")
            return run(layer, args[0])
        out = call(layer, *args, **kwargs)
        flat = keras.tree.flatten((args, kwargs))
        consumed = [t for t in flat if isinstance(t, keras.KerasTensor)]
        first = keras.tree.flatten(out)[0]
        ops.append(Op(layer, consumed, first))
        return out

    def run(m, t):
        if isinstance(m, keras.Sequential):
            for layer in m.layers:
                t = hook(layer, t)
            return t
        if not isinstance(m, keras.Function):
            raise NotImplementedError(
                f"model {m.name!r} ({type(m).__name__}) is a subclassed model: only Sequential "
                "and functional models can be looked inside"
            )
        if len(m.inputs) != 1:
            raise NotImplementedError(f"model {m.name!r} has {len(m.inputs)} inputs; one only")
        structure = keras.tree.map_structure(lambda _: t, m.input)
        clone = keras.models.clone_model(
            m, input_tensors=structure, clone_function=lambda layer: layer, call_function=hook
        )
        return clone.output

    return run(model, x), ops


def input_shape(model) -> tuple:
    """The model's (H, W, C) input shape; H and W may be None (a free-size model)."""
    shape = tuple(model.inputs[0].shape[1:]) if model.inputs else ()
    if len(shape) != 3:
        raise ValueError(f"the model needs (H, W, C) image inputs; its input shape is {shape}")
    return shape


def static_shape(model) -> tuple:
    """The input shape without the batch axis; every dimension must be known."""
    if not model.inputs:
        raise ValueError(f"model {model.name!r} is not built: it has no inputs")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(
            f"the model's input size is free ({shape}): fix it with graph.fixed_input first"
        )
    return tuple(int(d) for d in shape)


def fixed_input(model, size: int):
    """`model` with a static size x size input, sharing its layers (a free-size model, e.g.
    `keras.applications.VGG16(include_top=False)`); the model itself if already static."""
    shape = input_shape(model)
    if None not in shape[:2]:
        return model
    x = keras.Input((int(size), int(size), shape[2]), name="images")
    out, _ = trace(model, x)
    return keras.Model(x, out, name=model.name)


_TRACES = weakref.WeakKeyDictionary()


def ops_of(model) -> list:
    """The model's traced calls on a static input (cached per model)."""
    found = _TRACES.get(model)
    if found is None:
        _, found = trace(model, keras.Input(static_shape(model)))
        _TRACES[model] = found
    return found


def find(model, name: str, valid=None):
    """The Op of the first call of layer `name`.

    Raises:
      ValueError: no such layer (listing `valid`, or every layer's name).
    """
    for op in ops_of(model):
        if op.name == name:
            return op
    choices = valid if valid is not None else [op.name for op in ops_of(model)]
    raise ValueError(f"unknown layer {name!r}; valid layers: {', '.join(choices)}")


def tap(model, names, call=None, name: str = "tap"):
    """A Model from the images to the outputs of layers `names` (a list, in that order).

    Works on nested models and on models whose layers are shared with another model. With
    `call`, every layer call goes through it (as in `trace`).

    Raises:
      ValueError: an unknown layer name.
    """
    names = list(names)
    x = keras.Input(static_shape(model), name="images")
    final, ops = trace(model, x, call)
    outputs = {}
    for op in ops:
        outputs.setdefault(op.name, op.output)
    missing = [n for n in names if n not in outputs]
    if missing:
        find(model, missing[0])  # raises, naming the valid layers
    return keras.Model(x, [outputs[n] for n in names], name=name)


# ---------------------------------------------------------------------------------------------
# Layer kinds
# ---------------------------------------------------------------------------------------------

CONV_TYPES = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
)
POOL_TYPES = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
)
ACTIVATION_TYPES = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
)


def _is_spatial(op) -> bool:
    shape = op.output.shape
    if isinstance(op.layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)):
        return True
    return len(shape) == 4


def spatial_layers(model) -> list[str]:
    """Names of the layers a unit can be chosen in: conv, pool and activation layers with
    image-shaped (or global-pool) outputs, in execution order."""
    kinds = CONV_TYPES + POOL_TYPES + ACTIVATION_TYPES
    names = []
    for op in ops_of(model):
        if isinstance(op.layer, kinds) and _is_spatial(op) and op.name not in names:
            names.append(op.name)
    return names


def conv_layers(model) -> list[str]:
    """Names of the conv layers, in execution order."""
    return [op.name for op in ops_of(model) if isinstance(op.layer, CONV_TYPES)]


def dense_layers(model) -> list[str]:
    """Names of the Dense layers, in execution order."""
    return [op.name for op in ops_of(model) if isinstance(op.layer, keras.layers.Dense)]


# Layers of inference-time identity (dropout, noise): never a layer worth naming as features.
IDENTITY_TYPES = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D subclass it
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
# Input preprocessing and reshapes: their outputs are the pixels, or another layer's values.
_NOT_FEATURES = IDENTITY_TYPES + (
    keras.layers.Rescaling,
    keras.layers.Normalization,
    keras.layers.Resizing,
    keras.layers.CenterCrop,
    keras.layers.Flatten,
    keras.layers.Reshape,
)


def first_conv(model) -> str:
    """The model's first conv layer in execution order ("layer 1": ZFNet's conv1, VGG16's
    block1_conv1).

    Raises:
      ValueError: the model has no conv layer.
    """
    convs = conv_layers(model)
    if not convs:
        raise ValueError(f"model {model.name!r} has no conv layer")
    return convs[0]


def last_conv(model) -> str:
    """The model's last conv layer in execution order (ZFNet's conv5, also when an ablation
    removes conv3 and conv4; VGG16's block5_conv3).

    Raises:
      ValueError: the model has no conv layer.
    """
    convs = conv_layers(model)
    if not convs:
        raise ValueError(f"model {model.name!r} has no conv layer")
    return convs[-1]


def output_layer(model) -> str:
    """The name of the layer whose output is the model's (its last call: ZFNet's logits);
    `tap(model, [output_layer(model)])` taps the logits."""
    return ops_of(model)[-1].name


def num_outputs(model) -> int:
    """A classifier's number of classes: the size of its (batch, classes) output.

    Raises:
      ValueError: the output is not (batch, classes), e.g. the feature maps of a
        keras.applications model without its top.
    """
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2:
        raise ValueError(
            f"model {model.name!r} is not a classifier: its output is {shape[1:]}, not "
            "(classes,) (a keras.applications model without its top?)"
        )
    return int(shape[-1])


def penultimate_dense(model) -> str:
    """The "layer 7" of any classifier: the Dense layer before the last Dense layer (ZFNet's fc7;
    fc6 when an ablation removes fc7; VGG16's fc2).

    When the model has a single Dense layer (its classifier) or none, there is no such
    layer: then it is the layer that feeds the classifier (with no Dense layer at all: the
    layer that feeds the output layer), skipping dropout and noise layers (identities at
    inference), e.g. a global pool or a Flatten (ResNet50's avg_pool; ZFNet without fc6 and
    fc7: flatten). Never the output layer itself.

    Raises:
      ValueError: the model's output layer reads the input directly (no layer before it).
    """
    ops = ops_of(model)
    dense = [op for op in ops if isinstance(op.layer, keras.layers.Dense)]
    if len(dense) >= 2:
        return dense[-2].name
    head = dense[-1] if dense else ops[-1]
    by_output = {id(op.output): op for op in ops}
    t = head
    while True:
        src = by_output.get(id(t.inputs[0])) if t.inputs else None
        if src is None:
            raise ValueError(
                f"model {model.name!r} has no layer before its output layer {head.name!r}"
            )
        if not isinstance(src.layer, IDENTITY_TYPES):
            return src.name
        t = src


def feature_layers(model) -> list[str]:
    """Names of the layers whose outputs are features worth comparing between images, in
    execution order: every layer but input preprocessing (Rescaling, Normalization, Resizing,
    CenterCrop), reshapes (Flatten, Reshape), dropout and noise, and the output layer (ZFNet:
    conv1_pad, conv1, pool1, norm1, conv2, ..., pool5, fc6, fc7)."""
    ops = ops_of(model)
    names = []
    for op in ops[:-1]:
        if not isinstance(op.layer, _NOT_FEATURES) and op.name not in names:
            names.append(op.name)
    return names


def chain(model, name: str):
    """The layers from the input up to and including `name` if each takes exactly the
    previous one's output (a chain, as Sequential nets and VGG; side branches that do not
    feed `name` do not matter); None when a layer on the way takes several inputs (residual
    or concatenating blocks)."""
    ops = ops_of(model)
    target = find(model, name)
    by_output = {id(op.output): op for op in ops}
    out, t = [], target
    while True:
        out.append(t.layer)
        if len(t.inputs) != 1:
            return None
        src = by_output.get(id(t.inputs[0]))
        if src is None:  # the model's input
            break
        t = src
    out.reverse()
    return out


# ---------------------------------------------------------------------------------------------
# Receptive fields: interval propagation (rows and columns independently)
# ---------------------------------------------------------------------------------------------


def window_geometry(layer, size):
    """((kernel, stride, pad_before) per axis, output (h, w)) of a sliding-window layer
    (conv, depthwise/separable conv, max or average pool; dilation folded into the kernel)
    or of ZeroPadding2D; None geometry for other layers.

    TF 'same' pads pad_total = max((out - 1) * stride + kernel - in, 0), the smaller half
    before; 'valid' pads nothing.
    """
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (top, bottom), (left, right) = layer.padding
        return ((1, 1, top), (1, 1, left)), (size[0] + top + bottom, size[1] + left + right)
    if isinstance(layer, CONV_TYPES + (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        if isinstance(layer, CONV_TYPES):
            kernel, dilation = layer.kernel_size, layer.dilation_rate
        else:
            kernel, dilation = layer.pool_size, (1, 1)
        axes, out_size = [], []
        for axis in range(2):
            k = (int(kernel[axis]) - 1) * int(dilation[axis]) + 1
            s, n = int(layer.strides[axis]), int(size[axis])
            if str(layer.padding).lower() == "same":
                out = math.ceil(n / s)
                pad = max((out - 1) * s + k - n, 0) // 2
            else:
                out, pad = (n - k) // s + 1, 0
            axes.append((k, s, pad))
            out_size.append(out)
        return tuple(axes), tuple(out_size)
    return None, tuple(size)


ALL = "all"  # the region of a tensor without maps (a dense path): all of it


def _needed(op, region, in_shape):
    """The (y0, y1, x0, x1) inclusive region of input `in_shape` that `region` of the op's
    output depends on (unclipped: may extend into padding); ALL for an input without maps
    (B, F): a dense path, as in a squeeze-and-excitation block (global pool -> dense ->
    reshape -> multiply), depends on all of it, and through its global pool on all of the
    maps below."""
    layer = op.layer
    if len(in_shape) != 4 or in_shape[1] is None:
        return ALL
    h, w = int(in_shape[1]), int(in_shape[2])
    out = op.output.shape
    whole = (0, h - 1, 0, w - 1)
    if len(out) != 4 or region == ALL:  # global pools, Flatten, Dense: everything
        return whole
    geometry, _ = window_geometry(layer, (h, w))
    if geometry is not None:
        (ky, sy, py), (kx, sx, px) = geometry
        y0, y1, x0, x1 = region
        return (y0 * sy - py, y1 * sy - py + ky - 1, x0 * sx - px, x1 * sx - px + kx - 1)
    if isinstance(layer, keras.layers.Cropping2D):
        (top, _), (left, _) = layer.cropping
        y0, y1, x0, x1 = region
        return (y0 + top, y1 + top, x0 + left, x1 + left)
    if (h, w) == (1, 1):  # broadcast (squeeze-excitation scales)
        return (0, 0, 0, 0)
    if (h, w) == (int(out[1]), int(out[2])):  # pointwise: BN, activations, Add, Concatenate
        return region
    return whole  # other resampling layers: conservatively everything


def _region(model, name: str, y: int, x: int):
    ops = ops_of(model)
    target = find(model, name)
    shape = target.output.shape
    if len(shape) == 4:
        h, w = int(shape[1]), int(shape[2])
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"unit ({y}, {x}) is outside {name}'s {h}x{w} maps")
    regions = {id(target.output): (y, y, x, x)}
    for op in reversed(ops[: ops.index(target) + 1]):
        region = regions.get(id(op.output))
        if region is None:
            continue
        for t in op.inputs:
            need = _needed(op, region, tuple(t.shape))
            old = regions.get(id(t))
            if ALL in (need, old):
                need = ALL
            elif old is not None:
                need = (
                    min(old[0], need[0]),
                    max(old[1], need[1]),
                    min(old[2], need[2]),
                    max(old[3], need[3]),
                )
            regions[id(t)] = need
    # The model input is the one tensor no op produced.
    produced = {id(op.output) for op in ops}
    for op in ops:
        for t in op.inputs:
            if id(t) not in produced and id(t) in regions:
                return regions[id(t)]
    raise AssertionError("unreachable: every layer depends on the input")


def receptive_field(model, name: str, y: int, x: int) -> tuple:
    """The input pixels unit (y, x) of layer `name` depends on: (y0, x0, y1, x1), inclusive-
    exclusive, clipped to the image. Conv, pool and zero-padding geometry ('same' padding
    amounts from the actual sizes), through residual and concatenating blocks (the union of
    the paths), and through dense paths that broadcast back into the maps (a
    squeeze-and-excitation gate: the whole image)."""
    h_in, w_in, _ = static_shape(model)
    y0, y1, x0, x1 = _region(model, name, int(y), int(x))
    return (max(y0, 0), max(x0, 0), min(y1 + 1, h_in), min(x1 + 1, w_in))


def receptive_field_size(model, name: str) -> int:
    """Side length in input pixels of a unit's receptive field (rows, unclipped)."""
    y0, y1, _, _ = _region(model, name, 0, 0)
    return int(y1 - y0 + 1)
