"""Which model an inspection mode looks inside: `--model` and `--weights`.

  (no --model)                the workdir's trained ZFNet (or `--untrained`: a fresh one)
  --model=PATH.keras          a Keras model file (.keras, or a legacy .h5)
  --model=vgg16 ...           a keras.applications builder (`APPLICATIONS`), with
    [--weights=FILE]          a local weights file; never a download: without --weights
                              the model is randomly initialized and the output says so

The data still comes from `config.data` (the command line's config when `--model` is
given). The model decides what the data must look like: its input size becomes
`config.data.crop_size` (the resize size keeps the config's ratio), unless the model takes
any size, when `--config.data.crop_size` decides; a keras.applications family brings its
own pixel preprocessing ('caffe' for VGG and ResNet, 'tf' for MobileNet and Inception, ...)
unless `--config.data.preprocessing` is given. keras.applications classifiers are built
with logits outputs (`classifier_activation=None`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile

import keras
import ml_collections

from zf_tf.core import graph
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs
from zf_tf.training import workdirs

# --model name -> (keras.applications builder, its preprocessing, its native input size).
APPLICATIONS = {
    "vgg16": ("VGG16", "caffe", 224),
    "vgg19": ("VGG19", "caffe", 224),
    "resnet50": ("ResNet50", "caffe", 224),
    "resnet101": ("ResNet101", "caffe", 224),
    "resnet152": ("ResNet152", "caffe", 224),
    "resnet50_v2": ("ResNet50V2", "tf", 224),
    "mobilenet": ("MobileNet", "tf", 224),
    "mobilenet_v2": ("MobileNetV2", "tf", 224),
    "inception_v3": ("InceptionV3", "tf", 299),
    "xception": ("Xception", "tf", 299),
    "densenet121": ("DenseNet121", "torch", 224),
    "efficientnet_b0": ("EfficientNetB0", "raw", 224),
    "mobilenet_v3_small": ("MobileNetV3Small", "raw", 224),  # hard swish, SE gates
    "convnext_tiny": ("ConvNeXtTiny", "raw", 224),  # LayerNorm, GELU, depthwise 7x7
}
MODEL_FILES = (".keras", ".h5")


@dataclasses.dataclass
class Source:
    """A model to look inside and the config adapted to it.

    Attributes:
      model: the Keras model, with a static input size (None: the workdir's, loaded later).
      config: the config whose `data` section matches the model (crop size, preprocessing).
      description: one line saying what the model is (printed by the runner).
      own_labels: whether the model's outputs are the classes of `config.data` (the
        workdir's model) or unknown (a model brought along: explain the predicted class).
    """

    model: object
    config: object
    description: str = ""
    own_labels: bool = True

    def labels_apply(self, split: str) -> bool:
        """Whether `split`'s labels are classes of the model: its own data (not a model
        brought along) and not a flat folder of unlabeled images. Where they do not,
        attribution and occlusion explain the predicted class."""

        return self.own_labels and inputs.is_labeled(self.config.data, split)


def check(request) -> None:
    """Validates --model and --weights without loading anything.

    Raises:
      UsageError: an unknown name that is not a model file, a missing file, or --weights
        without a keras.applications --model.
    """
    spec, weights = request.model, request.weights
    if weights and not spec:
        raise UsageError("--weights needs --model=NAME (a keras.applications model)")
    if not spec:
        return
    if spec.lower() in APPLICATIONS:
        if weights and not os.path.isfile(weights):
            raise UsageError(f"--weights={weights}: no such file")
        return
    if weights:
        raise UsageError(
            f"--weights goes with a keras.applications --model ({', '.join(APPLICATIONS)}); "
            f"{spec} holds its own weights"
        )
    if os.path.isdir(spec):
        raise UsageError(
            f"--model={spec} is a directory (a SavedModel?): Keras 3 cannot look inside a "
            "SavedModel's layers; save the model as a .keras file (model.save('m.keras'))"
        )
    if not os.path.isfile(spec):
        raise UsageError(
            f"--model={spec}: no such file, and not a keras.applications name: choose a "
            f"{' or '.join(MODEL_FILES)} file or one of {', '.join(APPLICATIONS)}"
        )
    if not spec.endswith(MODEL_FILES):
        raise UsageError(f"--model={spec}: not a Keras model file ({', '.join(MODEL_FILES)})")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _build_application(name: str, weights: str, size: int, overridden: set):
    """(model, description) of a keras.applications builder at its native size (its
    classifier top, logits; without it when `weights` is a no-top file) or, when the
    command line sets another crop size, without its top at that size."""
    builder_name, _, native = APPLICATIONS[name]
    builder = getattr(keras.applications, builder_name)
    sized = "data.crop_size" in overridden and size != native
    attempts = [] if sized else [dict(include_top=True, classifier_activation=None)]
    side = size if sized else native
    attempts.append(dict(include_top=False, input_shape=(side, side, 3)))
    errors, counts = [], []
    for kwargs in attempts:
        try:
            with warnings.catch_warnings():  # Keras warns per layer that does not fit
                warnings.simplefilter("ignore")
                model = builder(weights=weights or None, **kwargs)
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
            errors.append(_first_line(e))
            if weights:  # the model as built, without the weights, for the message
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    n = _layers_with_weights(builder(weights=None, **kwargs))
                top = "with its classifier" if kwargs["include_top"] else "without its top"
                counts.append(f"{n} {top}")
            continue
        top = "with its classifier" if kwargs["include_top"] else "without its top"
        if weights:
            what = f"weights from {weights}"
        else:
            what = "RANDOM weights (no --weights given: nothing is downloaded)"
        return model, f"model: keras.applications.{builder_name} {top}, {what}"

    if weights.endswith(".keras"):  # a whole model's file: its archive is checked
        held, damaged = None, workdirs.damage(weights) is not None
    else:  # a weights file: its layers are counted (None: not HDF5)
        held = _layers_in_weights_file(weights)
        damaged = held is None
    if damaged:
        raise UsageError(f"--weights={weights} is damaged or not a Keras weights file")
    if held is not None and counts:
        raise UsageError(
            f"--weights={weights} does not fit {name}: the file holds the weights of {held} "
            f"layers, {name} has layers with weights: {' or '.join(counts)} (weights of "
            "another network?)"
        )
    raise UsageError(f"--weights={weights} does not fit {name}: {errors[-1][:200]}")


def _layers_with_weights(model) -> int:
    return sum(1 for layer in model._flatten_layers(include_self=False) if layer.weights)


def _layers_in_weights_file(path: str) -> int | None:
    """The layers (groups holding variables) in a Keras .weights.h5 / .h5 file, or None
    when it is not an HDF5 file."""
    import h5py

    groups = set()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            groups.add(name.rsplit("/vars/", 1)[0] if "/vars/" in name else name.rsplit("/", 1)[0])

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError:
        return None
    return len(groups)


def _load_file(path: str):

    why = workdirs.damage(path) if path.endswith(".keras") else None
    if why is not None:
        raise UsageError(f"--model={path} is damaged or not a Keras file ({why})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file can raise anything
        raise UsageError(f"cannot load --model={path}: {_first_line(e)[:300]}") from None
    if len(model.inputs) != 1:
        names = ", ".join(t.name for t in model.inputs)
        raise UsageError(
            f"--model={path} has {len(model.inputs)} inputs ({names}): the analyses look "
            "inside models of one image input; save a model of one input (e.g. "
            "keras.Model(image_input, outputs) with the others fixed)"
        )
    model = model_lib.as_float32(model)  # a mixed-precision model is inspected in float32
    return model, f"model: {path} ({model.name}, {model.count_params():,} parameters)"


def _adapt(config, size: int, preprocessing: str | None, overridden: set):
    """A copy of `config` whose data section fits a model with `size` px inputs."""

    adapted = ml_collections.ConfigDict(workdirs.config_json(config))
    data = adapted.data
    if "data.crop_size" in overridden and int(data.crop_size) != size:
        raise UsageError(
            f"the model takes {size} px inputs; --config.data.crop_size={data.crop_size} differs"
        )
    if int(data.crop_size) != size:
        ratio = float(data.resize_size) / float(data.crop_size)
        data.resize_size = max(size, int(round(size * ratio)))
        data.crop_size = size
        if "model" in adapted and "input_size" in adapted.model:
            adapted.model.input_size = size
    if preprocessing and "data.preprocessing" not in overridden:
        data.preprocessing = preprocessing
    return adapted


def check_layout(model, shape, what: str):
    """Raises UsageError unless the model reads channels-last, square RGB images (the
    scans, projections, receptive fields and atlas pages assume H = W)."""
    nested = [model]
    while nested:
        for layer in nested.pop().layers:
            if getattr(layer, "data_format", None) == "channels_first":
                raise UsageError(
                    f"{what} is channels-first (layer {layer.name!r}; input {shape}): the "
                    "analyses read channels-last models: rebuild it with "
                    "data_format='channels_last'"
                )
            if isinstance(layer, keras.Model):
                nested.append(layer)
    if shape[2] != 3:
        raise UsageError(f"{what} takes {shape[2]}-channel images; RGB only")
    if None not in shape[:2] and shape[0] != shape[1]:
        raise UsageError(
            f"{what} takes {shape[0]} x {shape[1]} images: the analyses need square inputs "
            "(H = W); rebuild it on square inputs"
        )


def open_source(config, request) -> Source:
    """The model `request` asks for and the config adapted to it.

    Without `request.model` the model is left to the runner (the workdir's, loaded after
    the settings are checked) and `config` is returned as is.

    Raises:
      UsageError: bad --model / --weights (see `check`), a file that does not load, or a
        model without image inputs.
    """
    check(request)
    if not request.model:
        return Source(model=None, config=config)
    overridden = set(request.overridden)
    name = request.model.lower()
    if name in APPLICATIONS:
        model, description = _build_application(
            name, request.weights, int(config.data.crop_size), overridden
        )
        preprocessing = APPLICATIONS[name][1]
    else:
        model, description = _load_file(request.model)
        preprocessing = None
    try:
        shape = graph.input_shape(model)
    except ValueError as e:
        raise UsageError(f"--model={request.model}: {e}") from None
    check_layout(model, shape, f"--model={request.model}")
    size = int(config.data.crop_size) if shape[0] is None else int(shape[0])
    if shape[0] is None:
        model = graph.fixed_input(model, size)
    return Source(
        model=model,
        config=_adapt(config, size, preprocessing, overridden),
        description=description,
        own_labels=False,
    )
