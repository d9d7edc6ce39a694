"""The one exception type that bagjax's commands print as a single line.

Every check of user input (a config key, a path, a flag, a dataset, an image) raises ``UserError`` or a subclass,
with a message that says what to do. Any other exception is a bug and keeps its traceback. ``UserError`` is a
``ValueError`` so that code which caught the ``ValueError`` such checks raised before keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; its message is one line that names the fix."""
