"""Glue between main.py's flags and the library: flag parsing with one-line errors,
strategies, the workdir's resolved config, and the mode dispatch table."""

from __future__ import annotations

import importlib
import json
import runpy
import sys

from absl import flags, logging

from zf_tf import UsageError
from zf_tf.model import CONV_LAYERS  # noqa: F401 - main.py's --layer choices

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def fail(message: str):
    """Prints `error: message` on one line to stderr and exits with status 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


DEFAULT_CONFIG = "configs/default.py"


def _config_path(argv) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _explain_override(argv) -> str | None:
    """Names the first `--config.a.b=...` whose key is not in the config, and the valid keys."""
    # `--config=file.py:arg` passes `arg` to get_config (ml_collections' config_flags).
    path, *arg = _config_path(argv).split(":", 1)
    try:
        config = runpy.run_path(path)["get_config"](*arg)
    except Exception:  # noqa: BLE001 - the caller reports the original error instead
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(walked) or "the config"
                choices = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return f"unknown config key {key!r}: valid keys of {where}: {choices}"
            node = node[part]
            walked.append(part)
    return None


def _config_error(argv, error: Exception):
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    fail(_explain_override(argv) or f"bad --config {_config_path(argv)}: {first_line}")


def resolved_config(flag_values, name: str = "config"):
    """The config flag's value; the config file is loaded lazily, so errors surface here."""
    try:
        config = getattr(flag_values, name)
        config.keys()  # a failed load yields a placeholder that raises on any attribute
        return config
    except Exception as e:  # noqa: BLE001
        _config_error(sys.argv, e)


def define_config_flag(name: str = "config", default: str = DEFAULT_CONFIG):
    """DEFINE_config_file, which already applies `--config.x=...` overrides from sys.argv;
    a bad override becomes one line naming the valid keys."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(
            name, default, "Experiment config file (a get_config() module).", lock_config=True
        )
    except Exception as e:  # noqa: BLE001 - config files and overrides raise many types
        _config_error(sys.argv, e)


def parse_flags(flag_values, argv):
    """Parses argv like absl, but turns every flag or config error into one line + exit 1."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if "Traceback" in str(e):  # get_config raised: absl quotes the traceback, error last
            fail(_explain_override(argv) or f"bad --config {_config_path(argv)}: {lines[-1]}")
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - config files and overrides raise many types
        _config_error(argv, e)


def make_strategy(name: str, cpu_replicas: int = 2):
    """Creates a tf.distribute strategy by name; must run before any other TF op.

    Args:
      name: one of STRATEGIES.
      cpu_replicas: for 'mirrored' on a machine without GPUs, the CPU is split into this
        many logical devices so that MirroredStrategy really runs that many replicas.

    Raises:
      UsageError: unknown name, or no TPU reachable for 'tpu'.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        if tf.config.get_logical_device_configuration(cpu) is None and cpu_replicas > 1:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
            )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise UsageError(
                f"--strategy=tpu: no TPU reachable ({str(e).splitlines()[0]})"
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise UsageError(f"unknown strategy {name!r}: valid strategies: {', '.join(STRATEGIES)}")


def validate_config(config):
    """Checks the enumerated and related fields of a config before anything runs.

    Raises:
      UsageError: naming the field and its valid choices.
    """
    from pipelines import inputs
    from zf_tf import model as model_lib

    def choose(key, value, choices):
        if value not in choices:
            raise UsageError(f"{key}={value!r} is not valid: choose one of {', '.join(choices)}")

    choose("config.data.source", config.data.source, inputs.SOURCES)
    choose("config.model.layer1", config.model.layer1, tuple(model_lib.LAYER1))
    choose("config.model.kernel_init", config.model.kernel_init, model_lib.KERNEL_INITS)
    for name in config.model.get("remove", ()):
        choose("config.model.remove entry", name, model_lib.REMOVABLE)
    if config.data.source == "folder" and not config.data.folder:
        raise UsageError("config.data.source='folder' needs config.data.folder=/path/to/images")
    classes = inputs.selected_classes(config.data)
    if classes and (len(set(classes)) != len(classes) or min(classes) < 0):
        raise UsageError(f"config.data.classes={classes} must be distinct label ids >= 0")
    if classes and len(classes) != config.data.num_classes:
        raise UsageError(
            f"config.data.classes keeps {len(classes)} classes but config.data.num_classes="
            f"{config.data.num_classes}: set --config.data.num_classes={len(classes)}"
        )
    if config.data.crop_size > config.data.resize_size:
        raise UsageError(
            f"config.data.crop_size ({config.data.crop_size}) must not exceed "
            f"config.data.resize_size ({config.data.resize_size})"
        )


def _summary(config, workdir, strategy, opts):
    """Prints the model's layers and one batch of the training pipeline."""
    from pipelines import inputs
    from zf_tf import model as model_lib

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


