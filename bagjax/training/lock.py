"""An exclusive lock on a training workdir, so two runs never write the same checkpoints and metrics.

``WORKDIR/.lock`` is held with ``fcntl.flock`` for the life of the run (the kernel drops it when the process
dies, even by SIGKILL) and names its holder as ``PID@HOST``. A second run on the workdir stops at once with
one line naming the holder; a lock file whose holder is gone (a killed run) is taken over with a warning.
In a multi-process run only process 0 takes the lock; the others learn the outcome from it.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import socket

from bagjax.errors import UserError

LOCK_FILE = ".lock"


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run holds the workdir's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` holds ``workdir/.lock`` exclusively (see the module docstring)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            pid, _, host = holder.partition("@")
            raise WorkdirLockedError(
                f"workdir {self.path.parent} is in use by the run with PID {pid} on host {host or '?'} "
                f"(lock {self.path}): wait for it to finish, stop it, or choose another --workdir") from None
        previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
        me = f"{os.getpid()}@{socket.gethostname()}"
        if previous:
            pid, _, host = previous.partition("@")
            where = "this host" if host == socket.gethostname() else f"host {host}"
            state = "no longer running" if host != socket.gethostname() or not _alive(int(pid or 0)) \
                else "running but not holding it"
            print(f"warning: took over the stale lock {self.path} of PID {pid} on {where} ({state})", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the file (so the next run finds no stale holder) and drop the lock; the file itself stays,
        because unlinking a flock'ed file lets two later runs lock two different files."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_workdir(workdir: str | pathlib.Path, *, is_main: bool, process_count: int) -> WorkdirLock | None:
    """Process 0 takes the lock; in a multi-process run every process raises if it could not."""
    lock, error = None, ""
    if is_main:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            lock, error = None, str(e)
    if process_count > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.array(bool(error))))
        if failed and not is_main:
            error = f"process 0 could not lock the workdir {workdir}: see its message"
    if error:
        raise WorkdirLockedError(error)
    return lock
