"""The exceptions that bagjax's commands print as a single line.

Every check of user input (a config key, a path, a flag, a dataset, an image) raises ``UserError`` or a subclass,
with a message that says what to do. Any other exception is a bug and keeps its traceback (``cli.run_main``).
``UserError`` is a ``ValueError`` so that code which caught the ``ValueError`` such checks raised before keeps
working; the subclasses below keep the built-in type they replaced for the same reason.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; its message is one line that names the fix."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A path the user gave (a workdir, ``init_from``, a weights file) does not exist."""


class PathNotWritableError(UserError, PermissionError):
    """A directory the user gave (``--workdir``, ``--out``) cannot be written."""
