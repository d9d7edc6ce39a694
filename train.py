"""Train a bagjax model: ``python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.

The config is locked, so a misspelt ``--config.KEY`` is an error, not a silently ignored flag. Rerunning the
same command on the same workdir resumes from its latest checkpoint.
"""

import logging as pylogging
import os
import signal
import sys

from bagjax import cli

cli.catch_interrupts()  # a SIGTERM/SIGINT while JAX imports says what happened, in one line
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from bagjax.training.checkpoints import DiskFullError, kept_checkpoints  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flags(FLAGS, "Directory for checkpoints, config.json, metrics and figures.")


def main(argv):
    del argv  # run() refuses positional arguments before this
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # orbax's background threads log every failed write with a traceback; the error itself reaches run()
    pylogging.getLogger("absl").setLevel(pylogging.CRITICAL)
    from bagjax.training.loop import train_and_evaluate

    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Exception as e:  # a write that met a full disk half way, in orbax's threads or ours
        if isinstance(e, DiskFullError) or "No space left on device" not in str(e):
            raise
        raise DiskFullError(f"disk full while writing a checkpoint in {FLAGS.workdir}: "
                            f"{kept_checkpoints(FLAGS.workdir)} are intact (a half-written one is never resumed "
                            "from); free space and rerun the same command") from e
    cli.raise_if_interrupted()  # a signal during the final evaluation, after the loop gave its handlers back
    if result.get("signal") == signal.SIGINT:  # Ctrl-C: checkpointed, and the shell sees an interrupt
        sys.exit(128 + signal.SIGINT)


HELP_FLAGS = (("--config=configs/NAME.py[:smoke]", "the config (required)"),
              ("--workdir=DIR", "checkpoints, config.json, metrics, figures; rerun to resume (required)"),
              ("--config.KEY=VALUE", "override any config key"))


def run():
    """Parse flags and train; a user's mistake is one line on stderr, a bug keeps its traceback
    (``cli.user_errors``)."""
    if cli.wants_help(sys.argv):
        print(cli.help_text("python train.py --config configs/NAME.py[:smoke] --workdir DIR [--config.KEY=VALUE ...]",
                            "Train a model; rerunning the same command on the same workdir resumes it.", HELP_FLAGS))
        return
    with cli.user_errors():
        cli.parse_config_flags(FLAGS, sys.argv)
        app.run(main, argv=[sys.argv[0]])


if __name__ == "__main__":
    run()
