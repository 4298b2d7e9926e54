"""The backward rule of every activation in the table, against a computation written out
here: input -> Dense(8) -> activation -> Dense(5) logits, the gradient of one logit w.r.t.
the input under each rule, with the activation's derivative by central finite differences
(not TensorFlow's autodiff)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from zf_tf.core import activations, rules

L = keras.layers
RECTIFIERS = ["relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "hard_silu"]
RECTIFIERS += ["mish", "softplus"]
GATES = ["sigmoid", "hard_sigmoid", "tanh", "softsign"]


def cube(x):
    """An activation the table does not know."""
    return x * x * x


def net(activation, separate: bool, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((2, 2, 3))
    x = L.Flatten()(x)
    if separate:
        x = L.Dense(8, name="pre")(x)
        x = L.Activation(activation, name="act")(x)
    else:
        x = L.Dense(8, activation=activation, name="act")(x)
    return keras.Model(inp, L.Dense(5, name="logits")(x))


def expected(model, x, unit, activation, rule):
    """d logits[unit] / d x under `rule`, by hand."""
    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)]
    w1, b1 = (np.asarray(v, np.float64) for v in dense[0].get_weights())
    w2 = np.asarray(dense[-1].get_weights()[0], np.float64)
    z = x.reshape(len(x), -1).astype(np.float64) @ w1 + b1
    f = keras.activations.get(activation) if isinstance(activation, str) else activation
    h = 1e-4
    slope = (np.asarray(f(tf.constant(z + h))) - np.asarray(f(tf.constant(z - h)))) / (2 * h)
    down = np.broadcast_to(w2[:, unit], z.shape)  # d logit / d activation output
    kind = activations.treatment(getattr(f, "__name__", ""))
    if rule == "deconvnet" and kind == activations.RECTIFY:
        dz = np.maximum(down, 0)  # the signal rectified, the input ignored
    elif rule == "guided" and kind == activations.RECTIFY:
        dz = slope * np.maximum(down, 0)
    else:
        dz = slope * down
    return (dz @ w1.T).reshape(x.shape)


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize("activation", RECTIFIERS + GATES + [cube])
def test_each_activations_rule_against_a_hand_computation(activation, rule):
    x = np.random.default_rng(1).normal(0, 1, (3, 2, 2, 3)).astype(np.float32)
    unit = 2
    for separate in (False, True):
        model = net(activation, separate)
        images = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(images)
            logits = rules.rule_forward(model, images, "logits", rule)
            score = logits[:, unit]
        got = tape.gradient(score, images).numpy()
        np.testing.assert_allclose(
            logits.numpy(), model(images).numpy(), rtol=1e-5, atol=1e-6
        )  # forward values unchanged
        want = expected(model, x, unit, activation, rule)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4, err_msg=f"{separate=}")


@pytest.mark.parametrize("separate", [False, True])
def test_the_redirected_rule_passes_a_dead_units_gradient(separate):
    """'redirected' (feature visualization): an image on which every ReLU of the layer is
    dead gets upstream through the ReLUs as if they were the identity, except where it
    would push an input already below zero further down (Lucid's redirected_relu_grad);
    an image with a live unit gets the true gradient. Checked by hand on a Dense + ReLU."""
    model = net("relu", separate)
    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)]
    w1, b1 = (np.asarray(v, np.float64) for v in dense[0].get_weights())
    w2 = np.asarray(dense[-1].get_weights()[0], np.float64)
    rng = np.random.default_rng(2)
    live = rng.normal(0, 1, (1, 2, 2, 3))
    # an input whose pre-activations are all negative: solve for z = -1 - |noise|
    target = -1 - np.abs(rng.normal(0, 1, (1, 8)))
    dead = (np.linalg.lstsq(w1.T, (target - b1).T, rcond=None)[0].T).reshape(1, 2, 2, 3)
    x = np.concatenate([live, dead]).astype(np.float32)
    z = x.reshape(2, -1).astype(np.float64) @ w1 + b1
    assert (z[1] < 0).all() and (z[0] > 0).any()
    unit = 1
    images = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = -rules.rule_forward(model, images, "logits", "redirected")[:, unit]
    got = tape.gradient(loss, images).numpy()
    up = np.broadcast_to(-w2[:, unit], z.shape)  # d loss / d ReLU output
    true = up * (z > 0)
    redirected = np.where((z < 0) & (up > 0), 0.0, up)
    dz = np.stack([true[0], redirected[1]])
    np.testing.assert_allclose(got, (dz @ w1.T).reshape(x.shape), rtol=1e-4, atol=1e-6)
    assert np.abs(got[1]).max() > 0  # the plain gradient is zero there


def test_the_table_in_words():
    assert activations.describe("relu", "deconvnet") == "ReLU of the signal (the paper's rule)"
    assert activations.describe("silu", "deconvnet") == "ReLU of the signal (rectifier-shaped)"
    assert (
        activations.describe("sigmoid", "deconvnet") == "its true gradient (a gate, not rectified)"
    )
    assert activations.describe("cube", "deconvnet") == "its true gradient (not in the table)"
    assert activations.describe("gelu", "guided") == (
        "its gradient where the signal is positive (guided)"
    )
    for layer, found in (
        (L.ReLU(), ("relu", False)),
        (L.ReLU(negative_slope=0.1), ("leaky_relu", False)),
        (L.LeakyReLU(), ("leaky_relu", False)),
        (L.PReLU(), ("prelu", False)),
        (L.ELU(), ("elu", False)),
        (L.Activation("swish"), ("silu", False)),
        (L.Conv2D(2, 3, activation="gelu"), ("gelu", True)),
        (L.Conv2D(2, 3), None),
        (L.MaxPooling2D(), None),
    ):
        assert activations.activation_of(layer) == found, layer


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
@pytest.mark.parametrize("make", [lambda: L.LeakyReLU(0.2), L.PReLU, L.ELU])
def test_activation_layers_with_parameters(make, rule):
    """Activation layers of their own (PReLU holds weights): rectified like the others."""
    keras.utils.set_random_seed(0)
    layer = make()
    x = inp = keras.Input((2, 2, 3))
    x = layer(L.Dense(8, name="pre")(L.Flatten()(x)))
    model = keras.Model(inp, L.Dense(5, name="logits")(x))
    if isinstance(layer, L.PReLU):
        layer.set_weights([np.full((8,), 0.3, np.float32)])
    images = tf.constant(np.random.default_rng(1).normal(0, 1, (3, 2, 2, 3)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        score = rules.rule_forward(model, images, "logits", rule)[:, 2]
    got = tape.gradient(score, images).numpy()
    w1, b1 = (np.asarray(v, np.float64) for v in model.get_layer("pre").get_weights())
    w2 = np.asarray(model.get_layer("logits").get_weights()[0], np.float64)
    z = images.numpy().reshape(3, -1).astype(np.float64) @ w1 + b1
    f = lambda t: np.asarray(layer(tf.constant(t, tf.float32)), np.float64)  # noqa: E731
    slope = (f(z + 1e-3) - f(z - 1e-3)) / 2e-3
    down = np.maximum(np.broadcast_to(w2[:, 2], z.shape), 0)
    dz = down if rule == "deconvnet" else slope * down
    np.testing.assert_allclose(got, (dz @ w1.T).reshape(got.shape), rtol=2e-3, atol=2e-4)


def test_way_down_records_each_activation_below_a_layer():
    """A squeeze-and-excitation block: swish convs, a sigmoid gate on a dense path; the
    record lists what the rule does at each activation below the layer, and only there."""
    keras.utils.set_random_seed(0)
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", activation="swish", name="c1")(x)
    gate = L.GlobalAveragePooling2D(name="squeeze")(x)
    gate = L.Dense(4, activation="sigmoid", name="excite")(gate)
    x = L.Multiply(name="scale")([x, L.Reshape((1, 1, 4))(gate)])
    x = L.Conv2D(4, 3, name="c2")(x)
    x = L.Activation("gelu", name="g2")(x)
    model = keras.Model(inp, L.Conv2D(2, 1, activation="tanh", name="head")(x))
    assert rules.way_down(model, "g2") == [
        {"layer": "c1", "activation": "silu", "rule": "ReLU of the signal (rectifier-shaped)"},
        {
            "layer": "excite",
            "activation": "sigmoid",
            "rule": "its true gradient (a gate, not rectified)",
        },
        {"layer": "g2", "activation": "gelu", "rule": "ReLU of the signal (rectifier-shaped)"},
    ]
    assert [r["layer"] for r in rules.way_down(model, "c1")] == ["c1"]
    assert rules.way_down_line(rules.way_down(model, "g2")) == (
        "Way down (deconvnet rule): silu on 1 layer: ReLU of the signal (rectifier-shaped); "
        "sigmoid on 1 layer: its true gradient (a gate, not rectified); gelu on 1 layer: ReLU "
        "of the signal (rectifier-shaped)"
    )
