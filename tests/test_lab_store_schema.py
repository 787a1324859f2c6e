"""The results store's schema and how it opens a file: one source for the statuses, child rows
that the database removes, the upgrade of a version-1 file, and one-line refusals (before any
trial runs) of paths and files that cannot be a working results database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from helpers.tiny_lab import TinyStudy, run_tiny, tiny_trial, two_arm_study
from varshift.lab.store import ResultStore
from varshift.lab.store_schema import SCHEMA_VERSION, STATUSES

# The schema of version 1 exactly as varshift created it (store_schema.SCHEMA at version 1),
# kept verbatim to test the upgrade.
V1_SCHEMA = """
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
INSERT INTO meta VALUES ('schema_version', '1');
"""


def _v1_database(path: Path) -> None:
    """A version-1 file with one done trial (two epochs, one layer shift) and one failed trial
    that left an epoch behind, as a failed attempt can."""
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.executescript(
        """
        INSERT INTO studies VALUES ('s', 'quick', 'h1', '{}', 't0', 't0');
        INSERT INTO trials (id, study, preset, arm, axes_json, config_json, config_hash, seed,
                            status, attempts, metric_name, higher_is_better, test_metric)
        VALUES (1, 's', 'quick', 'a', '{"p": 0.1}', '{"p": 0.1}', 'c1', 0, 'done', 1,
                'accuracy', 1, 0.75),
               (2, 's', 'quick', 'a', '{"p": 0.1}', '{"p": 0.1}', 'c1', 1, 'failed', 1,
                'accuracy', 1, NULL);
        INSERT INTO preset_trials VALUES ('s', 'quick', 1), ('s', 'quick', 2);
        INSERT INTO epochs (trial_id, epoch, train_loss, test_loss, test_metric)
        VALUES (1, 1, 0.9, 0.8, 0.5), (1, 2, 0.7, 0.6, 0.75), (2, 1, 1.0, 1.0, 0.1);
        INSERT INTO layer_shift VALUES (1, 'net.2', 0, 1.0, 1.2, 1.1, 1.2, 1.25);
        """
    )
    db.commit()
    db.close()


def _count(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def test_a_version_1_file_is_upgraded_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _v1_database(path)
    with ResultStore(path, create=False) as store:
        version = store._db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone()[0] == str(SCHEMA_VERSION)
        frames = store.frames("s")
        assert frames["trials"].status.tolist() == ["done", "failed"]
        assert frames["epochs"].trial_id.tolist() == [1, 1, 2]
        assert frames["layer_shift"].ratio.tolist() == [1.2]
        # The upgraded file has the new behaviour: a retried trial forgets its old epochs.
        assert store.reset_failed("s") == 1
        assert store.frames("s")["epochs"].trial_id.tolist() == [1, 1]
    # Opening the upgraded file again changes nothing.
    with ResultStore(path) as store:
        assert store.summary("s") == {"pending": 1, "running": 0, "done": 1, "failed": 0}


def test_deleting_a_trial_deletes_its_rows_in_every_child_table(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    _v1_database(path)
    with ResultStore(path) as store, store._write_transaction() as db:
        db.execute("DELETE FROM trials WHERE id = 1")
    assert [_count(path, t) for t in ("epochs", "layer_shift", "preset_trials")] == [1, 0, 1]


def test_a_failed_trial_run_again_keeps_only_its_new_epochs(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as store:
        store.register("s", "quick", "h", {}, two_arm_study().expand("quick")[:1])
        [trial] = store.trials("s")
        good = tiny_trial({"epochs": 2}, 0)
        # A failed attempt that got through three epochs, then the retry with two.
        failed = replace(tiny_trial({"epochs": 3}, 0), status="failed", error="diverged")
        assert store.claim(trial.id)
        store.finish(trial.id, failed)
        assert len(store.frames("s")["epochs"]) == 3
        store.reset_failed("s")
        assert store.frames("s")["epochs"].empty
        assert store.claim(trial.id)
        store.finish(trial.id, good)
        assert store.frames("s")["epochs"].epoch.tolist() == [1, 2]


def test_the_status_check_accepts_exactly_the_statuses(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as store:
        store.register("s", "quick", "h", {}, two_arm_study().expand("quick")[:1])
        for status in STATUSES:
            with store._write_transaction() as db:
                db.execute("UPDATE trials SET status = ?", (status,))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"), store._write_transaction() as db:
            db.execute("UPDATE trials SET status = 'paused'")


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("99", r"schema version 99, newer than this varshift reads \(2\): upgrade varshift"),
        ("0", r"schema version 0; this varshift needs 2 .* `varshift lab export` .* new --db"),
        ("two", r"has no valid schema version \('two'\).* start a new --db"),
    ],
)
def test_a_schema_version_it_cannot_read_says_what_to_do(
    tmp_path: Path, version: str, message: str
) -> None:
    path = tmp_path / "r.db"
    ResultStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    db.commit()
    db.close()
    with pytest.raises(ValueError, match=message):
        ResultStore(path, create=False)


def test_a_damaged_file_is_refused_before_any_trial_runs(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    study = two_arm_study()
    with ResultStore(path) as store:
        store.register("tiny", "quick", study.spec_hash("quick"), {}, study.expand("quick"))
    db = sqlite3.connect(path)
    db.execute("DROP TABLE epochs")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match=r"r.db is a damaged .* it lacks table epochs; export"):
        run_tiny(study, path)
    db = sqlite3.connect(path)
    statuses = {row[0] for row in db.execute("SELECT status FROM trials")}
    db.close()
    assert statuses == {"pending"}  # nothing ran, so no result was lost


def test_an_empty_path_or_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the results database path is empty; name a file"):
        ResultStore("")
    with pytest.raises(IsADirectoryError, match=r"is a directory; name a file, e.g. .*lab.db"):
        ResultStore(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        run_tiny(two_arm_study(), tmp_path)


@contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make ``path`` (file or folder) read-only for this process: by its mode bits, or, for
    root, whom mode bits do not stop, with the immutable attribute."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a file read-only for root here ({exc})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_file_is_refused_before_any_trial_runs(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    ResultStore(path).close()
    with _read_only(path), pytest.raises(OSError, match=r"cannot be written \(the file is read"):
        run_tiny(two_arm_study(), path)
    with ResultStore(path) as store:
        assert store.study_names() == []


def test_a_file_in_a_read_only_folder_is_called_unwritable_not_foreign(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    path = folder / "r.db"
    ResultStore(path).close()
    with _read_only(folder), pytest.raises(OSError, match=r"its folder .*runs is read-only"):
        ResultStore(path)
    with _read_only(folder), pytest.raises(OSError, match=r"its folder .*runs is read-only"):
        ResultStore(folder / "new.db")
    assert not (folder / "new.db").exists()


def test_a_seed_beyond_64_bits_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with pytest.raises(ValueError, match=r"arm 'low'.*from 0 to 2\*\*63 - 1.*got 18446744073709"):
        run_tiny(TinyStudy({"low": {"p": 0.1}}, seeds=(0, 2**64)), path)
    assert list(tmp_path.iterdir()) == []
    negative = TinyStudy({"a": {}}, seeds=(-1,)).expand("quick")
    with ResultStore(path) as store:
        with pytest.raises(ValueError, match="seed must be an integer"):
            store.register("s", "quick", "h", {}, negative)
        assert store.study_names() == []


def test_ray_missing_is_refused_before_the_database_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'varshift\[ray\]'"):
        run_tiny(two_arm_study(), tmp_path / "r.db", backend="ray", workers=2)
    assert list(tmp_path.iterdir()) == []


def test_a_new_database_is_removed_when_the_run_fails_before_any_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_backend(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the cluster is down")

    monkeypatch.setattr("varshift.lab.runner.make_backend", no_backend)
    with pytest.raises(RuntimeError, match="the cluster is down"):
        run_tiny(two_arm_study(), tmp_path / "new.db")
    assert list(tmp_path.iterdir()) == []
    # A database that was there before is never removed.
    ResultStore(tmp_path / "old.db").close()
    with pytest.raises(RuntimeError, match="the cluster is down"):
        run_tiny(two_arm_study(), tmp_path / "old.db")
    with ResultStore(tmp_path / "old.db", create=False) as store:
        assert store.summary("tiny")["pending"] == 4


def _definitions(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        return {name: " ".join(sql.split()) for name, sql in rows}
    finally:
        db.close()


def test_an_upgraded_file_has_the_schema_of_a_new_one(tmp_path: Path) -> None:
    _v1_database(tmp_path / "old.db")
    ResultStore(tmp_path / "old.db").close()
    ResultStore(tmp_path / "new.db").close()
    assert _definitions(tmp_path / "old.db") == _definitions(tmp_path / "new.db")
