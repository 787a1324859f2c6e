"""The driver lock: one process at a time writes a results database.

The lock is an OS file lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on
``<db>.lock``, which holds the owner's pid and host name for the error message. An OS lock is
released by the kernel when its holder dies, even by SIGKILL, so a dead driver never blocks the
next one and a recycled pid can never look alive. The file itself is left in place (emptied) on a
clean release: unlinking a lock file races with a process that has just opened it.

Whoever holds the lock is the only writer, so any trial still marked ``running`` when the lock
is taken was orphaned by a driver that died; :func:`varshift.lab.runner.run_study` puts those
back to ``pending`` right after :meth:`DriverLock.acquire`.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

__all__ = ["DriverLock", "DriverLockError"]

# Windows locks byte ranges, and a locked range cannot be read; lock one byte far past the
# pid text so that a refused driver can still read who holds the lock.
_WINDOWS_LOCK_OFFSET = 1 << 20


class DriverLockError(RuntimeError):
    """Another live driver holds the lock on this database."""


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


class DriverLock:
    """Exclusive, crash-safe lock on the results database ``db_path``.

    Use as a context manager, or call :meth:`acquire` / :meth:`release`. ``acquire`` raises
    :class:`DriverLockError` naming the holder when another live process has the lock.
    """

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path)
        self.path = Path(f"{os.fspath(db_path)}.lock")
        self.stale_owner: str | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; ``stale_owner`` is then the pid/host text a dead driver left behind
        (``None`` after a clean release)."""
        if self._fd is not None:
            raise RuntimeError(f"the lock {self.path} is already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            owner = _read_owner(fd) or "unknown process"
            os.close(fd)
            raise DriverLockError(
                f"{self.db_path} is being written by another driver ({owner}); "
                "wait for it to finish or use another --db"
            )
        self.stale_owner = _read_owner(fd) or None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the file (marking a clean exit) and drop the lock; a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            _unlock(fd)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DriverLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DriverLock({str(self.path)!r}, held={self.held})"
