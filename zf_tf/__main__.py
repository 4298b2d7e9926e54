"""The zf-tf command line: `zf-tf --mode=MODE [--config=FILE] [--workdir=DIR] ...`, the same
as `python main.py ...` in a checkout and `python -m zf_tf ...`.

A thin entry point: absl flags, then `zf_tf.cli.main`. Usage errors (an unknown mode,
strategy or config key, a bad file) print one line naming the valid choices and exit 1.
The console shows progress bars, the important lines and what was written where; logs come
back with `--verbosity=0` (INFO) or `-v 1`.
"""

import os
import sys

from zf_tf.core import interrupts


def run():
    """Runs the command line on sys.argv; exits with the mode's status."""
    # First, before TensorFlow starts its threads: SIGINT and SIGTERM end every mode within
    # seconds, even while the main thread waits inside TensorFlow.
    interrupts.install()
    quiet = not any(a == "-v" or a.startswith(("--verbosity", "-v=")) for a in sys.argv[1:])
    if quiet:
        _import_tensorflow_muted()

    from absl import app, flags

    from zf_tf import cli  # after the handlers and the muted TensorFlow import above

    _define_flags(flags, cli)

    def main(argv):
        if quiet:
            cli.quiet()
        cli.main(flags.FLAGS, argv[1:])

    try:
        app.run(main, flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a mode (zf_tf/core/interrupts.py)
        sys.exit(interrupts.exit_status())
    sys.exit(0)


def _import_tensorflow_muted():
    """A quiet console unless --verbosity (-v) is given. TensorFlow prints its C++ notices
    (oneDNN, "cuInit ... UNKNOWN ERROR (303)" on machines without a GPU) straight to stderr
    while it is imported and finds its devices, before any log level applies: that stretch
    runs with stderr muted (a failing import still raises its error afterwards); later C++
    logs below ERROR are off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stderr, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(null)


def _define_flags(flags, cli):
    """The command line's flags (absl), with the choices `cli` accepts."""
    flags.DEFINE_enum("mode", "train", tuple(cli.MODES), "What to run.")
    flags.DEFINE_string(
        "config",
        cli.DEFAULT_CONFIG,
        "Experiment config file (a get_config() module), FILE or FILE:ARG; configs/NAME.py "
        "names one zf_tf ships; override fields with --config.a.b=value.",
    )
    flags.DEFINE_string("workdir", "workdir", "Where checkpoints, logs and figures go.")
    flags.DEFINE_enum("strategy", "default", cli.STRATEGIES, "tf.distribute strategy.")
    flags.DEFINE_bool("overwrite", False, "Allow replacing existing outputs in the workdir.")
    # the model to look inside (inspection modes)
    flags.DEFINE_string(
        "model",
        "",
        "Look inside this model instead of the workdir's: a .keras file or a "
        "keras.applications name (vgg16, resnet50, mobilenet_v2, ...).",
    )
    flags.DEFINE_string(
        "weights",
        "",
        "Local weights file for a keras.applications --model (nothing is "
        "downloaded: without it the model has random weights).",
    )
    # Aliases: each only sets a config field (cli.ALIASES); None = not given.
    for name, (kind, _) in cli.ALIASES.items():
        getattr(flags, f"DEFINE_{kind}")(name, None, cli.alias_help(name))


if __name__ == "__main__":
    run()
