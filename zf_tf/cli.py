"""The command line: flags -> typed settings -> one dispatch; library errors -> one line.

`main.py` defines the absl flags and calls `parse_flags` and `main`. absl parses the flags
it knows; what is left of the command line is the config's overrides (`--config.a.b=v`),
which `apply_overrides` sets on the config loaded from `--config=FILE[:ARG]`
(`load_config`); `validate_config` has each section checked by the module that owns it.
A library error (`UsageError`, `zf_tf.pipelines.DataError`, a missing file) or a
file-system fault (a read-only or full disk: `errors.file_system_fault`) becomes
`error: <message>` on stderr and exit status 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import sys

from absl import flags, logging

from zf_tf import analyses
from zf_tf.analyses import base as analyses_base
from zf_tf.configs import default as default_config
from zf_tf.core import interrupts
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError, file_system_fault
from zf_tf.experiments import ablate, transfer
from zf_tf.pipelines import DataError, inputs, prepare, service
from zf_tf.training import evaluate, export, train, workdirs
from zf_tf.training.strategies import (  # noqa: F401 - main.py
    CLUSTER_TIMEOUT,
    STRATEGIES,
    make_strategy,
)

DEFAULT_CONFIG = "configs/default.py"
OVERRIDE_PREFIX = "--config."
# Short flags that only set a config field (`alias_overrides`): --NAME=V sets
# config.analysis.<mode>.NAME where the mode's section has NAME, else config.analysis.NAME.
# {flag: (absl kind, what it is)}; the help lists the modes that have it (`alias_help`).
ALIASES = {
    "layer": ("string", "Layer to look at; default: the model's last conv layer."),
    "layers": ("string", "Comma-separated layers, e.g. conv3,conv5."),
    "split": ("string", "Split to use; default: the data's eval split."),
    "top_k": ("integer", "Strongest activations kept per feature map."),
    "features": ("string", "Comma-separated feature maps (units) to show, e.g. 0,5,17."),
    "num_features": ("integer", "Seeded random feature maps (units) to show; <= 0: all."),
    "num_images": ("integer", "Images to analyse."),
    "image": ("string", "Project the strongest maps of this one image file instead."),
    "parts": ("string", "JSON file {image: {part: [y0, x0, y1, x1]}}."),
    "compare": ("string", "Workdir of a second model shown beside this one."),
    "untrained": ("bool", "Use a freshly initialized model (no checkpoint needed)."),
}


def quiet():
    """The default console of main.py: no INFO logs (absl, TensorFlow), no retracing
    warnings, no Keras warnings about datasets that end an epoch early (every finite
    validation set does) or about `shuffle` with a tf.data input."""
    import warnings

    import tensorflow as tf

    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")
    for message in ("Your input ran out of data", "`shuffle=True` was passed"):
        warnings.filterwarnings("ignore", message=f"(?s).*{message}", category=UserWarning)


def fail(message: str):
    """Prints `error: message` on one line to stderr and exits with status 1. Where stdout
    and stderr meet (a terminal, `2>&1` into a log), the line a progress bar was drawing
    is ended first, so the error starts a line of its own."""
    if sys.stdout.isatty() or _same_file(sys.stdout, sys.stderr):
        print(file=sys.stdout, flush=True)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _same_file(a, b) -> bool:
    try:
        x, y = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):  # pytest's capture has no file number
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


# ---------------------------------------------------------------------------------------------
# Configs: loading a get_config() file and applying --config.a.b=v overrides
# ---------------------------------------------------------------------------------------------


def load_config(spec: str):
    """Loads `FILE[:ARG]`: the ConfigDict of FILE's `get_config()` (or `get_config(ARG)`).

    A relative FILE is tried against the working directory, then against the package's
    folder: `--config=configs/x.py` names the config zf_tf ships (zf_tf/configs/x.py) from
    any directory, installed or in a checkout.

    Raises:
      UsageError: no such file, or the file fails to load or build its config.
    """
    path, *arg = spec.split(":", 1)
    package = os.path.dirname(os.path.abspath(__file__))
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(package, path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise UsageError(f"bad --config {spec}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location("zf_tf_config", found)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = module.get_config
    except Exception as e:  # noqa: BLE001 - a config file can raise anything
        raise UsageError(f"bad --config {spec}: {_first_line(e)}") from None
    try:
        return get_config(*arg)
    except Exception as e:  # noqa: BLE001 - get_config's own errors (e.g. a bad variant)
        raise UsageError(f"bad --config {spec}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().strip("'\"")
    return text.splitlines()[0] if text else type(e).__name__


def _parse_value(key: str, text: str, current):
    """`text` parsed as the type of the field's current value."""

    def literal(t):
        try:
            return ast.literal_eval(t)
        except (ValueError, SyntaxError):
            return t

    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = literal(text)
            if isinstance(value, str):  # a,b,c without quotes or brackets
                items = [v.strip() for v in text.split(",")]
                if text.strip() and not all(items):
                    raise ValueError("it has an empty entry")
                value = tuple(literal(v) for v in items if v)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(current)(value)
        return literal(text)  # None and other types: a Python literal, else the string
    except ValueError as e:
        kind = type(current).__name__
        raise UsageError(f"--config.{key}={text}: not a valid {kind} ({e})") from None


