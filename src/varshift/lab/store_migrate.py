"""Bringing a results database's schema to this varshift's: creating the tables in a new file,
upgrading an older schema through :data:`~varshift.lab.store_schema.MIGRATIONS`, and checking
that every table, column and trigger is there (:class:`~varshift.lab.store.ResultStore` calls
:func:`open_schema` when it opens a file).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from varshift.lab.store_file import open_error
from varshift.lab.store_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    expected_schema,
    schema_contents,
    schema_statements,
)

__all__ = ["WriteTransaction", "open_schema", "schema_version"]

#: How the store opens one write transaction (all of it commits, or none of it).
WriteTransaction = Callable[[], AbstractContextManager[sqlite3.Connection]]


def _missing_schema(found: Mapping[str, Sequence[str]]) -> list[str]:
    """What :func:`~varshift.lab.store_schema.expected_schema` has and ``found`` lacks, as
    ``"table epochs"``, ``"column trials.seed"``, ``"trigger ..."``."""
    missing: list[str] = []
    for name, columns in expected_schema().items():
        if name not in found:
            missing.append(name if name.startswith("trigger ") else f"table {name}")
            continue
        missing.extend(f"column {name}.{c}" for c in columns if c not in found[name])
    return missing


def open_schema(
    db: sqlite3.Connection, path: Path, *, create: bool, transaction: WriteTransaction
) -> None:
    """Create the tables in a new (empty) file, upgrade an older schema, and check that
    every table, column and trigger is there — so that a damaged file is refused now, not
    after a trial has run and its result could not be written."""
    try:
        found = schema_contents(db)
        if "meta" not in found:
            # Never add our tables to someone else's database.
            if not create or found:
                raise ValueError(f"{path} is not a varshift results database (no meta table)")
            with transaction():
                for statement in schema_statements():
                    db.execute(statement)
                # OR IGNORE: another process may have created the file meanwhile.
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        version = schema_version(db, path)
        if version < SCHEMA_VERSION:
            _migrate(path, transaction)
        missing = _missing_schema(schema_contents(db))
    except sqlite3.Error as exc:
        raise open_error(path, exc) from None
    if missing:
        raise ValueError(
            f"{path} is a damaged varshift results database: it lacks "
            f"{', '.join(missing)}; export what it holds with `varshift lab export` and "
            "start a new --db"
        )


def schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The file's schema version; refuses one this varshift can neither read nor upgrade."""
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    text = None if row is None else str(row[0])
    version = int(text) if text is not None and text.isdigit() else None
    if version is None:
        raise ValueError(
            f"results database {path} has no valid schema version ({text!r}); it is "
            "damaged or not varshift's: start a new --db"
        )
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"results database {path} has schema version {version}, newer than this "
            f"varshift reads ({SCHEMA_VERSION}): upgrade varshift, or start a new --db"
        )
    if version < SCHEMA_VERSION and version not in MIGRATIONS:
        raise ValueError(
            f"results database {path} has schema version {version}; this varshift "
            f"needs {SCHEMA_VERSION} and cannot upgrade it: run `varshift lab export` with "
            "the varshift that wrote it, or start a new --db"
        )
    return version


def _migrate(path: Path, transaction: WriteTransaction) -> None:
    """Upgrade the file to :data:`~varshift.lab.store_schema.SCHEMA_VERSION` in one transaction
    (all steps or none, so an interrupted upgrade leaves the old file as it was)."""
    with transaction() as db:
        # Read again under the write lock: another process may have upgraded it meanwhile.
        version = schema_version(db, path)
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                db.execute(statement)
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )
