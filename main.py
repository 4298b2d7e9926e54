"""zf-tf command line: `python main.py --mode=MODE [--config=FILE] [--workdir=DIR] ...`.

A thin entry point: absl flags, then a dispatch into zf_tf. Usage errors (an unknown mode,
strategy or config key, a bad file) print one line naming the valid choices and exit 1.
"""

import sys

from absl import app, flags

from zf_tf import cli

MODES = tuple(cli.MODES)

flags.DEFINE_enum("mode", "train", MODES, "What to run.")
cli.define_config_flag()
flags.DEFINE_string("workdir", "workdir", "Where checkpoints, logs and figures go.")
flags.DEFINE_enum("strategy", "default", cli.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_bool("overwrite", False, "Allow replacing existing outputs in the workdir.")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.run(FLAGS.mode, cli.resolved_config(FLAGS), FLAGS.workdir, FLAGS.strategy, FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(FLAGS, argv))
    sys.exit(0)