def apply_overrides(config, overrides: list[tuple[str, str]]):
    """Sets each (dotted key, text value) on `config`, parsing by the field's type.

    Fields that share a FieldReference (data.crop_size and model.input_size) change
    together. New keys are refused.

    Raises:
      UsageError: an unknown key (naming the valid keys where it fails), a section given a
        value, or a value that does not parse as the field's type.
    """
    for key, text in overrides:
        node, walked = config, []
        parts = key.split(".")
        for part in parts[:-1]:
            if not hasattr(node, "keys") or part not in node:
                break
            node = node[part]
            walked.append(part)
        last = parts[len(walked)]
        if len(walked) < len(parts) - 1 or not hasattr(node, "keys") or last not in node:
            where = ".".join(walked) or "the config"
            choices = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
            raise UsageError(f"unknown config key {key!r}: valid keys of {where}: {choices}")
        current = node[last]
        if hasattr(current, "keys"):
            raise UsageError(
                f"--config.{key} is a section: set one of its keys, e.g. --config.{key}."
                f"{sorted(current.keys())[0]}=..."
            )
        node[last] = _parse_value(key, text, current)


def split_arguments(args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separates what absl left unparsed into config overrides and anything else.

    Returns:
      ([(dotted key, text value)], [other arguments]).
    """
    overrides, other = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(OVERRIDE_PREFIX):
            key, eq, value = arg[len(OVERRIDE_PREFIX) :].partition("=")
            if not eq:  # --config.a.b VALUE
                if i + 1 >= len(args):
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE")
                i += 1
                value = args[i]
            overrides.append((key, value))
        else:
            other.append(arg)
        i += 1
    return overrides, other


def parse_flags(flag_values, argv):
    """absl's parse of the flags it knows, a bad value becoming one line; the rest of the
    command line (config overrides, stray words) is returned for `main`."""
    try:
        return flag_values(argv, known_only=True)
    except flags.Error as e:
        fail(str(e))


def resolved_config(spec: str, args: list[str], mode: str = "", aliases=None):
    """The config of `spec` with the overrides among `args` applied (after those of the
    `aliases` {flag: value} of `mode`: an explicit --config.a.b wins), then locked.

    Raises:
      UsageError: a bad config file or override, an alias the mode has no field for, or
        an argument that is neither a known flag nor an override.
    """
    overrides, other = split_arguments(args)
    unknown_flags = [a for a in other if a.startswith("-")]
    if unknown_flags:
        raise UsageError(f"unknown flag {unknown_flags[0]}: see --helpfull for the flags")
    if other:
        raise UsageError(f"unexpected arguments: {' '.join(other)}")
    config = load_config(spec)
    workdirs.upgrade(config)  # a config file written before some fields existed
    apply_overrides(config, alias_overrides(config, mode, aliases or {}) + overrides)
    config.lock()
    return config


def alias_key(config, mode: str, name: str) -> str:
    """The dotted config key alias flag `--name` sets under `mode`: analysis.<mode>.<name>
    where the mode's section has the field, else analysis.<name>.

    Raises:
      UsageError: neither exists, naming the modes that have the field.
    """
    analysis = config.analysis
    section = analysis.get(mode)
    if hasattr(section, "keys") and name in section:
        return f"analysis.{mode}.{name}"
    if name in analysis and not hasattr(analysis[name], "keys"):
        return f"analysis.{name}"
    having = alias_modes(config, name)
    raise UsageError(
        f"--{name} does not apply to --mode={mode}: it sets config.analysis.<mode>.{name}, "
        f"which --mode={', '.join(having)} {'has' if len(having) == 1 else 'have'}"
    )


def alias_modes(config, name: str) -> list[str]:
    """The analysis modes whose config section has field `name`."""
    return [m for m, v in config.analysis.items() if hasattr(v, "keys") and name in v]


def alias_overrides(config, mode: str, aliases: dict) -> list[tuple[str, str]]:
    """(dotted key, text value) overrides of the alias flags given, {flag: value}."""
    return [
        (
            alias_key(config, mode, name),
            str(value).lower() if isinstance(value, bool) else str(value),
        )
        for name, value in aliases.items()
    ]


def alias_help(name: str) -> str:
    """Alias flag `name`'s help: what it is and the config field it sets (of which modes,
    read from configs/default.py)."""
    config = default_config.get_config()
    what = ALIASES[name][1]
    modes = alias_modes(config, name)
    if modes:
        return f"{what} Sets config.analysis.<mode>.{name} of --mode={', '.join(modes)}."
    return f"{what} Sets config.analysis.{name}."


def given_aliases(flag_values) -> dict:
    """{flag: value} of the alias flags on the command line (theirs default to None)."""
    values = {name: getattr(flag_values, name, None) for name in ALIASES}
    return {name: value for name, value in values.items() if value is not None}


def validate_config(config):
    """Checks every section of a config before anything runs, each by the module that owns
    it: data (`inputs.check_config`), model (`model.check_config`), train
    (`train.check_config`), prepare (`prepare.check_config`) and the analyses' shared
    fields (`analyses.base.check_config`); the first bad field is reported.

    Raises:
      DataError: a bad config.data or config.prepare field, naming its valid values.
      UsageError: a bad field of the other sections, naming its valid values.
    """
    inputs.check_config(config.data)
    model_lib.check_config(config.model)
    train.check_config(config.train)
    prepare.check_config(config.prepare)
    analyses_base.check_config(config.analysis)


def check_training(config, strategy, strategy_name: str):
    """What training needs beyond `validate_config`: a global training batch that splits
    evenly over the strategy's replicas (evaluation batches may split unevenly) and an input
    large enough for the model's topology.

    Raises:
      UsageError: naming the field and the values that work.
      DataError: an image folder laid out for no classifier (`inputs.check_layout`).
    """

    replicas = strategy.num_replicas_in_sync
    value = int(config.train.batch_size)  # evaluation batches may split unevenly
    if value % replicas:
        raise UsageError(
            f"config.train.batch_size={value} does not split over the {replicas} replicas of "
            f"--strategy={strategy_name}: use a multiple of {replicas}"
        )
    inputs.check_layout(config.data)
    size = int(config.model.input_size)
    smallest = model_lib.smallest_input_size(config.model)
    if size < smallest:
        raise UsageError(
            f"config.data.crop_size={size} is too small for this model: its smallest input "
            f"that leaves every layer non-empty is {smallest} px (--config.data.crop_size="
            f"{smallest} or more, and resize_size at least that)"
        )


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def _summary(config, request, strategy):
    """Prints the model's layers and one batch of the training pipeline."""

    with strategy.scope():
        model = model_lib.build_model(config.model)
    model.summary(print_fn=lambda line, **_: print(line))
    images, labels = next(iter(inputs.build_inputs(config, config.data.train_split)))
    summary = {
        "batch": list(images.shape),
        "labels": labels.numpy()[:8].tolist(),
        "model_input_size": config.model.input_size,
    }
    print(json.dumps(summary))


