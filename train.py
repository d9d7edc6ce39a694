"""Train a bagjax model: ``python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.

The config is locked, so a misspelt ``--config.KEY`` is an error, not a silently ignored flag. Rerunning the
same command on the same workdir resumes from its latest checkpoint.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :ARG (e.g. :smoke).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json, metrics and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from bagjax.training.loop import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
    """absl's flag errors are multi-line; turn a bad --config.KEY into one actionable line."""
    try:
        FLAGS(sys.argv)
    except flags.Error as e:
        message = str(e).splitlines()[0]
        sys.exit(f"error: {message}. See the config file for the valid keys, or --helpfull.")
    app.run(main, argv=[sys.argv[0]])


if __name__ == "__main__":
    run()
