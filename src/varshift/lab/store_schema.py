"""The SQL schema of the results store (documented column by column in ``docs/lab-store.md``).

Kept apart from :mod:`varshift.lab.store` so that the tables can be read as one piece; bump
:data:`SCHEMA_VERSION` whenever a table changes, and the store refuses files of another version
instead of misreading them.
"""

from __future__ import annotations

__all__ = ["SCHEMA", "SCHEMA_VERSION", "STATUSES"]

SCHEMA_VERSION = 1

STATUSES = ("pending", "running", "done", "failed")

SCHEMA = """
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
                      CHECK (status IN ('pending', 'running', 'done', 'failed')),
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

CREATE TABLE IF NOT EXISTS preset_trials (
    study    TEXT NOT NULL,
    preset   TEXT NOT NULL,
    trial_id INTEGER NOT NULL REFERENCES trials (id),
    PRIMARY KEY (study, preset, trial_id)
);

CREATE TABLE IF NOT EXISTS epochs (
    trial_id    INTEGER NOT NULL REFERENCES trials (id),
    epoch       INTEGER NOT NULL,
    train_loss  REAL,
    test_loss   REAL,
    test_metric REAL,
    extra_json  TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (trial_id, epoch)
);

CREATE TABLE IF NOT EXISTS layer_shift (
    trial_id    INTEGER NOT NULL REFERENCES trials (id),
    layer       TEXT NOT NULL,
    depth       INTEGER NOT NULL,
    train_var   REAL,
    eval_var    REAL,
    running_var REAL,
    ratio       REAL,
    predicted   REAL,
    PRIMARY KEY (trial_id, layer)
);
"""