def _train(config, request, strategy):

    train.train_and_evaluate(config, request.workdir, strategy, request.overwrite)


def _eval(config, request, strategy):

    evaluate.evaluate(config, request.workdir, workdirs.load_model(request.workdir))
    print(f"Wrote {os.path.join(request.workdir, 'eval.json')}, eval.md")


def _export(config, request, strategy):

    path = export.export(workdirs.load_model(request.workdir), config, request.workdir)
    print(f"Wrote {path} (SavedModel: saved_model_cli show --dir {path} --all)")


def _ablate(config, request, strategy):
    """Paper Table 3: trains every variant of config.ablate in WORKDIR/ablate/<variant>/
    (the command line's config is the base; the workdir's own run is not read or touched)."""

    ablate.run(config, request.workdir, strategy, request.overwrite)


def _transfer(config, request, strategy):
    """Tables 4-6, Fig. 9: the workdir's model is the source, --config's `transfer` the
    target."""

    transfer.run_mode(config, request.workdir, request.overwrite)


def _prepare(config, request, strategy):
    """Writes the source's splits once as shards of S x S squares (zf_tf/pipelines/prepare.py)
    in config.data.prepared_dir; the workdir is not read or touched."""

    out = config.data.prepared_dir
    if not out:
        raise UsageError("--mode=prepare needs --config.data.prepared_dir=DIR (where shards go)")
    data = config.data
    splits = tuple(config.prepare.splits) or tuple(
        dict.fromkeys((data.train_split, data.eval_split))
    )
    workdirs.check_writable(out)
    with workdirs.lock(out):
        prepare.prepare(
            data,
            out,
            splits,
            jpeg_quality=config.prepare.jpeg_quality,
            shard_size=config.prepare.shard_size,
            overwrite=request.overwrite,
            encoding=config.prepare.encoding,
        )
    print(
        f"Wrote {out} ({', '.join(splits)}); train on it with --config.data.source=prepared "
        f"--config.data.prepared_dir={out}"
    )


