"""The one analysis interface and the runner that does every analysis' shared skeleton once.

An analysis is a module that defines one `Analysis` object, `ANALYSIS`, made of:
  settings(config, request) -> Settings   typed settings (a frozen dataclass) read from
                                          `config.analysis.<name>` and the request, checked
                                          (UsageError) before anything is loaded or written
  outputs(settings) -> (dir, names)       where its files go: WORKDIR/<dir>/<name>
  load(config, settings, model) -> data   the examples (or snapshots, a second model, ...)
  compute(model, data, settings) -> dict  arrays and plain values: no files, no flags, no
                                          printing; what tests call directly
  render(result, settings, paths) -> Report
                                          writes the files in `paths` (PNG, npz, json, md)
                                          and returns the TensorBoard images and the lines
                                          to print
  resolve(settings, model, source) -> Settings
                                          the settings completed from the model (layer
                                          names default to the model's own: its first or
                                          last conv layer, its penultimate dense layer)
                                          and checked against it (UsageError)
`run(analysis, config, request)` opens the model source (`sources`: the workdir's model or
`--model`), checks the settings, loads the model, resolves the settings against it, checks
the outputs, loads the data, computes, renders, writes the TensorBoard images and prints,
in that order, so a refused run (bad setting, layer or model, existing outputs, unknown
split) writes nothing.

Adding an analysis: one module under zf_tf/analyses/ defining `ANALYSIS`, and its mode name
in `REGISTRY` (zf_tf/analyses/__init__.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import zipfile
from typing import Any, Callable

import numpy as np

from zf_tf import outputs
from zf_tf.analyses import sources
from zf_tf.configs import check_section
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples, inputs
from zf_tf.training import workdirs


@dataclasses.dataclass(frozen=True)
class Request:
    """What the command line asks of a mode beyond its config: where, and on which model.
    Every analysis option is a field of `config.analysis` (configs/default.py).

    Attributes:
      workdir: the trained workdir; outputs go under it.
      overwrite: replace existing outputs.
      model: look inside this model instead of the workdir's: a .keras file or a
        keras.applications name (`sources`).
      weights: a local weights file for a keras.applications `model`.
      overridden: the config keys set on the command line (dotted, e.g.
        'data.crop_size'): they win over what a `model` implies.
    """

    workdir: str
    overwrite: bool = False
    model: str = ""
    weights: str = ""
    overridden: tuple = ()


def analysis_split(config) -> str:
    """The split an analysis uses: `config.analysis.split`, '' = the data's eval split."""
    return str(config.analysis.split or config.data.eval_split)


