"""The results store: one SQLite file that holds every trial of every study, so that no trial is
ever lost or run twice.

A study is expanded into all its (config hash, seed) cells up front and inserted idempotently
under a UNIQUE key; one driver writes (the backends only return
:class:`~varshift.lab.results.TrialResult` records); a trial moves ``pending → running →
done|failed`` through guarded updates, and its status and every metric land in one transaction.
WAL mode and a busy timeout let reports read while a study runs. (These rules come from the
maintainers' design notes, ``shared/LAB.md`` beside the repository.) The tables are documented
column by column in ``docs/lab-store.md`` and defined in :mod:`varshift.lab.store_schema`.

:class:`ResultStore` is the API; the work is split by concern into ``store_file`` (opening the
file), ``store_migrate`` (schema check and upgrade), ``store_records`` (the records and errors
re-exported here), ``store_rows`` (cells and results as rows), ``store_studies`` (registering
and finding studies) and ``store_frames`` (data frames and export).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.lab.results import TrialResult
from varshift.lab.store_file import (
    connect,
    database_file,
    make_folder,
    open_error,
    remove_database_files,
)
from varshift.lab.store_frames import EPOCHS_COLUMNS as EPOCHS_COLUMNS
from varshift.lab.store_frames import LAYER_SHIFT_COLUMNS as LAYER_SHIFT_COLUMNS
from varshift.lab.store_frames import TRIALS_COLUMNS as TRIALS_COLUMNS
from varshift.lab.store_frames import (
    ExportFormat,
    export_target,
    frame_rows,
    make_frames,
    write_frames,
)
from varshift.lab.store_lock import DriverLock, DriverLockError
from varshift.lab.store_migrate import open_schema
from varshift.lab.store_records import (
    ABANDONED,
    StatusCounts,
    StoredTrial,
    StoreError,
    StudyChangedError,
    TrialLike,
    WorkerInfo,
)
from varshift.lab.store_rows import FINAL_COLUMNS as FINAL_COLUMNS
from varshift.lab.store_rows import (
    cell_rows,
    check_cells,
    check_seed,
    epoch_rows,
    result_values,
    shift_rows,
    utc_now,
)
from varshift.lab.store_schema import MAX_SEED, STATUSES
from varshift.lab.store_studies import add_study, require_registered, study_filter, study_names

if TYPE_CHECKING:
    import pandas as pd


__all__ = [
    "ABANDONED",
    "MAX_SEED",
    "DriverLock",
    "DriverLockError",
    "ResultStore",
    "StatusCounts",
    "StoreError",
    "StoredTrial",
    "StudyChangedError",
    "TrialLike",
    "WorkerInfo",
    "check_cells",
    "check_seed",
    "remove_database_files",
]


class ResultStore:
    """The SQLite results database at ``path``.

    ``create=True`` (the default, for a driver) creates the file and its parent folder when
    missing and makes sure the file can be written; ``create=False`` (for readers) opens an
    existing file only, a missing one being a :class:`FileNotFoundError`. Either way the file's
    schema is checked completely before anything else happens, an older schema is upgraded, and
    every refusal is a one-line :class:`OSError` or :class:`ValueError` that says what to do. A
    file this call created is removed again if opening it fails.

    Any number of processes may open the same file; only the driver that holds
    :meth:`lock` should write to it. Close the store (or use it as a context manager) so that
    the write-ahead log is folded back into the single ``.db`` file.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = True, timeout_s: float = 30.0
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.path = database_file(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no results database at {self.path}")
        existed = self.path.exists()
        if create:
            make_folder(self.path.parent)
        self._conn: sqlite3.Connection | None = None
        self._wrote = False
        try:
            self._conn = connect(self.path, timeout_s)
            open_schema(self._db, self.path, create=create, transaction=self._write_transaction)
            if create:
                self._check_writable()
        except BaseException:
            self.close()
            if not existed:
                remove_database_files(self.path)
            raise

    def _check_writable(self) -> None:
        """Refuse, before any trial runs, a file that opens but cannot take a write (a read-only
        file whose write-ahead log already exists opens fine and fails only at the first
        result)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
            finally:
                db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise open_error(self.path, exc) from None

    # -- connection and transactions -------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or (on any exception) none of it."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._wrote = True

    @contextmanager
    def _read_snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that several queries see the same snapshot."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        """Fold the write-ahead log into the main file (after writing) and close."""
        if self._conn is None:
            return
        try:
            if self._wrote:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"ResultStore({str(self.path)!r}, {state})"

    def lock(self) -> DriverLock:
        """The driver lock of this database (not yet acquired)."""
        return DriverLock(self.path)

    # -- registering a study -----------------------------------------------------------------

    def register(
        self,
        study: str,
        preset: str,
        spec_hash: str,
        spec: Mapping[str, Any],
        trials: Sequence[TrialLike],
        *,
        extend: bool = False,
    ) -> int:
        """Record ``study``/``preset`` and insert every one of its cells as ``pending``;
        returns how many trials were new. Registering the same spec again adds nothing.

        A spec hash that differs from the stored one raises :class:`StudyChangedError` unless
        ``extend``; extending adds the new cells, keeps the stored ones and refuses a spec that
        no longer contains all of them.
        """
        cells = cell_rows(study, trials)
        now = utc_now()
        with self._write_transaction() as db:
            added = add_study(db, study, preset, spec_hash, spec, cells, now=now, extend=extend)
        return added

    # -- the trial life cycle ----------------------------------------------------------------

    def trials(
        self, study: str, preset: str | None = None, *, status: str | None = None
    ) -> list[StoredTrial]:
        """The stored trials of ``study`` (of one ``preset`` and/or ``status``), by id."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        where, params = study_filter(self._db, self.path, study, preset)
        if status is not None:
            where += " AND t.status = :status"
            params["status"] = status
        rows = self._db.execute(
            "SELECT t.id, t.study, t.arm, t.axes_json, t.config_json, t.config_hash, t.seed, "
            f"t.status, t.attempts FROM trials t WHERE {where} ORDER BY t.id",
            params,
        ).fetchall()
        return [
            StoredTrial(
                id=row[0],
                study=row[1],
                arm=row[2],
                axes=json.loads(row[3]),
                config=json.loads(row[4]),
                config_hash=row[5],
                seed=row[6],
                status=row[7],
                attempts=row[8],
            )
            for row in rows
        ]

    def claim(self, trial_id: int, *, worker: WorkerInfo | None = None) -> bool:
        """Move one trial ``pending → running``; False, changing nothing, if it was not
        pending — so a trial can never be claimed twice.

        Claiming does not count an attempt: :meth:`mark_started` does, once a worker has
        really begun the trial, so a driver killed while its workers start up costs nothing.
        """
        host, pid = (worker.hostname, worker.pid) if worker else (socket.gethostname(), os.getpid())
        with self._write_transaction() as db:
            changed = db.execute(
                "UPDATE trials SET status = 'running', started = NULL, finished = NULL, "
                "hostname = :host, pid = :pid WHERE id = :id AND status = 'pending'",
                {"host": host, "pid": pid, "id": trial_id},
            ).rowcount
        return changed == 1

    def mark_started(self, trial_id: int) -> None:
        """Record that a worker has begun the running trial ``trial_id``: one attempt more, and
        ``started`` set. Raises :class:`StoreError` if the trial is not running or was already
        marked for this claim."""
        with self._write_transaction() as db:
            changed = db.execute(
                "UPDATE trials SET attempts = attempts + 1, started = :now "
                "WHERE id = :id AND status = 'running' AND started IS NULL",
                {"now": utc_now(), "id": trial_id},
            ).rowcount
            if changed != 1:
                raise StoreError(
                    f"trial {trial_id} is {self._status_of(db, trial_id)} or already started; "
                    "only a claimed trial can start"
                )

    @staticmethod
    def _status_of(db: sqlite3.Connection, trial_id: int) -> str:
        row = db.execute("SELECT status FROM trials WHERE id = ?", (trial_id,)).fetchone()
        return "missing" if row is None else str(row[0])

    def finish(
        self, trial_id: int, result: TrialResult, *, worker: WorkerInfo | None = None
    ) -> None:
        """Record a running trial's result: status, final metrics, epochs and layer shifts in
        one transaction. Raises :class:`StoreError` (writing nothing) if the trial is not
        running, so a result is recorded at most once. A trial that finished without being
        marked started (a backend that cannot tell) counts its attempt now."""
        values = result_values(trial_id, result, worker)
        with self._write_transaction() as db:
            changed = db.execute(
                "UPDATE trials SET status = :status, finished = :now, "
                "attempts = attempts + (started IS NULL), started = COALESCE(started, :now), "
                "wall_time_s = :wall_time_s, error = :error, traceback = :traceback, "
                "metric_name = :metric_name, higher_is_better = :higher_is_better, "
                "test_metric = :test_metric, test_loss = :test_loss, "
                "recal_test_metric = :recal_test_metric, recal_test_loss = :recal_test_loss, "
                "final_json = :final_json, meta_json = :meta_json, "
                "varshift_version = COALESCE(:varshift_version, varshift_version), "
                "torch_version = COALESCE(:torch_version, torch_version), "
                "hostname = COALESCE(:hostname, hostname), pid = COALESCE(:pid, pid) "
                "WHERE id = :id AND status = 'running'",
                values,
            ).rowcount
            if changed != 1:
                raise StoreError(
                    f"trial {trial_id} is {self._status_of(db, trial_id)}, not running; its "
                    "result was not recorded"
                )
            # No rows of an earlier attempt to clear: the trigger forget_earlier_attempt deleted
            # them when the trial went back to pending.
            db.executemany(
                "INSERT INTO epochs (trial_id, epoch, train_loss, test_loss, test_metric, "
                "extra_json) VALUES (?, ?, ?, ?, ?, ?)",
                epoch_rows(trial_id, result),
            )
            db.executemany(
                "INSERT INTO layer_shift (trial_id, layer, depth, train_var, eval_var, "
                "running_var, ratio, predicted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                shift_rows(trial_id, result),
            )

    def release(self, trial_ids: Iterable[int]) -> int:
        """Put running trials back to ``pending`` without counting the attempt (the user
        stopped the run; the trial did nothing wrong). Returns how many were released."""
        ids = [(trial_id,) for trial_id in trial_ids]
        with self._write_transaction() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE trials SET status = 'pending', "
                "attempts = MAX(attempts - (started IS NOT NULL), 0), started = NULL "
                "WHERE id = ? AND status = 'running'",
                ids,
            )
            return db.total_changes - before

    def recover(self, *, max_attempts: int) -> tuple[int, int]:
        """Return every ``running`` trial of the file to ``pending`` — call it only while
        holding :meth:`lock`, when any running trial belongs to a driver that died.

        A trial that had started its ``max_attempts``-th attempt is marked ``failed`` instead
        (error :data:`ABANDONED`), so a trial that kills its driver (e.g. out of memory) cannot
        loop forever; a trial claimed but never started was not tried and is simply re-queued.
        Returns ``(requeued, abandoned)``. The limit is the runner's
        :data:`~varshift.lab.runner.DEFAULT_MAX_ATTEMPTS` unless the caller chose another.
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        with self._write_transaction() as db:
            abandoned = db.execute(
                "UPDATE trials SET status = 'failed', finished = :now, error = :prefix || "
                "' the driver died while running this trial ' || attempts || ' times' "
                "WHERE status = 'running' AND started IS NOT NULL AND attempts >= :limit",
                {"now": utc_now(), "prefix": ABANDONED, "limit": max_attempts},
            ).rowcount
            requeued = db.execute(
                "UPDATE trials SET status = 'pending', started = NULL WHERE status = 'running'"
            ).rowcount
        return requeued, abandoned

    def reset_failed(self, study: str, preset: str | None = None) -> int:
        """Put the failed trials of ``study`` back to ``pending`` with a fresh attempt count
        (``--retry-failed``); returns how many. Their epochs and layer shifts go with the
        status change (the trigger ``forget_earlier_attempt``)."""
        where, params = study_filter(self._db, self.path, study, preset)
        with self._write_transaction() as db:
            return db.execute(
                "UPDATE trials SET status = 'pending', attempts = 0, started = NULL, "
                "finished = NULL, error = NULL, traceback = NULL "
                f"WHERE id IN (SELECT t.id FROM trials t WHERE {where} AND t.status = 'failed')",
                params,
            ).rowcount

    # -- reading -----------------------------------------------------------------------------

    def study_names(self) -> list[str]:
        """The studies in this file, sorted."""
        return study_names(self._db)

    def presets(self, study: str) -> list[str]:
        """The presets of ``study`` that were registered, sorted."""
        require_registered(self._db, self.path, study)
        rows = self._db.execute(
            "SELECT preset FROM studies WHERE name = ? ORDER BY preset", (study,)
        )
        return [r[0] for r in rows]

    def spec(self, study: str, preset: str) -> tuple[str, dict[str, Any]]:
        """The stored ``(spec_hash, spec)`` of one preset of ``study``."""
        require_registered(self._db, self.path, study, preset)
        row = self._db.execute(
            "SELECT spec_hash, spec_json FROM studies WHERE name = ? AND preset = ?",
            (study, preset),
        ).fetchone()
        return row[0], json.loads(row[1])

    def summary(self, study: str, preset: str | None = None) -> dict[str, int]:
        """How many trials of ``study`` are in each status (every status present, 0 if none)."""
        where, params = study_filter(self._db, self.path, study, preset)
        counts = dict.fromkeys(STATUSES, 0)
        for status, count in self._db.execute(
            f"SELECT t.status, COUNT(*) FROM trials t WHERE {where} GROUP BY t.status", params
        ):
            counts[status] = count
        return counts

    def status_counts(self, study: str, preset: str | None = None) -> StatusCounts:
        """How far ``study`` (or one preset) has got: trials by status, by attempts, and how
        many were abandoned at the attempt limit — what ``varshift lab status`` prints."""
        where, params = study_filter(self._db, self.path, study, preset)
        with self._read_snapshot() as db:
            rows = db.execute(
                "SELECT t.status, t.attempts, t.status = 'failed' AND t.error LIKE :prefix, "
                f"COUNT(*) FROM trials t WHERE {where} GROUP BY 1, 2, 3",
                {"prefix": f"{ABANDONED}%", **params},
            ).fetchall()
        by_status = dict.fromkeys(STATUSES, 0)
        attempts: dict[int, int] = {}
        abandoned = 0
        for status, tries, was_abandoned, count in rows:
            by_status[status] += count
            attempts[tries] = attempts.get(tries, 0) + count
            abandoned += count if was_abandoned else 0
        return StatusCounts(by_status, dict(sorted(attempts.items())), abandoned)

    def frames(self, study: str, preset: str | None = None) -> dict[str, pd.DataFrame]:
        """The trials, epochs and layer shifts of ``study`` as pandas data frames.

        Columns are those of ``docs/architecture.md`` ("Lab data frames"); ``trials`` has one
        more column per swept axis (named ``axis_<name>`` where an axis name would clash with a
        fixed column). ``preset=None`` takes every trial of the study. All three frames come
        from one snapshot, so a writer committing meanwhile cannot make them disagree.
        """
        where, params = study_filter(self._db, self.path, study, preset)
        with self._read_snapshot() as db:
            rows = frame_rows(db, where, params)
        return make_frames(rows)

    def export(
        self,
        study: str,
        out: str | os.PathLike[str],
        fmt: ExportFormat = "csv",
        *,
        preset: str | None = None,
    ) -> list[Path]:
        """Write :meth:`frames` of ``study`` as CSV or Parquet files; returns their paths.

        ``out`` is a folder (created; files ``<study>_trials.csv`` and so on) or a file name
        ending in ``.csv``/``.parquet``, whose stem prefixes the three files
        (``results.csv`` → ``results_trials.csv``, ...).
        """
        folder, stem = export_target(study, out, fmt)
        return write_frames(self.frames(study, preset), folder, stem, fmt)
