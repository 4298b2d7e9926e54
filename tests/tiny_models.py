"""Small non-ZFNet convnets for the analyses' "any model" tests: layer names unlike ZFNet's,
so a test that passes cannot be relying on conv1/conv5/fc7."""

import keras
import numpy as np

L = keras.layers


def randomize_batch_norm(model, seed: int = 0, mean_std: float = 0.1, var=(0.5, 2.0)):
    """Random BatchNormalization statistics and affine weights (gamma in [0.5, 1.5], beta
    and the moving mean ~ N(0, 0.1), mean_std for the mean, the moving variance uniform in
    `var`), so that a test can tell a BN layer's scale from the identity. Returns `model`."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)
            layer.set_weights([gamma, beta, rng.normal(0, mean_std, c), rng.uniform(*var, c)])
    return model


def named_convnet(size: int = 64, classes: int = 10, seed: int = 0) -> keras.Model:
    """Functional: Conv2D 'a' (RGB) -> pool 'p' -> Conv2D 'b' -> global pool 'gap' ->
    Dense 'h' -> Dense 'out' (logits). First conv a, last conv b, penultimate dense h."""
    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((size, size, 3), name="pixels")
    x = L.Conv2D(6, 5, strides=2, padding="same", activation="relu", name="a")(x)
    x = L.MaxPooling2D(3, 2, padding="same", name="p")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="b")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(12, activation="relu", name="h")(x)
    return keras.Model(inp, L.Dense(classes, name="out")(x), name="named_convnet")


def bn_net(size: int = 64, classes: int = 10, seed: int = 0) -> keras.Model:
    """Sequential Conv-BN-ReLU-pool x 2, global pool, one Dense 'logits' (10 outputs): the
    model brought along (a .keras file) in the end-to-end tests. Its "layer 7" is 'gap'."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            L.Rescaling(1 / 64.0, name="scale"),
            L.Conv2D(8, 5, strides=2, padding="same", use_bias=False, name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(name="r1"),
            L.MaxPooling2D(3, 2, padding="same", name="p1"),
            L.Conv2D(12, 3, padding="same", use_bias=False, name="c2"),
            L.BatchNormalization(name="bn2"),
            L.ReLU(name="r2"),
            L.MaxPooling2D(2, name="p2"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dropout(0.2, name="drop"),
            L.Dense(classes, name="logits"),
        ],
        name="bn_net",
    )


def saved_bn_net(path) -> str:
    """`bn_net()` saved as PATH/bn_net.keras; returns the file's path."""
    file = str(path / "bn_net.keras")
    bn_net().save(file)
    return file


def pooled_bn_net(seed: int = 0) -> keras.Model:
    """Sequential Conv-BN-ReLU-pool on 28 px with average pooling, input scaling and
    normalization layers, and batch-norm statistics set away from the identity."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 3)),
            L.Rescaling(1 / 127.5, offset=-1, name="scale"),
            L.Normalization(mean=[0.1, -0.2, 0.0], variance=[0.5, 2.0, 1.0], name="norm"),
            L.Conv2D(8, 3, padding="same", use_bias=False, name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(name="r1"),
            L.MaxPooling2D(3, 2, padding="same", name="p1"),
            L.ZeroPadding2D(1, name="pad"),
            L.Conv2D(12, 3, strides=2, name="c2"),
            L.BatchNormalization(name="bn2"),
            L.Activation("relu", name="r2"),
            L.AveragePooling2D(2, name="a2"),
            L.Conv2D(16, 3, padding="same", activation="relu", name="c3"),
            L.Dropout(0.5, name="drop"),
            L.AveragePooling2D(3, 2, padding="same", name="a3"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dense(4, name="logits"),
        ],
        name="bn_net",
    )
    return randomize_batch_norm(model, seed, mean_std=0.2, var=(0.3, 3.0))
