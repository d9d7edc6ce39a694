"""What the commands (``train.py``, ``python -m bagjax.experiments.*``) share on the command line.

``--help`` lists the shipped configs and the common overrides; flag and config-file mistakes become one line
(``error: ...``) instead of absl's multi-line messages and tracebacks; SIGTERM/SIGINT during start-up stop the
command with one line saying so (the training loop installs its own handlers, which checkpoint first).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import os
import pathlib
import re
import signal
import sys
from typing import Callable, Iterator, NoReturn, Sequence

import tqdm

from bagjax.errors import PathNotWritableError, UserError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

COMMON_OVERRIDES = (
    ("--config.total_steps=N", "train N steps (-1: num_epochs epochs)"),
    ("--config.batch_size=N", "global batch size over all devices"),
    ("--config.optimizer.learning_rate=X", "peak learning rate"),
    ("--config.dataset=SPEC", "tfds:NAME[/CONFIG] | imagefolder:PATH | synthetic[:VARIANT]"),
    ("--config.model=NAME", "bagnet9 | bagnet17 | bagnet33 | resnet50 | anchornet"),
    ("--config.head=NAME", "learned | orthogonal | hadamard | identity"),
    ("--config.init_from=DIR", "start from converted weights or another workdir"),
    ("--config.dtype=bfloat16", "mixed precision compute"),
    ("--config.eval_every_steps=N / checkpoint_every_steps=N / log_every_steps=N", "cadences"),
)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived outside the training loop's own handlers (start-up, final evaluation)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: list[int] = []


def _remember(signum, frame):
    _pending.append(signum)


def catch_interrupts() -> None:
    """Remember SIGTERM/SIGINT until the training loop takes them over (``raise_if_interrupted`` acts on them).

    The handler only records the signal: raising from it at an arbitrary point of start-up (inside an import, or
    orbax or Grain setting up threads) left those libraries half set up, and a later checkpoint save hung.
    """
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _remember)


def raise_if_interrupted() -> None:
    """Raise ``Interrupted`` for a signal remembered since ``catch_interrupts`` (called at safe points)."""
    if _pending:
        raise Interrupted(_pending[0])


def _end_progress_line() -> None:
    """A progress bar on stderr stays mid-line (tqdm redraws it after a carriage return): end that line, so that
    an ``error:`` line printed while a bar is open starts a line of its own."""
    if getattr(tqdm.tqdm, "_instances", None):  # the bars not yet closed (tqdm's own registry)
        print(file=sys.stderr, flush=True)


def interrupted_exit(e: Interrupted) -> None:
    """One line and the shell's status for a signal (128 + signal number)."""
    name = signal.Signals(e.signum).name
    _end_progress_line()
    print(f"error: stopped by {name} outside the training steps (start-up or final evaluation); no checkpoint "
          "was lost: rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)


def exit_on_signals() -> None:
    """SIGTERM/SIGINT end a command that has nothing to save (the experiment commands) at once, in one line.

    Partly written outputs are removed (every output goes through ``bagjax.atomic``, so each file is whole or
    absent), worker processes are stopped, and the process ends with ``os._exit(128 + signal)``: no traceback,
    and no interpreter teardown, which crashed (SIGSEGV) when the signal came while XLA was compiling.
    """
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _exit_now)


def _exit_now(signum, frame):
    from bagjax import atomic  # pylint: disable=g-import-not-at-top

    atomic.remove_partial()
    import multiprocessing  # pylint: disable=g-import-not-at-top

    for child in multiprocessing.active_children():
        child.terminate()
    stopped(signum, "every file it wrote is complete, none is half written: rerun the same command", now=True)


def stopped(signum: int, detail: str, *, now: bool = False) -> NoReturn:
    """``error: stopped by SIGNAME: detail`` on stderr, and the shell's status for a signal (128 + its number).

    ``now``: end the process at once (``os._exit``, from a signal handler), else raise SystemExit.
    """
    sys.stdout.flush()
    _end_progress_line()
    print(f"error: stopped by {signal.Signals(signum).name}: {detail}", file=sys.stderr, flush=True)
    if now:
        os._exit(128 + signum)
    sys.exit(128 + signum)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The one error wrapper of every command: a user's mistake becomes one ``error: ...`` line and exit status
    1; a signal caught at start-up (``Interrupted``) one line and status 128 + its number; anything else is a bug
    and keeps its traceback.

    A user's mistake is a ``UserError`` (bagjax's own checks), or an ``OSError`` the system raised for a path the
    command was given to read or write (it names the file: no such file, permission denied, read-only file
    system, a file in the way) or for a full disk. ``BAGJAX_TRACEBACK=1`` shows the traceback of those too.
    """
    try:
        yield
    except Interrupted as e:
        interrupted_exit(e)
    except (UserError, OSError) as e:
        if not is_user_error(e) or os.environ.get("BAGJAX_TRACEBACK") == "1":
            raise
        sys.exit(f"error: {error_line(e)}")


def run_main(main: Callable[[], object]) -> None:
    """Run a command's ``main`` inside ``user_errors`` (``if __name__ == "__main__": cli.run_main(main)``)."""
    with user_errors():
        main()


