"""The backward-rule form: the model's own layers, run so that their gradient follows a rule.

The deconvnet's projection of activation a equals a * d a / d input when every ReLU's
backward is ReLU of the incoming gradient (the "deconvnet rule"), max pools back-propagate
normally and contrast normalization as the identity. `rule_tap` builds that as a Model on the
model's layers (shared weights, each rectifier-bearing layer wrapped), on any DAG (ResNet
`Add`, Inception `Concatenate`, depthwise convs); `rule_forward` runs it up to any layer
(dense layers and logits included) under any of `BACKWARD_RULES` (guided backpropagation,
the plain gradient, the redirected rule of feature visualization). What each rule does at
each activation is one table, `activations.TABLE`; `way_down` records it for a projection.
`rectified` and `rule_tap(before_rectifier=True)` give a layer's value before its rectifier.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

from zf_tf.core import activations, graph
from zf_tf.core.model import LocalResponseNorm

__all__ = [
    "BACKWARD_RULES",
    "rule_tap",
    "rule_forward",
    "rectified",
    "way_down",
    "way_down_counts",
    "way_down_line",
]


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


# The layers whose fused activation `_pre_activation` can reach (`deconv.projection_form`
# refuses the rule form for others).
PRE_ACTIVATION_TYPES = (
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
        identity, max pools normally (the deconvnet of `deconv.build_deconvnet`, Zeiler &
        Fergus), batch normalization as its per-channel scale;
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
