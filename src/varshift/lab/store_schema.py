"""The SQL schema of the results store (documented column by column in ``docs/lab-store.md``).

Kept apart from :mod:`varshift.lab.store` so that the tables can be read as one piece. Each fact
has one source: the trial statuses are :data:`STATUSES` (the SQL ``CHECK`` is generated from it),
child rows belong to their trial through foreign keys that the database enforces (the store turns
``PRAGMA foreign_keys`` on for every connection), and a trial sent back to ``pending`` loses the
rows of its earlier attempt through a trigger, not through deletes scattered in Python.

Bump :data:`SCHEMA_VERSION` whenever a table changes and add the step to :data:`MIGRATIONS`, so
that existing databases are upgraded when opened; a file of a version with no migration path is
refused with a message that says what to do.
"""

from __future__ import annotations

import functools
import sqlite3

__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "MAX_SEED",
    "STATUSES",
    "expected_schema",
    "schema_contents",
    "schema_statements",
]

SCHEMA_VERSION = 2

#: Every status a trial can have, in the order of its life: ``pending → running → done|failed``.
STATUSES = ("pending", "running", "done", "failed")
# Seeds are stored in an SQLite INTEGER column: a signed 64-bit integer.
MAX_SEED = 2**63 - 1

_STATUS_CHECK = "CHECK (status IN ({}))".format(", ".join(f"'{status}'" for status in STATUSES))

# The child tables, written once and used both to create a new file and to migrate version 1.
_PRESET_TRIALS = """
CREATE TABLE IF NOT EXISTS preset_trials (
    study    TEXT NOT NULL,
    preset   TEXT NOT NULL,
    trial_id INTEGER NOT NULL REFERENCES trials (id) ON DELETE CASCADE,
    PRIMARY KEY (study, preset, trial_id)
)"""

_EPOCHS = """
CREATE TABLE IF NOT EXISTS epochs (
    trial_id    INTEGER NOT NULL REFERENCES trials (id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL,
    train_loss  REAL,
    test_loss   REAL,
    test_metric REAL,
    extra_json  TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (trial_id, epoch)
)"""

_LAYER_SHIFT = """
CREATE TABLE IF NOT EXISTS layer_shift (
    trial_id    INTEGER NOT NULL REFERENCES trials (id) ON DELETE CASCADE,
    layer       TEXT NOT NULL,
    depth       INTEGER NOT NULL,
    train_var   REAL,
    eval_var    REAL,
    running_var REAL,
    ratio       REAL,
    predicted   REAL,
    PRIMARY KEY (trial_id, layer)
)"""

# A trial that goes back to pending (recovered, or re-queued by --retry-failed) will be run again:
# the epochs and layer shifts of its earlier attempt must not survive next to the new ones.
_FORGET_EARLIER_ATTEMPT = """
CREATE TRIGGER IF NOT EXISTS forget_earlier_attempt
AFTER UPDATE OF status ON trials
WHEN NEW.status = 'pending' AND OLD.status != 'pending'
BEGIN
    DELETE FROM epochs WHERE trial_id = NEW.id;
    DELETE FROM layer_shift WHERE trial_id = NEW.id;
END"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS studies (
    name        TEXT NOT NULL,
    preset      TEXT NOT NULL,
    spec_hash   TEXT NOT NULL,
    spec_json   TEXT NOT NULL,
    created     TEXT NOT NULL,
    updated     TEXT NOT NULL,
    PRIMARY KEY (name, preset)
);

CREATE TABLE IF NOT EXISTS trials (
    id                INTEGER PRIMARY KEY,
    study             TEXT NOT NULL,
    preset            TEXT NOT NULL,
    arm               TEXT NOT NULL,
    axes_json         TEXT NOT NULL,
    config_json       TEXT NOT NULL,
    config_hash       TEXT NOT NULL,
    seed              INTEGER NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending'
                      {_STATUS_CHECK},
    attempts          INTEGER NOT NULL DEFAULT 0,
    started           TEXT,
    finished          TEXT,
    wall_time_s       REAL,
    error             TEXT,
    traceback         TEXT,
    metric_name       TEXT,
    higher_is_better  INTEGER,
    test_metric       REAL,
    test_loss         REAL,
    recal_test_metric REAL,
    recal_test_loss   REAL,
    final_json        TEXT,
    meta_json         TEXT,
    varshift_version  TEXT,
    torch_version     TEXT,
    hostname          TEXT,
    pid               INTEGER,
    UNIQUE (study, config_hash, seed)
);
CREATE INDEX IF NOT EXISTS trials_by_status ON trials (study, status);
{_PRESET_TRIALS};
{_EPOCHS};
{_LAYER_SHIFT};
{_FORGET_EARLIER_ATTEMPT};
"""


def _rebuild(table: str, create: str) -> list[str]:
    """Statements that give ``table`` a new definition and keep its rows (SQLite cannot add a
    foreign-key action to an existing table)."""
    return [
        f"ALTER TABLE {table} RENAME TO {table}_old",
        create,
        f"INSERT INTO {table} SELECT * FROM {table}_old",
        f"DROP TABLE {table}_old",
    ]


#: ``MIGRATIONS[v]``: the statements that turn a version ``v`` file into version ``v + 1``; the
#: store runs them in one transaction when it opens an older file.
MIGRATIONS: dict[int, list[str]] = {
    # 1 → 2: child rows are deleted with their trial (ON DELETE CASCADE), and by the trigger
    # when the trial goes back to pending. The columns did not change.
    1: [
        *_rebuild("preset_trials", _PRESET_TRIALS),
        *_rebuild("epochs", _EPOCHS),
        *_rebuild("layer_shift", _LAYER_SHIFT),
        _FORGET_EARLIER_ATTEMPT,
    ],
}


def schema_statements() -> list[str]:
    """:data:`SCHEMA` as single statements (the trigger's body holds semicolons of its own)."""
    statements: list[str] = []
    pending = ""
    for piece in SCHEMA.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    return statements


@functools.cache
def expected_schema() -> dict[str, tuple[str, ...]]:
    """What a current file must contain: each table's column names, and each trigger (as
    ``"trigger <name>"`` with no columns) — read from :data:`SCHEMA` built in memory, so that
    the check can never drift from the definition."""
    db = sqlite3.connect(":memory:")
    try:
        for statement in schema_statements():
            db.execute(statement)
        return schema_contents(db)
    finally:
        db.close()


def schema_contents(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    """The tables (with their columns) and triggers of ``db``, as :func:`expected_schema`
    describes them."""
    found: dict[str, tuple[str, ...]] = {}
    listed = db.execute(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'trigger') "
        "AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    for kind, name in listed:
        if kind == "trigger":
            found[f"trigger {name}"] = ()
        else:
            columns = db.execute(f"PRAGMA table_info('{name}')").fetchall()
            found[name] = tuple(column[1] for column in columns)
    return found