_OS_ERROR_HINTS = {errno.EEXIST: "a file is in the way: give a directory path",
                   errno.ENOTDIR: "a file is in the way: give a directory path",
                   errno.EISDIR: "a directory is in the way: give a file path",
                   errno.ENOENT: "check that path",
                   errno.EACCES: "choose a path you can write to, or fix its permissions",
                   errno.EPERM: "choose a path you can write to, or fix its permissions",
                   errno.EROFS: "choose a path on a writable file system",
                   errno.ENOSPC: "free disk space and rerun the same command"}


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a mistake the user fixes (one line) rather than a bug (a traceback); see ``user_errors``."""
    if isinstance(e, UserError):
        return True
    return isinstance(e, OSError) and e.errno in _OS_ERROR_HINTS and bool(e.filename or e.errno == errno.ENOSPC)


def error_line(e: BaseException) -> str:
    """A user error as one line; an ``OSError`` raised by the system names its file and what to do about it."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        if not e.filename:
            return f"{e.strerror}: {_OS_ERROR_HINTS[e.errno]}" if e.errno in _OS_ERROR_HINTS else e.strerror
        return f"{e.strerror}: {e.filename}: {_OS_ERROR_HINTS.get(e.errno, 'check that path')}"
    return " ".join(str(e).split())


def check_output_dir(path: str | pathlib.Path, flag: str = "--out") -> pathlib.Path:
    """``path``, checked as the directory a command writes its results to once its long work is done: a file in
    the way or a parent without write permission is a one-line error now, not a traceback after the work.
    Nothing is created (a command whose input turns out bad leaves no empty folder behind)."""
    path = pathlib.Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            if not os.access(p, os.W_OK | os.X_OK):
                raise PathNotWritableError(f"{flag} {path}: cannot write in {p}: choose a directory you can write to")
            return path
        if p.exists() or p.is_symlink():  # a file, or a link to nothing
            raise UserError(f"{flag} {path}: {p} is a file, not a directory: give a directory to write the results "
                            "to (it is created if missing)")
    return path


