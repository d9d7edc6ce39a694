"""Output files that are whole or absent: each is written under a temporary name beside it, then renamed.

``os.replace`` within one directory is atomic on POSIX, so a reader (or a user after Ctrl-C) sees the old file,
the new one, or none, never half of one. A command ended by a signal removes its temporary files first
(``remove_partial``, called by ``bagjax.cli.exit_on_signals``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
from typing import Iterator

_in_progress: set[pathlib.Path] = set()


@contextlib.contextmanager
def replacing(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary path to write ``path``'s new content to; renamed to ``path`` on success, removed on failure.

    The temporary name keeps the suffix, so writers that infer the format from it (matplotlib) still work, and
    names the host and process, so writers on hosts that share a directory never collide.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}{path.suffix}")
    _in_progress.add(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _in_progress.discard(tmp)
        tmp.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str) -> None:
    """``path.write_text(text)``, whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def remove_partial() -> None:
    """Remove every temporary file still being written (a signal is ending the process)."""
    for tmp in list(_in_progress):
        with contextlib.suppress(OSError):
            tmp.unlink()
