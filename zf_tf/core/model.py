"""ZFNet (Zeiler & Fergus 2014, Fig. 3) as a Keras 3 functional model.

Layer names are part of the public API: analyses tap layers by name
(``conv1``..``conv5``, ``pool1``, ``pool2``, ``pool5``, ``norm1``, ``norm2``, ``fc6``,
``fc7``, ``logits``). Every variant (input size, width multiplier, number of classes,
AlexNet-style layer 1) keeps the same topology and names; the Table 3 ablations
(`remove`) leave layers out and keep the other layers' names.

Padding is chosen so that the paper's sizes come out exactly at 224 px:
conv1 pads 1 pixel and runs 'valid' (110), pool1 and pool2 use 'same' (55, 13),
conv2 and pool5 are 'valid' (26, 6), conv3-5 are 'same' (13).
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf

from zf_tf.configs import check_section, not_one_of
from zf_tf.core.errors import UsageError

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# Layers an ablation may remove (paper Table 3); `drop6`/`drop7` go with fc6/fc7.
REMOVABLE = ("conv3", "conv4", "fc6", "fc7")

# Layer 1 geometry: (kernel, stride, zero padding) per style.
LAYER1 = {"zfnet": (7, 2, 1), "alexnet": (11, 4, 2)}


@keras.saving.register_keras_serializable(package="zf_tf")
class FilterRMS(keras.constraints.Constraint):
    """Rescales every conv filter whose RMS exceeds `max_rms` back to `max_rms` (paper Sec. 3).

    A filter is one output channel of a (kh, kw, c_in, c_out) kernel; its RMS is taken over
    (kh, kw, c_in). Filters at or below the radius are left untouched. Keras applies
    constraints after every optimizer update.
    """

    def __init__(self, max_rms: float = 0.1):
        self.max_rms = float(max_rms)

    def __call__(self, w):
        rms = keras.ops.sqrt(keras.ops.mean(keras.ops.square(w), axis=(0, 1, 2), keepdims=True))
        scale = keras.ops.minimum(1.0, self.max_rms / keras.ops.maximum(rms, 1e-12))
        return w * scale

    def get_config(self):
        return {"max_rms": self.max_rms}


@keras.saving.register_keras_serializable(package="zf_tf")
class LocalResponseNorm(keras.layers.Layer):
    """Contrast normalization across feature maps (AlexNet's constants).

    b = a / (bias + alpha * sum_{window of 2*depth_radius+1 maps} a^2) ** beta. TF, like the
    AlexNet paper and unlike Caffe, does not divide alpha by the window size.
    """

    def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, x):
        return tf.nn.local_response_normalization(
            x, depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )
        return config


KERNEL_INITS = ("paper", "he_normal")
ARCHS = ("zfnet", "vgg")  # model.arch: the paper's net, or a small VGG-style BN net
# config.train.precision: Keras dtype policies. The mixed ones compute in 16 bits and keep
# float32 variables; `build_model` keeps the logits (and so the loss) and LRN in float32.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# config.model fields with a range: (field, what it must be, test), checked by check_config.
RANGES = (
    ("dropout", "in [0, 1)", lambda v: 0 <= v < 1),
    ("conv1_init_stddev", ">= 0", lambda v: v >= 0),
)


def check_config(model_config) -> None:
    """Checks `config.model` before anything runs: `arch`, `layer1`, `kernel_init` and each
    `remove` entry among their choices, and the fields of RANGES.

    Raises:
      UsageError: one line naming the first bad field and its valid values.
    """
    m = model_config
    choices = (("arch", ARCHS), ("layer1", tuple(LAYER1)), ("kernel_init", KERNEL_INITS))
    check_section(m, "model", UsageError, choices=choices)
    for name in m.remove:
        message = not_one_of("config.model.remove entry", name, REMOVABLE)
        if message:
            raise UsageError(message)
    check_section(m, "model", UsageError, ranges=RANGES)


def _policies(precision: str) -> tuple[keras.DTypePolicy, keras.DTypePolicy]:
    """(policy of most layers, float32 policy) for `precision`; per layer, not global, so
    that one process can hold float32 and mixed-precision models side by side."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return keras.DTypePolicy(precision), keras.DTypePolicy("float32")


def precision_of(model: keras.Model) -> str:
    """The mixed policy some layer of `model` computes with, else 'float32'."""
    for layer in model.layers:
        name = layer.dtype_policy.name
        if name.startswith("mixed_"):
            return name
        inner = precision_of(layer) if isinstance(layer, keras.Model) else "float32"
        if inner != "float32":  # a nested model's layers
            return inner
    return "float32"


def as_float32(model: keras.Model) -> keras.Model:
    """`model` computing in float32 throughout: the model itself if no layer has a mixed
    policy, else a float32 clone holding its weights (variables are float32 under every
    policy, so they carry over exactly). Analyses inspect models this way: deconvnet
    projections and activations are then computed in full precision.
    """
    if precision_of(model) == "float32":
        return model

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _kernel_initializer(name: str, stddev: float, seed):
    if name == "paper":
        return keras.initializers.RandomNormal(mean=0.0, stddev=stddev, seed=seed)
    if name == "he_normal":
        return keras.initializers.HeNormal(seed=seed)
    raise ValueError(f"model.kernel_init must be one of {', '.join(KERNEL_INITS)}; got {name!r}")


def scaled(units: int, width: float) -> int:
    """Number of units of a layer after applying the width multiplier (at least 1)."""
    return max(1, int(round(units * width)))


def build_vgg(config, precision: str = "float32") -> keras.Model:
    """A small VGG-style convnet with batch normalization (not ZFNet; `model.arch='vgg'`).

    Blocks of [3x3 conv (no bias) -> BatchNormalization -> ReLU] x n, each block ending in a
    2x2 max pool; then global average pooling, dropout and the logits. Layer names:
    block<b>_conv<c>, block<b>_bn<c>, block<b>_relu<c>, block<b>_pool, gap, drop, logits.
    Uses `input_size`, `num_classes`, `input_scale`, `dropout`, `seed` and `vgg_blocks`
    ((filters, convs) per block). `precision` as in `build_model` (BatchNormalization
    keeps its statistics in float32 by itself).
    """
    dtype, float32 = _policies(precision)
    seed = int(config.seed)
    inputs = keras.Input((config.input_size, config.input_size, 3), name="image")
    x = keras.layers.Rescaling(float(config.input_scale), name="input_scale", dtype=dtype)(inputs)
    for b, (filters, convs) in enumerate(config.vgg_blocks, start=1):
        for c in range(1, int(convs) + 1):
            x = keras.layers.Conv2D(
                int(filters),
                3,
                padding="same",
                use_bias=False,
                kernel_initializer=keras.initializers.HeNormal(seed=seed + 10 * b + c),
                name=f"block{b}_conv{c}",
                dtype=dtype,
            )(x)
            x = keras.layers.BatchNormalization(name=f"block{b}_bn{c}", dtype=dtype)(x)
            x = keras.layers.ReLU(name=f"block{b}_relu{c}", dtype=dtype)(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool", dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap", dtype=dtype)(x)
    x = keras.layers.Dropout(config.dropout, seed=seed, name="drop", dtype=dtype)(x)
    logits = keras.layers.Dense(config.num_classes, name="logits", dtype=float32)(x)
    return keras.Model(inputs, logits, name="vgg_small")


def build_model(config, precision: str = "float32") -> keras.Model:
    """Builds ZFNet (or, with `arch='vgg'`, `build_vgg`'s net) from a model config.

    Args:
      config: a ConfigDict (or anything with attributes) with fields `input_size`,
        `num_classes`, `width`, `layer1` ('zfnet' | 'alexnet'), `conv_filters` (5 ints),
        `fc_units` (2 ints), `dropout`, `kernel_init` ('paper' | 'he_normal'),
        `init_stddev`, optionally `conv1_init_stddev` (> 0: conv1 starts from
        N(0, that) whatever `kernel_init`), `input_scale` (factor applied to the input
        pixels, 1 in the paper), `max_filter_rms` (0 disables renormalization), `lrn` (dict of
        LocalResponseNorm arguments), `seed`, and optionally `remove`: names from REMOVABLE
        of layers left out (Table 3 ablations; absent = none). A removed layer is simply
        absent; the next layer takes the previous one's output, so e.g. conv5 reads norm2
        when conv3 and conv4 are removed.
      precision: the dtype policy of the layers, one of PRECISIONS (`config.train.precision`
        at training time; a model section holds none). Under the mixed policies the layers
        compute in bfloat16/float16 with float32 variables, except the logits (so the loss
        is computed from float32 logits) and contrast normalization (TF has no bfloat16 LRN
        kernel on CPU, and XLA compiles no float16 one): those compute in float32.

    Returns:
      An uncompiled `keras.Model` named 'zfnet' mapping (B, s, s, 3) float images (mean
      subtracted) to (B, num_classes) float32 logits.
    """
    arch = getattr(config, "arch", None) or "zfnet"  # configs older than `arch`: ZFNet
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    dtype, float32 = _policies(precision)
    if arch == "vgg":
        return build_vgg(config, precision)
    if config.layer1 not in LAYER1:
        raise ValueError(f"model.layer1 must be one of {', '.join(LAYER1)}; got {config.layer1!r}")
    # Configs written before `remove` existed (older workdirs' config.json) lack the field.
    remove = tuple(getattr(config, "remove", None) or ())
    unknown = [name for name in remove if name not in REMOVABLE]
    if unknown:
        raise ValueError(
            f"model.remove: unknown layer {unknown[0]!r}; removable layers: {', '.join(REMOVABLE)}"
        )
    seed = int(config.seed)
    filters = [scaled(f, config.width) for f in config.conv_filters]
    fc_units = [scaled(u, config.width) for u in config.fc_units]
    constraint = FilterRMS(config.max_filter_rms) if config.max_filter_rms else None
    lrn = dict(config.lrn)

    conv1_stddev = float(getattr(config, "conv1_init_stddev", 0.0) or 0.0)

    def init(i):
        # One distinct seed per layer so layers do not start from identical draws.
        if i == 0 and conv1_stddev > 0:
            return _kernel_initializer("paper", conv1_stddev, seed)
        return _kernel_initializer(config.kernel_init, config.init_stddev, seed + i)

    def conv(i, x, kernel, stride, padding):
        return keras.layers.Conv2D(
            filters[i],
            kernel,
            strides=stride,
            padding=padding,
            activation="relu",
            kernel_initializer=init(i),
            bias_initializer="zeros",
            kernel_constraint=constraint,
            name=CONV_LAYERS[i],
            dtype=dtype,
        )(x)

    k1, s1, p1 = LAYER1[config.layer1]
    inputs = keras.Input((config.input_size, config.input_size, 3), name="image")
    # The paper feeds mean-subtracted pixels (about +-128) straight into conv1 (scale 1);
    # a smaller scale lets variance-preserving inits (He) start at a sane loss.
    x = keras.layers.Rescaling(float(config.input_scale), name="input_scale", dtype=dtype)(inputs)
    x = keras.layers.ZeroPadding2D(p1, name="conv1_pad", dtype=dtype)(x)
    x = conv(0, x, k1, s1, "valid")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool1", dtype=dtype)(x)
    x = LocalResponseNorm(**lrn, name="norm1", dtype=float32)(x)
    x = conv(1, x, 5, 2, "valid")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool2", dtype=dtype)(x)
    x = LocalResponseNorm(**lrn, name="norm2", dtype=float32)(x)
    for i in (2, 3, 4):
        if CONV_LAYERS[i] not in remove:
            x = conv(i, x, 3, 1, "same")
    # At the paper's sizes conv5 is 13x13 and pool5 a 3x3/2 window. Smaller inputs (the
    # AlexNet-style layer 1 at CPU scale leaves conv5 1x1) clip the window to the map.
    window = min(3, int(x.shape[1]), int(x.shape[2]))
    x = keras.layers.MaxPooling2D(window, 2, padding="valid", name="pool5", dtype=dtype)(x)
    x = keras.layers.Flatten(name="flatten", dtype=dtype)(x)
    for i, (name, units) in enumerate(zip(("fc6", "fc7"), fc_units)):
        if name in remove:
            continue
        x = keras.layers.Dense(
            units,
            activation="relu",
            kernel_initializer=init(5 + i),
            bias_initializer="zeros",
            name=name,
            dtype=dtype,
        )(x)
        x = keras.layers.Dropout(
            config.dropout, seed=seed + 10 + i, name=f"drop{6 + i}", dtype=dtype
        )(x)
    logits = keras.layers.Dense(
        config.num_classes,
        kernel_initializer=init(7),
        bias_initializer="zeros",
        name="logits",
        dtype=float32,
    )(x)
    return keras.Model(inputs, logits, name="zfnet")


def _builds(config, size: int) -> bool:
    """Whether the model of `config` (at 1/1000 width: the same geometry) builds at `size`."""
    fields = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
    fields.update(input_size=int(size), width=1e-3)
    try:
        build_model(types.SimpleNamespace(**fields))
    except ValueError:
        return False
    return True


def smallest_input_size(config, largest: int = 1024) -> int:
    """The smallest input side for which the topology of `config` leaves every layer
    non-empty (ZFNet: pool5; 'vgg': the last pool), computed by building narrow copies.

    Raises:
      ValueError: not even `largest` works.
    """
    if not _builds(config, largest):
        raise ValueError(f"the model does not build at any input size up to {largest}")
    lo, hi = 1, largest  # invariant: hi builds
    while lo < hi:
        mid = (lo + hi) // 2
        if _builds(config, mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
