"""Errors: a user's mistake is one line, a bug keeps its traceback (``cli.user_errors``, used by every command)."""

import errno
import sys
import textwrap

import pytest

from absl import flags

from bagjax import cli
from bagjax.data import DatasetUnavailableError
from bagjax.errors import PathNotFoundError, UserError
from bagjax.training.checkpoints import ConfigChangedError, DiskFullError
from bagjax.training.lock import WorkdirLockedError
from bagjax.training.hooks import NonFiniteLossError
from trainutil import ROOT, run_train

# A config that plants a shape bug in the demo BagNet: a wrong reshape folds the classes into the patch axis, and
# jax raises a ValueError (which the old error layer printed as one line, hiding where the bug was).
PLANTED_BUG = textwrap.dedent('''
    import functools

    import flax.linen as nn
    import jax.numpy as jnp

    from bagjax import models
    from bagjax.models.bagnet import KERNEL3, BagNet
    from configs import demo


    class PlantedBug(BagNet):
        @nn.compact
        def __call__(self, x, train=False, output="logits"):
            patch_logits = super().__call__(x, train, output="patch_logits")
            b, h, w, c = patch_logits.shape
            return jnp.einsum("bp,p->b", patch_logits.reshape(b, h * w * c), jnp.ones(h * w))  # the planted bug


    def get_config(arg=None):
        models.MODELS["bagnet17"] = functools.partial(PlantedBug, KERNEL3["bagnet17"])
        return demo.get_config(arg)
''')


def _exit_line(error: BaseException) -> str:
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main)
    return str(exit_info.value.code)


@pytest.mark.parametrize("error", [UserError("--seeds must be at least 1"), PathNotFoundError("no checkpoint"),
                                   ConfigChangedError("x"), DiskFullError("disk full"),
                                   WorkdirLockedError("held by pid 1"), NonFiniteLossError("loss is nan"),
                                   DatasetUnavailableError("tfds dataset 'x' is not\nprepared")])
def test_bagjax_checks_are_user_errors_and_print_one_line(error):
    assert isinstance(error, UserError)
    line = _exit_line(error)
    assert line.startswith("error: ") and "\n" not in line and str(error).split()[0] in line


@pytest.mark.parametrize("error, fragments", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/x.jpg"), ("/r/x.jpg", "check that path")),
    (PermissionError(errno.EACCES, "Permission denied", "/r/out"), ("/r/out", "choose a path you can write to")),
    (OSError(errno.ENOSPC, "No space left on device"), ("No space left", "free disk space"))])
def test_system_errors_about_a_path_or_a_full_disk_are_one_line(error, fragments):
    line = _exit_line(error)
    assert line.startswith("error: ") and all(f in line for f in fragments), line


@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast"), TypeError("bad operand"),
                                   KeyError("params"), OSError("no errno, no path"),
                                   OSError(errno.ECONNREFUSED, "Connection refused")])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        cli.run_main(lambda: (_ for _ in ()).throw(error))


def test_traceback_of_a_user_error_on_request(monkeypatch):
    monkeypatch.setenv("BAGJAX_TRACEBACK", "1")
    with pytest.raises(UserError):
        cli.run_main(lambda: (_ for _ in ()).throw(UserError("x")))


def test_train_py_shows_a_planted_model_bug_with_its_traceback_and_a_user_mistake_in_one_line(tmp_path):
    (tmp_path / "planted_bug.py").write_text(PLANTED_BUG)
    proc = run_train(str(tmp_path / "planted_bug.py") + ":smoke", tmp_path / "run", check=False)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "ValueError" in proc.stderr, proc.stderr[-2000:]
    assert "planted_bug.py" in proc.stderr and "the planted bug" in proc.stderr  # the frame and line of the bug
    proc = run_train("demo.py:smoke", tmp_path / "run2", "--config.image_size=8", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: image_size=8") and "--config.image_size=" in lines[0]


@pytest.mark.parametrize("override, fragments", [
    ("--config.batch_sise=8", ("--config.batch_sise=8", "'batch_sise'", "did you mean 'batch_size'")),
    ("--config.optimizer.learning_rat=0.1", ("'optimizer.learning_rat'", "did you mean 'optimizer.learning_rate'")),
    ("--config.data.zzz=1", ("'data.zzz'", "the config file lists the keys"))])
def test_a_misspelt_config_key_is_named_from_the_locked_configs_own_keys(override, fragments, monkeypatch):
    flag_values = flags.FlagValues()
    cli.define_config_flags(flag_values, "workdir")
    argv = ["train.py", f"--config={ROOT / 'configs' / 'demo.py'}:smoke", "--workdir=w", override]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config_flags(flag_values, argv)
    line = str(exit_info.value.code)
    assert line.startswith("error: ") and "\n" not in line and all(f in line for f in fragments), line


def test_a_signal_during_a_progress_bar_prints_its_error_on_a_line_of_its_own(capsys):
    """A bar on stderr stays mid-line; the ``error: stopped by ...`` line must still start a line (it was
    appended to the bar's line when Ctrl-C came during the blackout's progress bar)."""
    import signal

    import tqdm

    with tqdm.tqdm(total=8, desc="blackout (patches)") as bar:
        bar.update(1)
        with pytest.raises(SystemExit) as exit_info:
            cli.stopped(signal.SIGINT, "rerun the same command")
    assert exit_info.value.code == 130
    lines = capsys.readouterr().err.splitlines()
    assert "error: stopped by SIGINT: rerun the same command" in lines, lines
