"""Train a bagjax model: ``python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.

The config is locked, so a misspelt ``--config.KEY`` is an error, not a silently ignored flag. Rerunning the
same command on the same workdir resumes from its latest checkpoint.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bagjax.data import DatasetUnavailableError  # noqa: E402
from bagjax.training.loop import NonFiniteLossError  # noqa: E402

# Errors that mean "the user must change something"; they print as one line (see run()).
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NonFiniteLossError, DatasetUnavailableError)

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


def _config_arg(message: str) -> str:
    """The --config.KEY=VALUE argument an error message is about (or all of them)."""
    args = [a for a in sys.argv[1:] if a.startswith("--config.")]
    named = [a for a in args if a.split("=", 1)[0].rsplit(".", 1)[-1] in message]
    return " ".join(named or args)


def run():
    """Parse flags and train; a user's mistake is one line on stderr, never a traceback.

    ``BAGJAX_TRACEBACK=1`` shows the traceback of such errors too.
    """
    try:
        FLAGS(sys.argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        text = str(e).strip()
        message = text.splitlines()[-1] if "Traceback" in text else " ".join(text.split())  # config file raised
        if isinstance(e, (KeyError, AttributeError)):
            key = message.strip("\"'")
            message = f"{_config_arg(key)}: no such config key ({key}); the valid keys are in the config file"
        sys.exit(f"error: {message}")
    try:
        app.run(main, argv=[sys.argv[0]])
    except USER_ERRORS as e:
        if os.environ.get("BAGJAX_TRACEBACK") == "1":
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
