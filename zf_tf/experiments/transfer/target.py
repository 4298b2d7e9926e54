"""The transfer target: `config.transfer` checked and resolved into a data section that
`zf_tf.pipelines.inputs` reads (the target's dataset with the source run's image geometry and
mean), its class names, and the warning when the source already saw the target's classes.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from absl import logging

from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs, sources, tfds_source
from zf_tf.training import workdirs

MODE = "transfer"  # the mode's name, and its folder in a workdir
# The configs that name a target (cited when none is named).
CONFIGS = (
    "configs/transfer_shapes.py",
    "configs/transfer_caltech101.py",
    "configs/transfer_caltech256.py",
    "configs/transfer_voc2012.py",
)
# The command line's target fields that replace the source run's data section.
_TARGET_FIELDS = (
    "source",
    "name",
    "tfds_config",
    "data_dir",
    "manual_dir",
    "folder",
    "train_split",
    "test_split",
    "image_key",
    "label_key",
    "classes",
    "multi_label",
)


@dataclasses.dataclass
class Target:
    """A resolved transfer target: a data section usable by `zf_tf.pipelines.inputs`, plus facts."""

    data: ml_collections.ConfigDict  # the source's geometry and pixels, the target's dataset
    class_names: list[str]
    multi_label: bool
    held_out: bool  # test images come from train_split (those no draw trains on)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_section(config):
    """Raises UsageError unless `config.transfer` names a target."""
    choices = ", ".join(CONFIGS)
    if "transfer" not in config:
        raise UsageError(f"--mode=transfer needs a config with a transfer section: {choices}")
    if not config.transfer.get("name"):
        raise UsageError(
            "--mode=transfer needs a transfer target (config.transfer.name is empty): "
            f"pass --config= one of {choices}"
        )


def label_feature(features, label_key: str):
    """The ClassLabel feature of `label_key` in a tfds FeaturesDict ('a/b' walks nested
    features, e.g. VOC's 'objects/label'; a Sequence yields the ClassLabel it holds)."""
    feature = features
    for key in label_key.split("/"):
        feature = feature[key]
    while not hasattr(feature, "names") and hasattr(feature, "feature"):
        feature = feature.feature
    if not hasattr(feature, "names"):
        raise UsageError(f"config.transfer.data.label_key={label_key!r} is not a class label")
    return feature


def _all_class_names(data) -> list[str]:
    if data.source == "folder":
        root = data.folder
        first = data.train_split.split("+")[0]
        if os.path.isdir(os.path.join(root, first)):
            root = os.path.join(root, first)
        if not os.path.isdir(root):
            raise UsageError(f"config.transfer.data.folder: image folder not found: {root}")
        return sorted(
            d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d[0] != "."
        )
    return list(label_feature(tfds_builder(data).info.features, data.label_key).names)


def tfds_builder(data):
    """The prepared tfds builder of a target read through tfds (sources 'tfds' and
    'embedded'); of any other target, that of the tfds dataset `data.name`."""
    source = inputs.source(data)
    if not isinstance(source, tfds_source.TfdsSource):
        source = inputs.REGISTRY["tfds"]
    return source.builder(data)


def check_config(config):
    """Checks `config.transfer` without reading any data (configs are validated by this).

    Raises:
      UsageError: no transfer target, or an invalid setting, naming the valid choices.
    """
    check_section(config)
    t = config.transfer
    data = t.data
    if data.source not in inputs.SOURCES:
        raise UsageError(
            f"config.transfer.data.source={data.source!r} is not valid: choose one of "
            f"{', '.join(inputs.SOURCES)}"
        )
    if data.source == "folder" and not data.folder:
        raise UsageError(
            "config.transfer.data.source='folder' needs "
            "--config.transfer.data.folder=/path/to/class/subfolders"
        )
    if data.multi_label and data.source == "folder":
        raise UsageError(
            "config.transfer.data.multi_label needs a tfds source (folders have one label)"
        )
    if data.multi_label and data.classes:
        raise UsageError("config.transfer.data.classes is not supported with multi_label")
    per_class = [int(n) for n in t.per_class]
    if not per_class or any(n < 0 for n in per_class) or len(set(per_class)) != len(per_class):
        raise UsageError(
            f"config.transfer.per_class={tuple(t.per_class)}: distinct images-per-class "
            "counts >= 1 (0 = all training images), e.g. (1, 5, 10, 15, 30, 60)"
        )
    if 0 in per_class and not data.test_split:
        raise UsageError(
            "config.transfer.per_class 0 (all training images) needs a separate "
            "config.transfer.data.test_split (nothing would be left to test on)"
        )
    if t.draws < 1:
        raise UsageError(f"config.transfer.draws={t.draws}: must be >= 1")
    if t.scratch.epochs < 0 or t.softmax.steps < 1:
        raise UsageError("config.transfer.scratch.epochs must be >= 0, softmax.steps >= 1")


def resolve_target(config) -> Target:
    """The target dataset of `config.transfer.data` with the source run's image geometry.

    Args:
      config: the source workdir's config with the command line's `transfer` section.

    Returns:
      A Target (class names read from the dataset: tfds may prepare it first).

    Raises:
      UsageError: an invalid target setting, naming the valid choices.
    """
    check_config(config)
    resolved = workdirs.config_json(config)
    fields = dict(resolved["data"])  # the source's geometry and preprocessing (and old fields)
    fields.update({k: resolved["transfer"]["data"][k] for k in _TARGET_FIELDS})
    # Features are streamed once, so keeping decoded squares of a large target is pointless.
    fields["cache"] = False
    data = ml_collections.ConfigDict(fields)
    names = _all_class_names(data)
    classes = sources.selected_classes(data)
    bad = [c for c in classes if not 0 <= c < len(names)]
    if bad or len(set(classes)) != len(classes):
        raise UsageError(
            f"config.transfer.data.classes={classes}: must be distinct ids in 0..{len(names) - 1}"
        )
    if classes:
        names = [names[c] for c in classes]
    return Target(data, names, bool(data.multi_label), not data.test_split)


def source_overlap_warning(config, target: Target):
    """Warns when the source was trained on the target's images' classes (no transfer)."""
    src = config.data
    same = all(src.get(k) == target.data.get(k) for k in ("source", "name", "tfds_config"))
    if src.get("source") == "folder":
        same = same and src.get("folder") == target.data.folder
    if not same:
        return
    src_classes = set(sources.selected_classes(src)) or set(range(int(src.num_classes)))
    tgt_classes = set(sources.selected_classes(target.data)) or set(range(target.num_classes))
    if src_classes & tgt_classes:
        logging.warning(
            "The source run was trained on target classes %s of the same dataset: this "
            "measures no transfer (pretrain on the other classes, e.g. configs/pretrain_shapes.py)",
            sorted(src_classes & tgt_classes),
        )