def _analysis(name: str):
    """The mode of analysis `name`: `analyses.base.run` on the workdir's config (data,
    model, train from its config.json; `analysis` from the command line)."""

    def run_analysis(config, request, strategy):

        analyses_base.run(analyses.get(name), config, request, strategy)

    run_analysis.__doc__ = (
        f"--mode={name}: zf_tf.analyses.REGISTRY[{name!r}] on the workdir's config (with "
        "--model, the command line's: `mode_config`)."
    )
    return run_analysis


def _analysis_modes() -> dict:

    return {name: _analysis(name) for name in analyses.REGISTRY}


# mode -> function(config, request, strategy). Modes other than train and ablate read the
# config a workdir was trained with (config.json).
MODES = {
    "train": _train,
    "eval": _eval,
    "export": _export,
    "summary": _summary,
    "ablate": _ablate,
    "transfer": _transfer,
    "prepare": _prepare,
    **_analysis_modes(),
}


TRAINING_MODES = ("train", "ablate", "summary")  # build the config's model and batches
READ_ONLY_MODES = ("summary",)  # every other mode writes the workdir: one at a time
OWN_FOLDER_MODES = ("prepare",)  # write (and lock) a folder of their own, not the workdir
COMMAND_LINE_CONFIG_MODES = TRAINING_MODES + OWN_FOLDER_MODES  # the others: config.json's
NO_DATA_MODES = ("export", "transfer", "prepare")  # read no split of config.data (prepare
# checks its source itself)