def check_workdir_dataset(config, workdir: str | pathlib.Path) -> None:
    """Open the dataset a workdir was trained on (its ``config.json``) before any long work.

    The commands that read a workdir have no ``--config`` flag, so the data errors' advice (set
    ``config.data.data_dir``, ...) is turned into where to do that: the workdir's ``config.json``.
    """
    from bagjax import data

    try:
        data.dataset_info(config)
    except UserError as e:
        kind = data.DatasetUnavailableError if isinstance(e, data.DatasetUnavailableError) else UserError
        raise kind(f"{' '.join(str(e).split())} (this command takes the dataset from "
                   f"{pathlib.Path(workdir) / 'config.json'}: edit \"dataset\" there, or \"data_dir\" / "
                   "\"manual_dir\" under \"data\", to where the data is now)") from None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one ``error: ...`` line and exit status 1, like every other error."""

    def error(self, message: str):
        sys.exit(f"error: {message} (see {self.prog} --help)")


def configs() -> list[tuple[str, str]]:
    """(path, first docstring line) of every shipped config."""
    rows = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        doc = text.split('"""')[1].strip().splitlines()[0] if text.lstrip().startswith('"""') else ""
        rows.append((f"configs/{path.name}", doc))
    return rows


def help_text(usage: str, description: str, flags: Sequence[tuple[str, str]]) -> str:
    """The ``--help`` of a config-driven command."""
    lines = [f"usage: {usage}", "", description, "", "flags:"]
    lines += [f"  {name:<34} {text}" for name, text in flags]
    lines += ["", "configs (append :smoke to any for a two-step run on tiny synthetic data):"]
    lines += [f"  {name:<34} {doc}" for name, doc in configs()]
    lines += ["", "common overrides (any config key can be set with --config.KEY=VALUE):"]
    lines += [f"  {name:<34} {text}" for name, text in COMMON_OVERRIDES]
    return "\n".join(lines)


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "--helpshort", "--helpfull", "-help") for a in argv[1:])


def _config_path(argv: Sequence[str]) -> str:
    """The --config file named on the command line (``--config=F`` or ``--config F``)."""
    return next((a.split("=", 1)[1] if "=" in a else argv[i + 2] for i, a in enumerate(argv[1:])
                 if a.split("=", 1)[0] == "--config" and ("=" in a or i + 2 < len(argv))), "?")


def unexpected_arguments(rest: Sequence[str],
                         example: str = "--config.data.flip=False, not --config.data.flip False") -> str:
    """One line for positional words absl left over, e.g. from ``--config.data.flip False`` (a space, not '=')."""
    words = " ".join(repr(w) for w in rest)
    return f"unexpected argument(s) {words}: this command takes none; write every flag as --name=value (e.g. {example})"


def unknown_config_key(config, reference, prefix: str = "") -> str | None:
    """One line for the first key a config file sets that ``reference`` (configs/default.py) does not have.

    ``--config.KEY`` typos are refused by the locked config; a typo inside a config file would otherwise be
    silently ignored. ``model_kwargs`` is free-form (the model's own arguments, checked when it is built).
    """
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            return (f"the config sets {name!r}, which is not a bagjax config key{hint} (configs/default.py lists "
                    "every key)")
        if hasattr(value, "items") and hasattr(reference[key], "items") and key != "model_kwargs":
            found = unknown_config_key(value, reference[key], f"{name}.")
            if found:
                return found
    return None


def _loaded_config(flag_values, argv: Sequence[str]):
    """The ``--config`` file's ConfigDict; loaded again by the flag's own parser when the locked config refused an
    override (parsing then stops before the flag has a value). None when the file itself does not load."""
    if "config" not in flag_values:
        return None
    flag = flag_values["config"]
    if flag.value is not None:
        return flag.value
    try:
        return flag.parser.parse(_config_path(argv))
    except Exception:  # pylint: disable=broad-except  # the file does not load: flag_error reports the first error
        return None


def unknown_override(config, argv: Sequence[str]) -> str | None:
    """One line for the first ``--config.KEY=VALUE`` whose key the loaded config lacks.

    The config is locked (``lock_config=True``), so ml_collections refuses such a key; this says which one and
    the closest key at that level, read from the config itself rather than from the refusal's wording.
    """
    import ml_collections  # pylint: disable=g-import-not-at-top

    if not isinstance(config, ml_collections.ConfigDict):
        return None  # the config file did not load: flag_error says why
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if not name.startswith("--config."):
            continue
        node, path = config, []
        for key in name[len("--config."):].split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                break
            if key not in node:
                close = difflib.get_close_matches(key, list(node.keys()), n=1)
                hint = (f"; did you mean {'.'.join([*path, close[0]])!r}?" if close
                        else "; the config file lists the keys")
                return f"{arg}: no such config key {'.'.join([*path, key])!r}{hint}"
            node, path = node[key], [*path, key]
    return None


def define_config_flags(flag_values, workdir_help: str) -> None:
    """The flags of the config-driven commands (train.py, heads): a locked ``--config`` file and ``--workdir``."""
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :ARG (e.g. :smoke).",
                                    flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help, flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def parse_config_flags(flag_values, argv: Sequence[str],
                       example: str = "--config.data.flip=False, not --config.data.flip False") -> None:
    """Parse absl flags that include a ``--config`` file (train.py, heads): a bad flag, a config file that does
    not load, a stray positional word or a config-file key that configs/default.py lacks exits with one line."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    try:
        rest = flag_values(argv)
        flag_values.config.to_dict()  # a config file that failed to load raises here, not in the middle of a run
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as e:
        typo = unknown_override(_loaded_config(flag_values, argv), argv)
        sys.exit(f"error: {typo or flag_error(e, argv)}")
    if len(rest) > 1:  # absl leaves positional words over, e.g. from `--config.data.flip False`
        sys.exit(f"error: {unexpected_arguments(rest[1:], example)}")
    try:  # the checkout's configs/ (bagjax's wheel does not ship it, and a config file may stand alone)
        from configs import default  # pylint: disable=g-import-not-at-top
    except ImportError:
        return
    if unknown := unknown_config_key(flag_values.config, default.get_config()):
        sys.exit(f"error: {unknown}")


def flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One line for an error parsing the flags or loading the config file."""
    shipped = ", ".join(p for p, _ in configs())
    if isinstance(e, SyntaxError):
        path = _config_path(argv)
        in_config = e.filename and os.path.abspath(path).startswith(os.path.abspath(e.filename))
        where = f"line {e.lineno}" if in_config else f"{e.filename} line {e.lineno}"  # or a module it imports
        return f"cannot load --config {path} ({where}: {e.msg}): fix that line, or use one of {shipped}"
    if "has no attribute 'get_config'" in str(e):
        return (f"cannot load --config {_config_path(argv)}: a config file defines get_config(arg=None) returning "
                f"an ml_collections.ConfigDict (see configs/demo.py); use one of {shipped}")
    text = str(e).strip()
    if "Failed loading config file" in text or isinstance(e.__cause__, OSError):
        reason = text.splitlines()[-1].strip() if text else type(e).__name__
        return f"cannot load --config {_config_path(argv)} ({reason}): use one of {shipped}"
    if "Traceback" in text:  # an error raised by get_config(arg): its own message, without the exception's name
        return re.sub(r"^\w+(Error|Exception): ", "", text.splitlines()[-1].strip())
    return " ".join(text.split())