def integer(config, mode: str, name: str = "num_images", least: int = 1) -> int:
    """`config.analysis.<mode>.<name>`, checked to be an integer of at least `least`.

    Raises:
      UsageError: naming the field.
    """
    value = config.analysis[mode][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UsageError(
            f"config.analysis.{mode}.{name}={value!r}: give an integer of at least {least}"
        )
    return value


@dataclasses.dataclass
class Report:
    """What `render` hands back to the runner.

    Attributes:
      images: {TensorBoard tag: uint8 (H, W, 3)} written to WORKDIR/logs/<tensorboard_run>.
      lines: printed to stdout, before the "Wrote ..." line.
      summary: a JSON-able dict returned to the caller (e.g. what a .json file holds).
    """

    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    lines: list[str] = dataclasses.field(default_factory=list)
    summary: Any = None


@dataclasses.dataclass
class Result:
    """What `run` returns: the computed arrays, the paths written and the report."""

    result: dict
    paths: dict[str, str]
    report: Report


def check_config(analysis) -> None:
    """Checks what the analyses share in `config.analysis` before anything runs
    (`batch_size` >= 1); each analysis checks its own settings in `settings`.

    Raises:
      UsageError: one line naming the field and its range.
    """
    check_section(
        analysis, "analysis", UsageError, ranges=(("batch_size", ">= 1", lambda v: v >= 1),)
    )


def load_examples(config, split: str, num: int, labels=()):
    """The first `num` center crops of `split` (`zf_tf.pipelines.examples.load_examples`); with
    `labels` (class ids), the first of each class in turn, `num` shared among them (the
    first classes get one more when it does not divide).

    Raises:
      UsageError: the split has no images (of one of the classes).
    """

    if not labels:
        found = examples.load_examples(config, split, num)
        if not len(found):
            raise UsageError(f"split {split!r} has no images")
        return found
    parts = []
    for i, label in enumerate(labels):
        per = num // len(labels) + (i < num % len(labels))
        found = examples.load_examples(config, split, per, label=int(label))
        if per and not len(found):
            raise UsageError(f"split {split!r} has no images of class {label}")
        parts.append(found)
    annotated = parts[0].boxes is not None
    return examples.Examples(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        indices=np.concatenate([p.indices for p in parts]),
        boxes=np.concatenate([p.boxes for p in parts]) if annotated else None,
        masks=np.concatenate([p.masks for p in parts]) if annotated else None,
    )


def class_names(config, data_names=None) -> list[str]:
    """The classes' names in label order as figures show them: the data's names
    (`data_names`, else `inputs.class_names`), through `config.analysis.class_names` where
    it names them."""
    names = inputs.class_names(config.data) if data_names is None else data_names
    shown = config.get("analysis", {}).get("class_names", None) or {}
    return [str(shown.get(n, n)) for n in names]


def class_ids(config, key: str, classes) -> tuple[int, ...]:
    """Label ids of `classes` (class names of `config.data`, their shown names, or ids),
    for `config.<key>`.

    Raises:
      UsageError: an unknown name or id, naming the valid ones.
    """
    if not classes:
        return ()
    data_names = list(inputs.class_names(config.data))
    names = class_names(config, data_names)
    out = []
    for c in classes:
        if isinstance(c, str) and c in data_names:
            out.append(data_names.index(c))
        elif isinstance(c, str) and c in names:
            out.append(names.index(c))
        elif str(c).isdigit() and int(c) < len(names):
            out.append(int(c))
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise UsageError(
                f"config.{key}: {c!r} is not a class: choose names ({shown}) or ids "
                f"0..{len(names) - 1}"
            )
    return tuple(out)


def check_layer(layer: str, valid, what: str = "--layer=", **wording) -> str:
    """`layer` if it is one of the layer names `valid`, else UsageError (`layer_error`, with
    its `wording` keywords), e.g. "--layer='fc6' is not valid: choose one of conv1, pool1,
    conv2". Every analysis checks its layers with it.

    Raises:
      UsageError: `layer` is not in `valid`.
    """
    if layer not in valid:
        raise layer_error(layer, valid, what, **wording)
    return layer


def layer_error(
    layer: str,
    valid,
    what: str = "--layer=",
    *,
    problem: str = "is not valid",
    choose: str = "choose one of",
    none: str = "",
    after: str = "",
) -> UsageError:
    """The one-line error for a layer that is not valid:
    '<what><layer!r> <problem>: <choose> a, b, c<after>' (a, b, c: `valid`). `none`, where
    given, replaces '<choose> ...' when `valid` is empty."""
    choices = f"{choose} {', '.join(valid)}" if valid or not none else none
    return UsageError(f"{what}{layer!r} {problem}: {choices}{after}")


def default_load(config, settings, model):
    """`load` for analyses that need nothing besides the model."""
    return None


def default_resolve(settings, model, source):
    """`resolve` for analyses whose settings do not depend on the model."""
    return settings


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analysis: see the module docstring for the contract of each function.

    Attributes:
      name: the mode name (`--mode=<name>`), the TensorBoard run and the default out dir.
      settings, outputs, load, compute, render, resolve: the parts (module docstring).
      needs_model: False for analyses that read only workdir files (evolution).
      distributed: `compute` takes the run's tf.distribute strategy as a fourth argument
        (atlas: the scan is split over its replicas and workers).
    """

    name: str
    settings: Callable
    outputs: Callable
    compute: Callable
    render: Callable
    load: Callable = default_load
    resolve: Callable = default_resolve
    needs_model: bool = True
    distributed: bool = False


def load_model(config, request: Request):
    """The workdir's trained model, or a freshly initialized one with
    `config.analysis.untrained`."""

    if config.analysis.untrained:
        return model_lib.build_model(config.model)
    return workdirs.load_model(request.workdir)


def run(analysis: Analysis, config, request: Request, strategy=None) -> Result:
    """Runs one analysis: the shared skeleton of every analysis mode.

    Args:
      analysis: the analysis (a module's `ANALYSIS`).
      config: the workdir's config, with `config.analysis` from the command line
        (`workdirs.load_config`); with `request.model`, the command line's config.
      request: the command line's request.
      strategy: the tf.distribute strategy of `--strategy`, for `distributed` analyses.

    Returns:
      Result(result=compute's dict, paths={name: path}, report=render's Report).

    Raises:
      UsageError / DataError: a bad setting, model source or layer, an unknown split,
        outputs that exist without `request.overwrite`, no trained model.
    """
    # A distributed analysis' model is made in the strategy's scope: its replicas then
    # hold copies of the weights instead of reading them from where they live.
    in_scope = analysis.distributed and strategy is not None
    with strategy.scope() if in_scope else contextlib.nullcontext():
        source = sources.open_source(config, request) if analysis.needs_model else None
        if source is not None:
            config = source.config
        settings = analysis.settings(config, request)
        model = None
        if analysis.needs_model:
            model = source.model if source.model is not None else load_model(config, request)
            settings = analysis.resolve(settings, model, source)
    out_dir, names = analysis.outputs(settings)
    paths = outputs.reserve(request.workdir, out_dir, names, request.overwrite)
    if source is not None and source.description:
        print(source.description)
    data = analysis.load(config, settings, model)
    if analysis.distributed:
        result = analysis.compute(model, data, settings, strategy)
    else:
        result = analysis.compute(model, data, settings)
    report = analysis.render(result, settings, paths)
    for tag, image in report.images.items():
        outputs.write_tensorboard(request.workdir, analysis.name, tag, image)
    for line in report.lines:
        print(line)
    written = [p for p in paths.values() if os.path.exists(p)]
    if written:
        print(f"Wrote {', '.join(written)}")
    kept = {name: path for name, path in paths.items() if path in written}
    return Result(result=result, paths=kept, report=report)


# ---------------------------------------------------------------------------------------------
# Caches of analyses that resume (atlas, featvis): npz files keyed by what made them
# ---------------------------------------------------------------------------------------------


def weights_fingerprint(model) -> str:
    """A digest of the model's weights (names, shapes, values): changes when they do."""
    digest = hashlib.sha1()
    for w in model.weights:
        value = np.ascontiguousarray(np.asarray(w))
        digest.update(f"{w.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def read_cache(path: str, key: str, names=None) -> dict | None:
    """The arrays (all, or those `names`) of a cache file made with `key`; None if absent,
    stale or damaged. An npz member is decompressed only when read: `names=()` checks the
    key alone."""
    try:
        with np.load(path) as f:
            if str(f["key"]) != key:
                return None
            wanted = [n for n in f.files if n != "key"] if names is None else names
            return {name: f[name] for name in wanted}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_cache(path: str, key: str, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    outputs.save_npz(path, compressed=True, key=np.array(key), **arrays)
