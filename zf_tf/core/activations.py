"""How the way down passes each activation: one table, stated (the backward rules).

The paper's deconvnet defines its step down only for ReLU: the signal coming down is
rectified, ReLU(signal), whatever the unit's input was (Zeiler & Fergus, Sec. 2.1). Other
activations need a choice, made here per activation and reported for every layer of a
projection (`way_down`):

  rectify   the backward signal is rectified as at a ReLU. For ReLU and ReLU6 this is the
            paper's rule; for the other rectifier-shaped units (leaky ReLU, PReLU, ELU,
            SELU, CELU, GELU, swish/SiLU, hard swish, mish, softplus, ...: near zero or
            slightly negative below zero, near the identity above) it is the same rule
            applied to the shape they share with ReLU.
  gradient  the true local gradient: gates and squashing functions (sigmoid, hard sigmoid,
            tanh, softsign, softmax, ...) scale what passes, and rectifying their backward
            signal would describe a unit they are not. Also every activation not in TABLE,
            and said so.
  identity  linear.

Under guided backpropagation a 'rectify' activation passes its true gradient where the
signal coming down is positive (for ReLU: signal x (input > 0) x (signal > 0), Springenberg
et al. 2015); a 'gradient' one its true gradient. The plain gradient changes nothing.

The 'redirected' rule (feature visualization, as Lucid's `redirected_relu_grad`): a
'rectify' activation passes its true gradient, except for an image through which none of
it passes (a unit dead on that image): there the signal goes down as if the unit were the
identity, but for the parts that would push an input already below zero further down. So
an optimization that starts where a unit is silent still finds a way up.
"""

from __future__ import annotations

import keras
import tensorflow as tf

RECTIFY, GRADIENT, IDENTITY = "rectify", "gradient", "identity"

_RECTIFIERS = (
    "relu relu6 leaky_relu prelu elu selu celu gelu silu hard_silu mish softplus "
    "sparse_plus squareplus"
).split()
_GATES = (
    "sigmoid hard_sigmoid log_sigmoid tanh hard_tanh softsign softmax log_softmax sparsemax "
    "exponential glu"
).split()
# activation (Keras' name: 'swish' is 'silu', 'hard_swish' is 'hard_silu') -> treatment
TABLE = {
    **{name: RECTIFY for name in _RECTIFIERS},
    **{name: GRADIENT for name in _GATES},
    "linear": IDENTITY,
}
# Layer types that are an activation and nothing else (with their activation's name).
_ACTIVATION_LAYERS = (
    (keras.layers.LeakyReLU, "leaky_relu"),
    (keras.layers.PReLU, "prelu"),
    (keras.layers.ELU, "elu"),
    (keras.layers.Softmax, "softmax"),
)


def activation_of(layer) -> tuple[str, bool] | None:
    """(activation name, fused) of a layer that applies one, else None: fused for a conv or
    dense layer's `activation` argument, not fused for an activation layer (ReLU,
    Activation, LeakyReLU, ...). A linear fused activation counts as none."""
    if isinstance(layer, keras.layers.ReLU):
        return ("leaky_relu" if layer.negative_slope else "relu"), False
    for kind, name in _ACTIVATION_LAYERS:
        if isinstance(layer, kind):
            return name, False
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", type(layer.activation).__name__), False
    fused = getattr(layer, "activation", None)
    if fused is None or not callable(fused) or isinstance(layer, keras.Model):
        return None
    name = getattr(fused, "__name__", type(fused).__name__)
    return None if name == "linear" else (name, True)


def treatment(name: str) -> str:
    """RECTIFY, GRADIENT or IDENTITY for an activation (GRADIENT where TABLE has none)."""
    return TABLE.get(name, GRADIENT)


def describe(name: str, rule: str) -> str:
    """What `rule` ('deconvnet', 'guided', 'gradient') does at activation `name`, in words."""
    kind = treatment(name)
    known = name in TABLE
    if rule == "gradient" or kind == IDENTITY:
        return "its true gradient" if kind != IDENTITY else "identity"
    if kind == RECTIFY:
        if rule == "deconvnet":
            why = "the paper's rule" if name in ("relu", "relu6") else "rectifier-shaped"
            return f"ReLU of the signal ({why})"
        return "its gradient where the signal is positive (guided)"
    return "its true gradient" + (" (a gate, not rectified)" if known else " (not in the table)")


def apply(forward, x, name: str, rule: str):
    """forward(x) (an activation, or a layer applying it) with `rule`'s backward pass for
    activation `name` (module docstring). Forward values are forward's own."""
    kind = treatment(name)
    if rule == "gradient" or kind != RECTIFY:
        return forward(x)

    @tf.custom_gradient
    def ruled(t):
        # A layer with weights (PReLU) hands its variables to the backward pass, which
        # gives them no gradient: the way down explains the input, it trains nothing.
        tape = None
        if rule == "deconvnet":  # needs no derivative of forward: nothing recorded
            y = forward(t)
        else:
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = forward(t)

        def backward(upstream, variables=None):
            if rule == "deconvnet":  # the signal rectified, whatever the input was
                down = tf.nn.relu(upstream)
            elif rule == "redirected":  # the true gradient, unless it is zero for an image
                down = tape.gradient(y, t, output_gradients=upstream)
                axes = list(range(1, len(down.shape)))
                alive = tf.reduce_any(tf.not_equal(down, 0), axis=axes, keepdims=True)
                pushed = tf.where((t < 0) & (upstream > 0), tf.zeros_like(upstream), upstream)
                down = tf.where(alive, down, pushed)
            else:  # guided: the true gradient of what comes down positive
                down = tape.gradient(y, t, output_gradients=tf.nn.relu(upstream))
            return (down, [tf.zeros_like(v) for v in variables]) if variables else down

        return y, backward

    return ruled(x)
