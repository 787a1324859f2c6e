"""The results store: one SQLite file that holds every trial of every study, so that no trial is
ever lost or run twice.

The design follows ``LAB.md``: a study is expanded into all its (config hash, seed) cells up front
and inserted idempotently under a UNIQUE key; one driver writes (the backends only return
:class:`~varshift.lab.results.TrialResult` records); a trial moves ``pending → running →
done|failed`` through guarded updates, and its status and every metric land in one transaction.
WAL mode and a busy timeout let reports read while a study runs. The tables are documented
column by column in ``docs/lab-store.md``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from varshift.lab.results import TrialResult
from varshift.lab.store_lock import DriverLock, DriverLockError
from varshift.lab.store_schema import SCHEMA, SCHEMA_VERSION, STATUSES

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DriverLock",
    "DriverLockError",
    "ResultStore",
    "StoreError",
    "StoredTrial",
    "StudyChangedError",
    "TrialLike",
    "WorkerInfo",
]

# The final metrics that get a column of their own (the rest stay in ``final_json``).
FINAL_COLUMNS = ("test_metric", "test_loss", "recal_test_metric", "recal_test_loss")

TRIALS_COLUMNS = (
    "trial_id",
    "arm",
    "seed",
    "status",
    "metric_name",
    "higher_is_better",
    *FINAL_COLUMNS,
    "wall_time_s",
    "error",
)
EPOCHS_COLUMNS = ("trial_id", "arm", "seed", "epoch", "train_loss", "test_loss", "test_metric")
LAYER_SHIFT_COLUMNS = (
    "trial_id",
    "arm",
    "seed",
    "layer",
    "depth",
    "train_var",
    "eval_var",
    "running_var",
    "ratio",
    "predicted",
)

ExportFormat = Literal["csv", "parquet"]


class StoreError(RuntimeError):
    """The store refused an operation that would break its invariants (e.g. finishing a trial
    that is not running)."""


class StudyChangedError(ValueError):
    """A study's spec differs from the one stored for it, and extending was not asked for (or
    the new spec drops stored cells, which extending cannot do)."""


class TrialLike(Protocol):
    """What the store needs of one cell of a study (:class:`varshift.lab.study.TrialSpec`
    satisfies it; ``config`` is anything with ``to_dict()`` or a mapping)."""

    @property
    def arm(self) -> str: ...
    @property
    def axes(self) -> Mapping[str, Any]: ...
    @property
    def config(self) -> Any: ...
    @property
    def seed(self) -> int: ...
    @property
    def config_hash(self) -> str: ...


@dataclass(frozen=True)
class StoredTrial:
    """One row of the ``trials`` table, as the runner needs it."""

    id: int
    study: str
    arm: str
    axes: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    seed: int
    status: str
    attempts: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.config_hash, self.seed)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a trial ran and with which versions; recorded beside its result."""

    hostname: str
    pid: int
    varshift_version: str
    torch_version: str

    @classmethod
    def here(cls) -> WorkerInfo:
        """The current process (call it inside the worker that ran the trial)."""
        import torch

        from varshift import __version__

        return cls(socket.gethostname(), os.getpid(), __version__, str(torch.__version__))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"a trial config must have to_dict() or be a mapping, got {type(config)!r}")


def _dumps(value: Any) -> str:
    # sort_keys: the same config always gives the same text, so files diff cleanly.
    return json.dumps(value, sort_keys=True)


