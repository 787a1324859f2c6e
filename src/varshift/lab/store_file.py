"""Opening the results database file: the path checks, the read-only, immutable-file and
read-only-folder checks, the removal of a database that a failed call has just created, and the
connection itself with its PRAGMAs (:class:`~varshift.lab.store.ResultStore` calls these).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

__all__ = [
    "connect",
    "database_file",
    "make_folder",
    "open_error",
    "remove_database_files",
]

# SQLite's primary result codes (the low byte of an extended code) for a file that cannot be
# opened or written: SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN.
_CANNOT_WRITE_CODES = frozenset({3, 8, 14})


def database_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as the database file, refusing (in one line) what can never be one."""
    text = os.fspath(path)
    if not text:
        raise ValueError("the results database path is empty; name a file, e.g. varshift-lab.db")
    file = Path(text)
    if file.is_dir():
        raise IsADirectoryError(
            f"the results database {file} is a directory; name a file, e.g. "
            f"{file / 'varshift-lab.db'}"
        )
    return file


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the folder {folder} for the results database ({exc.strerror})"
        ) from None


def _can_write_file(file: Path) -> bool:
    # Opening for writing (not os.access) also catches immutable files and read-only mounts,
    # which os.access does not see for root.
    try:
        with open(file, "r+b"):
            return True
    except OSError:
        return False


def _can_create_in(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _unwritable_reason(path: Path) -> str | None:
    """Why the results database ``path`` cannot be written, in one line (``None`` if it can):
    SQLite needs the file and, for its journal and write-ahead log, its folder writable."""
    folder = path.parent
    if path.exists() and not _can_write_file(path):
        return (
            f"the results database {path} cannot be written (the file is read-only); make it "
            "writable, or copy it to a writable place"
        )
    if not _can_create_in(folder):
        return (
            f"the results database {path} cannot be written: its folder {folder} is read-only, "
            "and SQLite keeps its journal beside the file; use a --db in a writable folder"
        )
    return None


def remove_database_files(path: Path) -> None:
    """Remove the database ``path`` with its write-ahead log and shared-memory files (those that
    exist); for a file that a failed call has just created and nothing has used."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)



def connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    """A connection to the database ``path`` set up for the store: busy timeout, foreign keys,
    write-ahead log; a file SQLite cannot open or set up is refused by :func:`open_error`."""
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
    # write lock up front (waiting out the busy timeout) instead of failing on upgrade.
    try:
        conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise open_error(path, exc) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        # Per connection: SQLite enforces foreign keys (and their cascades) only when asked.
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable against a crash of the process (what we must survive); only a
        # power cut can lose the last commits, and the file stays consistent even then.
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as exc:
        conn.close()
        raise open_error(path, exc) from None
    return conn


def open_error(path: Path, exc: sqlite3.Error) -> Exception:
    """The one-line error for a file SQLite could not open or set up: one it cannot write
    (file or folder read-only) is an OSError saying so, anything else is not ours."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CANNOT_WRITE_CODES:
        return OSError(_unwritable_reason(path) or f"{path} cannot be opened ({exc})")
    return ValueError(f"{path} is not a varshift results database ({exc})")