def mode_config(mode: str, config, request: analyses_base.Request):
    """The config a mode runs with: the command line's for training and prepare (and for
    an analysis of a --model brought along), else the workdir's config.json with the
    command line's COMMAND_LINE_SECTIONS (`workdirs.load_config`)."""
    if mode in COMMAND_LINE_CONFIG_MODES or request.model:
        return config
    return workdirs.load_config(request.workdir, config)


def check(mode: str, config, request: analyses_base.Request, strategy, strategy_name: str):
    """Every check a mode has that does not need its outputs, run before anything is
    written (`run` calls it before the workdir lock and the mode itself): a new refusal
    belongs here, not after a write.

    Raises:
      UsageError, DataError: one line naming what to change.
    """
    if mode in TRAINING_MODES:
        check_training(config, strategy, strategy_name)
    if mode in ("train", "ablate"):
        train.steps_per_epoch(config)  # a split smaller than one batch
    if mode == "train":
        workdirs.check_run(config, request.workdir, request.overwrite)
    address = config.data.service_address
    if mode == "train" and address:  # the training pipeline runs on the tf.data service
        timeout = float(config.data.service_timeout)
        service.wait_for(address, "tf.data service dispatcher", timeout)
    if mode not in NO_DATA_MODES:
        inputs.check_source(config.data, (config.data.train_split, config.data.eval_split))


def request_from_flags(flag_values, args: list[str] = (), config=None) -> analyses_base.Request:
    """The typed request of main.py's mode flags (one flag per `Request` field) and the
    config keys that `args` and the alias flags (keys of `config`) override."""
    fields = [f for f in dataclasses.fields(analyses_base.Request) if f.name != "overridden"]
    values = {f.name: getattr(flag_values, f.name) for f in fields}
    overrides = split_arguments(list(args))[0]
    if config is not None:
        overrides = (
            alias_overrides(config, flag_values.mode, given_aliases(flag_values)) + overrides
        )
    overridden = tuple(dict.fromkeys(key for key, _ in overrides))
    return analyses_base.Request(**values, overridden=overridden)


def run(mode: str, config, request: analyses_base.Request, strategy_name: str = "default"):
    """Runs one mode with a resolved config and a typed request.

    Raises:
      UsageError, DataError: bad input (main() turns them into one line).
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: valid modes: {', '.join(MODES)}")
    validate_config(config)
    strategy = make_strategy(
        strategy_name,
        config.train.cpu_replicas,
        config.train.cluster_timeout,
    )
    print(f"Strategy {strategy_name} with {strategy.num_replicas_in_sync} replica(s)")
    config = mode_config(mode, config, request)
    check(mode, config, request, strategy, strategy_name)  # then, and only then, writes
    if mode in READ_ONLY_MODES + OWN_FOLDER_MODES or not workdirs.is_chief(strategy):
        MODES[mode](config, request, strategy)  # other workers write to temporary dirs
        return
    workdirs.check_writable(request.workdir)
    with workdirs.lock(request.workdir):
        MODES[mode](config, request, strategy)


def main(flag_values, args: list[str]):
    """main.py's body: resolves the config from `--config` and `args` (what absl left),
    runs the mode; usage errors become one line on stderr and exit status 1."""
    try:
        mode = flag_values.mode
        config = resolved_config(flag_values.config, args, mode, given_aliases(flag_values))
        request = request_from_flags(flag_values, args, config)
        run(mode, config, request, flag_values.strategy)
    except (UsageError, DataError, FileNotFoundError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (core/interrupts.py): state is resumable
        sys.exit(interrupts.exit_status())
    except Exception as e:  # a read-only or full disk is one line too; the rest are bugs
        if interrupts.received:  # the interrupt surfaced as another error (a TF op's)
            sys.exit(interrupts.exit_status())
        message = file_system_fault(e)
        if message is None:
            raise
        fail(message)