def _real(value: Any) -> float | None:
    """A metric as SQLite stores it: NaN becomes NULL (SQLite would do so silently anyway)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


class ResultStore:
    """The SQLite results database at ``path`` (created with its parent folder unless
    ``create=False``, in which case a missing file is a :class:`FileNotFoundError`).

    Any number of processes may open the same file; only the driver that holds
    :meth:`lock` should write to it. Close the store (or use it as a context manager) so that
    the write-ahead log is folded back into the single ``.db`` file.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = True, timeout_s: float = 30.0
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no results database at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
        # write lock up front (waiting out the busy timeout) instead of failing on upgrade.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=timeout_s, isolation_level=None
        )
        self._wrote = False
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable against a crash of the process (what we must survive); only a
            # power cut can lose the last commits, and the file stays consistent even then.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._ensure_schema(create)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            self._conn = None
            raise ValueError(f"{self.path} is not a varshift results database ({exc})") from None

    # -- connection and transactions -------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
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
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that several queries see the same snapshot."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def _ensure_schema(self, create: bool) -> None:
        db = self._db
        listed = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {row[0] for row in listed}
        if "meta" not in tables:
            # Never add our tables to someone else's database.
            if not create or tables:
                raise ValueError(f"{self.path} is not a varshift results database (no meta table)")
            with self._write():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            found = "none" if row is None else row[0]
            raise ValueError(
                f"{self.path} has results schema version {found}; this varshift reads "
                f"version {SCHEMA_VERSION}"
            )

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
        rows = []
        seen: dict[tuple[str, int], str] = {}
        for trial in trials:
            key = (trial.config_hash, int(trial.seed))
            if key in seen:
                raise ValueError(
                    f"study {study!r}: arms {seen[key]!r} and {trial.arm!r} have the same config "
                    f"(hash {trial.config_hash}) and seed {trial.seed}; each cell must be unique"
                )
            seen[key] = trial.arm
            rows.append(
                (
                    study,
                    preset,
                    trial.arm,
                    json.dumps(dict(trial.axes)),  # unsorted: the study's axis order
                    _dumps(_config_dict(trial.config)),
                    trial.config_hash,
                    int(trial.seed),
                )
            )
        now = _now()
        with self._write() as db:
            stored = db.execute(
                "SELECT spec_hash FROM studies WHERE name = ? AND preset = ?", (study, preset)
            ).fetchone()
            if stored is None:
                db.execute(
                    "INSERT INTO studies (name, preset, spec_hash, spec_json, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (study, preset, spec_hash, _dumps(dict(spec)), now, now),
                )
            elif stored[0] != spec_hash:
                self._check_extension(db, study, preset, stored[0], spec_hash, seen, extend)
                db.execute(
                    "UPDATE studies SET spec_hash = ?, spec_json = ?, updated = ? "
                    "WHERE name = ? AND preset = ?",
                    (spec_hash, _dumps(dict(spec)), now, study, preset),
                )
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO trials "
                "(study, preset, arm, axes_json, config_json, config_hash, seed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            added = db.total_changes - before
            db.executemany(
                "INSERT OR IGNORE INTO preset_trials (study, preset, trial_id) "
                "SELECT study, ?, id FROM trials WHERE study = ? AND config_hash = ? AND seed = ?",
                [(preset, study, config_hash, seed) for config_hash, seed in seen],
            )
        return added

    @staticmethod
    def _check_extension(
        db: sqlite3.Connection,
        study: str,
        preset: str,
        old_hash: str,
        new_hash: str,
        new_keys: Mapping[tuple[str, int], str],
        extend: bool,
    ) -> None:
        if not extend:
            raise StudyChangedError(
                f"study {study!r} (preset {preset!r}) has changed since it was stored "
                f"(spec {old_hash[:12]} -> {new_hash[:12]}); pass --extend to add its new "
                "cells only, or use another --db"
            )
        dropped = [
            (arm, seed)
            for arm, config_hash, seed in db.execute(
                "SELECT t.arm, t.config_hash, t.seed FROM trials t JOIN preset_trials p "
                "ON p.trial_id = t.id WHERE p.study = ? AND p.preset = ?",
                (study, preset),
            )
            if (config_hash, seed) not in new_keys
        ]
        if dropped:
            arm, seed = dropped[0]
            raise StudyChangedError(
                f"cannot extend study {study!r} (preset {preset!r}): {len(dropped)} stored "
                f"trials (e.g. arm {arm!r} seed {seed}) are not in the new spec; extending only "
                "adds cells, so use another --db"
            )

    # -- the trial life cycle ----------------------------------------------------------------

    def trials(
        self, study: str, preset: str | None = None, *, status: str | None = None
    ) -> list[StoredTrial]:
        """The stored trials of ``study`` (of one ``preset`` and/or ``status``), by id."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        where, params = self._where(study, preset)
        if status is not None:
            where += " AND t.status = ?"
            params.append(status)
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
        """Move one trial ``pending → running`` (counting an attempt); False, changing nothing,
        if it was not pending — so a trial can never be claimed twice."""
        host, pid = (worker.hostname, worker.pid) if worker else (socket.gethostname(), os.getpid())
        with self._write() as db:
            changed = db.execute(
                "UPDATE trials SET status = 'running', attempts = attempts + 1, started = ?, "
                "finished = NULL, hostname = ?, pid = ? WHERE id = ? AND status = 'pending'",
                (_now(), host, pid, trial_id),
            ).rowcount
        return changed == 1

    def finish(
        self, trial_id: int, result: TrialResult, *, worker: WorkerInfo | None = None
    ) -> None:
        """Record a running trial's result: status, final metrics, epochs and layer shifts in
        one transaction. Raises :class:`StoreError` (writing nothing) if the trial is not
        running, so a result is recorded at most once."""
        final = result.final
        with self._write() as db:
            changed = db.execute(
                "UPDATE trials SET status = ?, finished = ?, wall_time_s = ?, error = ?, "
                "traceback = ?, metric_name = ?, higher_is_better = ?, test_metric = ?, "
                "test_loss = ?, recal_test_metric = ?, recal_test_loss = ?, final_json = ?, "
                "meta_json = ?, varshift_version = COALESCE(?, varshift_version), "
                "torch_version = COALESCE(?, torch_version), hostname = COALESCE(?, hostname), "
                "pid = COALESCE(?, pid) WHERE id = ? AND status = 'running'",
                (
                    result.status,
                    _now(),
                    _real(result.wall_time_s),
                    result.error,
                    result.traceback,
                    result.metric_name,
                    int(result.higher_is_better),
                    *(_real(final.get(name)) for name in FINAL_COLUMNS),
                    _dumps(final),
                    _dumps(result.meta),
                    worker.varshift_version if worker else None,
                    worker.torch_version if worker else None,
                    worker.hostname if worker else None,
                    worker.pid if worker else None,
                    trial_id,
                ),
            ).rowcount
            if changed != 1:
                row = db.execute("SELECT status FROM trials WHERE id = ?", (trial_id,)).fetchone()
                state = "missing" if row is None else row[0]
                raise StoreError(
                    f"trial {trial_id} is {state}, not running; its result was not recorded"
                )
            # A retried trial may have left rows from its failed attempt.
            db.execute("DELETE FROM epochs WHERE trial_id = ?", (trial_id,))
            db.execute("DELETE FROM layer_shift WHERE trial_id = ?", (trial_id,))
            db.executemany(
                "INSERT INTO epochs (trial_id, epoch, train_loss, test_loss, test_metric, "
                "extra_json) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        trial_id,
                        e.epoch,
                        _real(e.train_loss),
                        _real(e.test_loss),
                        _real(e.test_metric),
                        _dumps(e.extra),
                    )
                    for e in result.epochs
                ],
            )
            db.executemany(
                "INSERT INTO layer_shift (trial_id, layer, depth, train_var, eval_var, "
                "running_var, ratio, predicted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        trial_id,
                        s.layer,
                        s.depth,
                        _real(s.train_var),
                        _real(s.eval_var),
                        _real(s.running_var),
                        _real(s.ratio),
                        _real(s.predicted),
                    )
                    for s in result.layer_shift
                ],
            )

    def release(self, trial_ids: Iterable[int]) -> int:
        """Put running trials back to ``pending`` without counting the attempt (the user
        stopped the run; the trial did nothing wrong). Returns how many were released."""
        ids = [(trial_id,) for trial_id in trial_ids]
        with self._write() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE trials SET status = 'pending', started = NULL, "
                "attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = 'running'",
                ids,
            )
            return db.total_changes - before

    def recover(self, *, max_attempts: int = 3) -> tuple[int, int]:
        """Return every ``running`` trial of the file to ``pending`` — call it only while
        holding :meth:`lock`, when any running trial belongs to a driver that died.

        A trial that has already been claimed ``max_attempts`` times is marked ``failed``
        instead, so a trial that kills its driver (e.g. out of memory) cannot loop forever.
        Returns ``(requeued, abandoned)``.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        with self._write() as db:
            abandoned = db.execute(
                "UPDATE trials SET status = 'failed', finished = ?, error = 'abandoned: the "
                "driver died while running this trial ' || attempts || ' times' "
                "WHERE status = 'running' AND attempts >= ?",
                (_now(), max_attempts),
            ).rowcount
            requeued = db.execute(
                "UPDATE trials SET status = 'pending', started = NULL WHERE status = 'running'"
            ).rowcount
        return requeued, abandoned

    def reset_failed(self, study: str, preset: str | None = None) -> int:
        """Put the failed trials of ``study`` back to ``pending`` with a fresh attempt count
        (``--retry-failed``); returns how many."""
        where, params = self._where(study, preset)
        with self._write() as db:
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT t.id FROM trials t WHERE {where} AND t.status = 'failed'", params
                )
            ]
            for table in ("epochs", "layer_shift"):
                db.executemany(f"DELETE FROM {table} WHERE trial_id = ?", [(i,) for i in ids])
            db.executemany(
                "UPDATE trials SET status = 'pending', attempts = 0, started = NULL, "
                "finished = NULL, error = NULL, traceback = NULL WHERE id = ?",
                [(i,) for i in ids],
            )
        return len(ids)

    # -- reading -----------------------------------------------------------------------------

    def study_names(self) -> list[str]:
        """The studies in this file, sorted."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT name FROM studies ORDER BY name")]

    def presets(self, study: str) -> list[str]:
        """The presets of ``study`` that were registered, sorted."""
        self._require(study)
        rows = self._db.execute(
            "SELECT preset FROM studies WHERE name = ? ORDER BY preset", (study,)
        )
        return [r[0] for r in rows]

    def spec(self, study: str, preset: str) -> tuple[str, dict[str, Any]]:
        """The stored ``(spec_hash, spec)`` of one preset of ``study``."""
        self._require(study, preset)
        row = self._db.execute(
            "SELECT spec_hash, spec_json FROM studies WHERE name = ? AND preset = ?",
            (study, preset),
        ).fetchone()
        return row[0], json.loads(row[1])

    def summary(self, study: str, preset: str | None = None) -> dict[str, int]:
        """How many trials of ``study`` are in each status (every status present, 0 if none)."""
        where, params = self._where(study, preset)
        counts = dict.fromkeys(STATUSES, 0)
        for status, count in self._db.execute(
            f"SELECT t.status, COUNT(*) FROM trials t WHERE {where} GROUP BY t.status", params
        ):
            counts[status] = count
        return counts

    def frames(self, study: str, preset: str | None = None) -> dict[str, pd.DataFrame]:
        """The trials, epochs and layer shifts of ``study`` as pandas data frames.

        Columns are those of ``docs/architecture.md`` ("Lab data frames"); ``trials`` has one
        more column per swept axis (named ``axis_<name>`` where an axis name would clash with a
        fixed column). ``preset=None`` takes every trial of the study. All three frames come
        from one snapshot, so a writer committing meanwhile cannot make them disagree.
        """
        where, params = self._where(study, preset)
        with self._read() as db:
            trial_rows = db.execute(
                "SELECT t.id, t.arm, t.seed, t.status, t.metric_name, t.higher_is_better, "
                "t.test_metric, t.test_loss, t.recal_test_metric, t.recal_test_loss, "
                f"t.wall_time_s, t.error, t.axes_json FROM trials t WHERE {where} ORDER BY t.id",
                params,
            ).fetchall()
            epoch_rows = db.execute(
                "SELECT e.trial_id, t.arm, t.seed, e.epoch, e.train_loss, e.test_loss, "
                "e.test_metric FROM epochs e JOIN trials t ON t.id = e.trial_id "
                f"WHERE {where} ORDER BY e.trial_id, e.epoch",
                params,
            ).fetchall()
            shift_rows = db.execute(
                "SELECT s.trial_id, t.arm, t.seed, s.layer, s.depth, s.train_var, s.eval_var, "
                "s.running_var, s.ratio, s.predicted FROM layer_shift s JOIN trials t "
                f"ON t.id = s.trial_id WHERE {where} ORDER BY s.trial_id, s.depth, s.layer",
                params,
            ).fetchall()
        trials = _typed_frame([row[:-1] for row in trial_rows], TRIALS_COLUMNS)
        for name, values in _axis_columns([row[-1] for row in trial_rows]).items():
            trials[name] = values
        return {
            "trials": trials,
            "epochs": _typed_frame(epoch_rows, EPOCHS_COLUMNS),
            "layer_shift": _typed_frame(shift_rows, LAYER_SHIFT_COLUMNS),
        }

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
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
        out_path = Path(out)
        if out_path.suffix in (".csv", ".parquet"):
            if out_path.suffix != f".{fmt}":
                raise ValueError(f"{out_path} does not end in .{fmt} (format {fmt!r})")
            folder, stem = out_path.parent, out_path.stem
        else:
            folder, stem = out_path, study
        frames = self.frames(study, preset)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, frame in frames.items():
            target = folder / f"{stem}_{name}.{fmt}"
            if fmt == "csv":
                frame.to_csv(target, index=False)
            else:
                frame.to_parquet(target, index=False)
            written.append(target)
        return written

    # -- helpers -----------------------------------------------------------------------------

    def _require(self, study: str, preset: str | None = None) -> None:
        """Raise a one-line ValueError naming what there is, unless ``study`` (and ``preset``)
        are registered."""
        presets = [r[0] for r in self._db.execute(
            "SELECT preset FROM studies WHERE name = ? ORDER BY preset", (study,)
        )]
        if not presets:
            names = self.study_names()
            has = f"it has: {', '.join(names)}" if names else "it has no studies yet"
            raise ValueError(f"no study named {study!r} in {self.path}; {has}")
        if preset is not None and preset not in presets:
            raise ValueError(
                f"study {study!r} has no preset {preset!r} in {self.path}; it has: "
                f"{', '.join(presets)}"
            )

    def _where(self, study: str, preset: str | None) -> tuple[str, list[Any]]:
        """SQL filter (on alias ``t``) for the trials of ``study``, or of one of its presets
        (both must be registered)."""
        self._require(study, preset)
        if preset is None:
            return "t.study = ?", [study]
        return (
            "t.study = ? AND t.id IN (SELECT trial_id FROM preset_trials "
            "WHERE study = ? AND preset = ?)",
            [study, study, preset],
        )


# Column types of the frames, so that an empty or all-NULL column has the same type as a full
# one (SQL NULL becomes NaN in a float column, not None in an object column). Text columns are
# left to pandas, whose text type differs between versions.
_INT_COLUMNS = frozenset({"trial_id", "seed", "epoch", "depth"})
_TEXT_COLUMNS = frozenset({"arm", "status", "metric_name", "error", "layer"})


def _typed_frame(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(columns))
    types = {
        name: "int64" if name in _INT_COLUMNS else "boolean" if name == "higher_is_better"
        else "float64"
        for name in columns
        if name not in _TEXT_COLUMNS
    }
    return frame.astype(types)


def _axis_columns(axes_texts: Sequence[str]) -> dict[str, list[Any]]:
    """One list per axis name (first-seen order) from the trials' axes JSON; values that are
    not scalars are kept as JSON text so that CSV and Parquet can hold them."""
    axes = [json.loads(text) for text in axes_texts]
    names: dict[str, None] = {}
    for entry in axes:
        names.update(dict.fromkeys(entry))
    columns: dict[str, list[Any]] = {}
    for name in names:
        column = f"axis_{name}" if name in TRIALS_COLUMNS else name
        columns[column] = [
            value if value is None or isinstance(value, (str, int, float, bool)) else _dumps(value)
            for value in (entry.get(name) for entry in axes)
        ]
    return columns
