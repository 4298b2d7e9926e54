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

`build_deconvnet` builds this as one Keras functional model (the *explicit* form; its layers
are in `deconv_layers`) that reuses the classifier's own layer objects (so later weight
changes show up in projections), runs the forward pass once per image and then M projections
at once from gathered switches. `project` runs it in chunks. Any chain of those layers works,
named anything (Sequential nets, VGG, nested models: see `graph`).

By default the way down only computes each projection inside its unit's receptive field
(`windowed=True`, the module `windowed`): a (M, S, S, C) window per layer, S growing from 1
at the top, positioned per request, and switched to full maps once the window covers half of
a layer. Nothing outside the receptive field can be non-zero, so the result is the same as the
full computation (`windowed=False`), for about 4.7x fewer FLOPs at conv5 / 224 px.

The same numbers are a gradient: the projection of activation a equals a * d a / d input when
every ReLU's backward is ReLU of the incoming gradient (the "deconvnet rule", not guided
backprop), max pools back-propagate normally and LRN back-propagates as the identity. This
*rule form* (`rules.rule_tap`: the model's layers, shared weights, each ReLU-bearing layer
wrapped) works on any DAG (ResNet `Add`, Inception `Concatenate`, MobileNet depthwise convs);
`build_deconvnet` uses it where the layers below are not a chain, and `gradient_projection`
computes it directly. `rules.rule_forward` generalizes it to any layer (dense layers and logits
included) and other backward rules (guided backpropagation, the plain gradient), for the
attribution methods.

Requests are (image, feature map, y, x); a negative y or x means "at the maximum of that
feature map on that image" (the first maximum in row-major order, as numpy's argmax).

This module holds the entry points (`build_deconvnet`, `project`, `projection_form`,
`valid_layers`, `gradient_projection`), the selection of the requested units and the chain's
forward pass with switches; the explicit form's layers are in `deconv_layers`, its windowed
way down in `windowed`, the rule form in `rules`, receptive fields in `graph`.
"""

from __future__ import annotations

import math
import weakref

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core import activations, deconv_layers, graph, rules
from zf_tf.core.windowed import windowed_backward

__all__ = [
    "build_deconvnet",
    "project",
    "projection_form",
    "valid_layers",
    "gradient_projection",
]


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
# The model's layers below a chosen layer (explicit form)
# ---------------------------------------------------------------------------------------------


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
            deconv_layers.down_kind(layer)
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
            t, switches = deconv_layers.SwitchMaxPool(layer)(t)
            if math.prod(in_shape) < deconv_layers.INT32_LIMIT:
                switches = keras.ops.cast(switches, "int32")
        else:
            t = layer(t)
            if len(t.shape) == 2:  # global pool
                t = keras.layers.Reshape((1, 1, int(t.shape[-1])), name=f"{layer.name}_maps")(t)
        steps.append((layer, in_shape, tuple(int(d) for d in t.shape[1:]), switches))
    return t, steps


# ---------------------------------------------------------------------------------------------
# Backward-rule form (`rules`)
# ---------------------------------------------------------------------------------------------


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
        reach (a layer type not in `rules.PRE_ACTIVATION_TYPES`).
    """
    _check_layer(model, layer_name)
    chain = graph.chain(model, layer_name)
    why = "the layers below it are not a chain (residual or concatenating blocks)"
    if chain is not None:
        try:
            for layer in chain:
                deconv_layers.down_kind(layer)
            return "explicit", ""
        except NotImplementedError as e:
            why = str(e).split(";")[0]
    for op in graph.ops_of(model):  # the rule form's clone wraps every rectifier it rules
        found = activations.activation_of(op.layer)
        ruled = found is not None and activations.treatment(found[0]) == activations.RECTIFY
        if ruled and found[1] and not isinstance(op.layer, rules.PRE_ACTIVATION_TYPES):
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
    a chain of layers with an inverse (`deconv_layers.SUPPORTED`), else rule. Both give the
    same numbers where both exist.

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
            rules.rule_tap(model, layer_name, "deconvnet"),
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
            d = windowed_backward(steps, activation, feature, y, x, image_index)
        else:
            selected = _SelectedMap(steps[-1][2], name=f"{layer_name}_selected")(
                activation, feature, y, x
            )
            d = deconv_layers.dense_backward(
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
        tap = rules.rule_tap(model, layer_name, "deconvnet")
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