def _train(config, workdir, strategy, opts):
    from zf_tf import train

    train.train_and_evaluate(config, workdir, strategy, opts.overwrite)


def _eval(config, workdir, strategy, opts):
    from zf_tf import evaluate, workdirs

    config = workdirs.load_config(workdir, config)
    evaluate.evaluate(config, workdir, workdirs.load_model(workdir))


def _export(config, workdir, strategy, opts):
    from zf_tf import export, workdirs

    config = workdirs.load_config(workdir, config)
    path = export.export(workdirs.load_model(workdir), config, workdir)
    print(f"SavedModel written to {path}")


def _deconv(config, workdir, strategy, opts):
    from zf_tf import model as model_lib
    from zf_tf import visualize, workdirs

    config = workdirs.load_config(workdir, config)
    if opts.untrained:
        model = model_lib.build_model(config.model)
    else:
        model = workdirs.load_model(workdir)
    if opts.image:
        visualize.image_panels(
            config, workdir, model, opts.layer, opts.image, opts.num_features, opts.overwrite
        )
    else:
        visualize.top_k_panels(
            config,
            workdir,
            model,
            opts.layer,
            opts.split or config.data.eval_split,
            opts.top_k,
            opts.features,
            opts.num_features,
            opts.overwrite,
        )


def _ablate(config, workdir, strategy, opts):
    """Paper Table 3: trains every variant of config.ablate in WORKDIR/ablate/<variant>/
    (the command line's config is the base; the workdir's own run is not read or touched)."""
    from zf_tf import ablate

    ablate.run(config, workdir, strategy, opts.overwrite)


def _analysis(module_name: str):
    """A mode that runs `module_name.run_mode(config, workdir, opts)` on a trained workdir:
    data/model/train settings from its config.json, `analysis` from --config."""

    def run(config, workdir, strategy, opts):
        from zf_tf import workdirs

        module = importlib.import_module(module_name)
        module.run_mode(workdirs.load_config(workdir, config), workdir, opts)

    run.__doc__ = f"--mode backed by {module_name}.run_mode."
    return run


# Analysis modes (paper Figs. 4-7, Table 1): mode name -> module with run_mode().
ANALYSES = {
    "occlusion": "zf_tf.occlusion",
    "invariance": "zf_tf.invariance",
    "correspondence": "zf_tf.correspondence",
    "evolution": "zf_tf.evolution",
    "filters": "zf_tf.filters",
    "attribution": "zf_tf.attribution",
}

# Modes other than train read the config a workdir was trained with (config.json).
MODES = {
    "train": _train,
    "eval": _eval,
    "export": _export,
    "deconv": _deconv,
    "summary": _summary,
    "ablate": _ablate,
    **{name: _analysis(module) for name, module in ANALYSES.items()},
    # Tables 4-6, Fig. 9: the workdir's model is the source, --config's `transfer` the target.
    "transfer": _analysis("zf_tf.transfer"),
}


def run(mode: str, config, workdir: str, strategy_name: str, opts):
    """Runs one mode; usage errors become one line on stderr and exit status 1.

    Args:
      opts: the mode flags (overwrite, layer, split, top_k, features, num_features,
        image, untrained, num_images, parts, compare), e.g. absl's FLAGS.
    """
    try:
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: valid modes: {', '.join(MODES)}")
        validate_config(config)
        strategy = make_strategy(strategy_name, config.train.cpu_replicas)
        logging.info("Strategy %s with %d replica(s)", strategy_name, strategy.num_replicas_in_sync)
        MODES[mode](config, workdir, strategy, opts)
    except (UsageError, FileNotFoundError) as e:
        fail(str(e))
