"""The results store: idempotent registration, guarded and atomic transitions, bounded recovery,
the driver lock, concurrent claimers and readers, frames and export."""

from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from helpers.tiny_lab import TinySpec, TinyStudy, config_hash, tiny_trial
from varshift.lab.results import EpochRecord, TrialResult
from varshift.lab.store import (
    DriverLock,
    DriverLockError,
    ResultStore,
    StoreError,
    StudyChangedError,
)

TRIALS_COLUMNS = [
    "trial_id", "arm", "seed", "status", "metric_name", "higher_is_better", "test_metric",
    "test_loss", "recal_test_metric", "recal_test_loss", "wall_time_s", "error",
]
EPOCHS_COLUMNS = ["trial_id", "arm", "seed", "epoch", "train_loss", "test_loss", "test_metric"]
LAYER_SHIFT_COLUMNS = [
    "trial_id", "arm", "seed", "layer", "depth", "train_var", "eval_var", "running_var", "ratio",
    "predicted",
]


def specs(arms: int = 2, seeds: int = 2) -> list[TinySpec]:
    out: list[TinySpec] = []
    for a in range(arms):
        config = {"p": 0.1 * (a + 1), "epochs": 2}
        out.extend(
            TinySpec(f"arm{a}", {"p": config["p"], "norm": "batch"}, config, s, config_hash(config))
            for s in range(seeds)
        )
    return out


def registered(path: Path, arms: int = 2, seeds: int = 2) -> ResultStore:
    store = ResultStore(path)
    store.register("s", "quick", "hash-1", {"about": "test"}, specs(arms, seeds))
    return store


def finish_all(store: ResultStore) -> None:
    for trial in store.trials("s", status="pending"):
        assert store.claim(trial.id)
        store.finish(trial.id, tiny_trial(trial.config, trial.seed))


def test_registering_twice_adds_nothing(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db") as store:
        assert store.register("s", "quick", "hash-1", {}, specs()) == 0
        # A second preset sharing every cell shares the trials too.
        assert store.register("s", "full", "hash-f", {}, specs(seeds=3)) == 2
        assert len(store.trials("s")) == 6
        assert len(store.trials("s", "quick")) == 4
        assert store.summary("s") == {"pending": 6, "running": 0, "done": 0, "failed": 0}
        assert store.study_names() == ["s"]
        assert store.presets("s") == ["full", "quick"]
        assert store.spec("s", "quick") == ("hash-1", {"about": "test"})


def test_two_cells_with_the_same_key_are_refused(tmp_path: Path) -> None:
    cells = specs(1, 1)
    twin = TinySpec("other", {}, cells[0].config, 0, cells[0].config_hash)
    with ResultStore(tmp_path / "r.db") as store, pytest.raises(ValueError, match="same config"):
        store.register("s", "quick", "h", {}, [*cells, twin])


def test_a_trial_cannot_be_claimed_twice(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db") as store:
        trial = store.trials("s")[0]
        assert store.claim(trial.id)
        assert not store.claim(trial.id)
        store.finish(trial.id, tiny_trial(trial.config, trial.seed))
        assert not store.claim(trial.id)
        with pytest.raises(StoreError, match="is done, not running"):
            store.finish(trial.id, tiny_trial(trial.config, trial.seed))
        with pytest.raises(StoreError, match="is pending, not running"):
            store.finish(store.trials("s")[1].id, tiny_trial(trial.config, trial.seed))
        assert [t.attempts for t in store.trials("s")] == [1, 0, 0, 0]


def test_finish_writes_status_and_all_metrics_or_nothing(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db") as store:
        trial = store.trials("s")[0]
        assert store.claim(trial.id)
        good = tiny_trial(trial.config, trial.seed)
        # An epoch whose extra values cannot be stored fails half-way through the transaction,
        # after the status update and the first epoch rows.
        broken_epoch = EpochRecord(9, 0.1, 0.1, 0.5, extra={"bad": object()})  # type: ignore[dict-item]
        broken = TrialResult(**{**good.__dict__, "epochs": (*good.epochs, broken_epoch)})
        with pytest.raises(TypeError):
            store.finish(trial.id, broken)
        frames = store.frames("s")
        row = frames["trials"].iloc[0]
        assert row.status == "running"
        assert pd.isna(row.test_metric)
        assert frames["epochs"].empty
        assert frames["layer_shift"].empty
        store.finish(trial.id, good)
        frames = store.frames("s")
        row = frames["trials"].iloc[0]
        assert (row.status, row.metric_name) == ("done", "accuracy")
        assert row.higher_is_better
        assert row.test_metric == good.final["test_metric"]
        assert list(frames["epochs"].epoch) == [1, 2]
        assert len(frames["layer_shift"]) == 1
        extra = store._db.execute("SELECT final_json FROM trials WHERE id = ?", (trial.id,))
        assert json.loads(extra.fetchone()[0])["extra_metric"] == 1.5


def test_a_changed_spec_is_refused_and_extending_adds_new_cells_only(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db") as store:
        finish_all(store)
        with pytest.raises(StudyChangedError, match="has changed since it was stored"):
            store.register("s", "quick", "hash-2", {}, specs(seeds=3))
        assert store.register("s", "quick", "hash-2", {}, specs(seeds=3), extend=True) == 2
        assert store.summary("s") == {"pending": 2, "running": 0, "done": 4, "failed": 0}
        assert store.spec("s", "quick")[0] == "hash-2"
        with pytest.raises(StudyChangedError, match=r"2 stored trials .* are not in the new spec"):
            store.register("s", "quick", "hash-3", {}, specs(seeds=2), extend=True)


def test_reset_failed_requeues_only_failed_trials(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db") as store:
        first, second = store.trials("s")[:2]
        for trial, config in ((first, {"raise": True}), (second, first.config)):
            store.claim(trial.id)
            from varshift.lab.backends import TrialTask, execute_trial

            outcome = execute_trial(tiny_trial, TrialTask(trial.id, config, 0), None, None)
            store.finish(trial.id, outcome.result, worker=outcome.worker)
        assert store.summary("s")["failed"] == 1
        assert store.reset_failed("s") == 1
        pending = store.trials("s", status="pending")
        assert first.id in {t.id for t in pending}
        assert store.summary("s") == {"pending": 3, "running": 0, "done": 1, "failed": 0}
        error = store._db.execute("SELECT error FROM trials WHERE id = ?", (first.id,))
        assert error.fetchone()[0] is None


def test_recovery_requeues_running_trials_up_to_a_bound(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db", arms=1, seeds=1) as store:
        [trial] = store.trials("s")
        for attempt in (1, 2):
            assert store.claim(trial.id)
            store.mark_started(trial.id)
            assert store.recover(max_attempts=3) == (1, 0)
            assert store.trials("s")[0].attempts == attempt
        assert store.claim(trial.id)
        store.mark_started(trial.id)
        assert store.recover(max_attempts=3) == (0, 1)
        frame = store.frames("s")["trials"]
        assert frame.status.tolist() == ["failed"]
        message = "abandoned: the driver died while running this trial 3 times"
        assert frame.error.tolist() == [message]


# Children are forked: they inherit this process's imports, so they start in milliseconds
# (they use only SQLite and the lock, never torch).
FORK = multiprocessing.get_context("fork")


def _hold_lock(db: str, ready: Any) -> None:
    DriverLock(db).acquire()
    ready.send("locked")
    time.sleep(600)  # until killed


def test_the_driver_lock_refuses_a_live_driver_and_outlives_a_dead_one(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    ours, theirs = FORK.Pipe()
    holder = FORK.Process(target=_hold_lock, args=(str(db), theirs))
    holder.start()
    try:
        assert ours.recv() == "locked"
        with pytest.raises(DriverLockError, match=f"another driver \\(pid {holder.pid} on "):
            DriverLock(db).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the pid stays in the file
        holder.join()
    lock = DriverLock(db)
    lock.acquire()
    assert lock.stale_owner is not None
    assert f"pid {holder.pid} " in lock.stale_owner
    lock.release()
    with DriverLock(db) as again:
        assert again.stale_owner is None  # the clean release emptied the file


def _claim_all(db: str, seed: int, start: Any, out: Any) -> None:
    with ResultStore(db, create=False) as store:
        ids = [t.id for t in store.trials("s")]
        random.Random(seed).shuffle(ids)
        start.wait()  # all claimers begin together
        out.put([i for i in ids if store.claim(i)])


def test_concurrent_claimers_never_claim_a_trial_twice(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    registered(db, arms=20, seeds=30).close()
    start, out = FORK.Barrier(3), FORK.Queue()
    claimers = [FORK.Process(target=_claim_all, args=(str(db), i, start, out)) for i in range(3)]
    for claimer in claimers:
        claimer.start()
    claimed = [out.get(timeout=60) for _ in claimers]
    for claimer in claimers:
        claimer.join(timeout=10)
    assert [c.exitcode for c in claimers] == [0, 0, 0]
    flat = [i for ids in claimed for i in ids]
    assert len(flat) == len(set(flat)) == 600
    with ResultStore(db, create=False) as store:
        assert store.summary("s")["running"] == 600


def _write_all(db: str, result: TrialResult, ready: Any) -> None:
    with registered(Path(db), arms=25, seeds=4) as store:
        ready.send("ready")
        for trial in store.trials("s"):
            store.claim(trial.id)
            store.finish(trial.id, result)
            time.sleep(0.01)  # a trial takes time; let the reader interleave


def test_a_reader_and_a_writer_do_not_disturb_each_other(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    ours, theirs = FORK.Pipe()
    result = tiny_trial({"epochs": 30}, 0)
    writer = FORK.Process(target=_write_all, args=(str(db), result, theirs))
    writer.start()
    seen: list[int] = []
    try:
        assert ours.recv() == "ready"
        while writer.is_alive():
            with ResultStore(db, create=False, timeout_s=10) as store:
                frames = store.frames("s")
            done = int((frames["trials"].status == "done").sum())
            # One snapshot: every done trial has all its epochs.
            assert len(frames["epochs"]) == 30 * done
            seen.append(done)
            time.sleep(0.01)
    finally:
        writer.join(timeout=60)
    assert writer.exitcode == 0
    assert seen == sorted(seen)
    assert len(seen) >= 3
    assert seen[-1] > seen[0]
    with ResultStore(db, create=False) as store:
        assert store.summary("s")["done"] == 100


def test_frames_have_the_documented_columns_and_one_per_axis(tmp_path: Path) -> None:
    with registered(tmp_path / "r.db") as store:
        empty = store.frames("s")
        assert list(empty["trials"].columns) == [*TRIALS_COLUMNS, "p", "norm"]
        assert list(empty["epochs"].columns) == EPOCHS_COLUMNS
        assert list(empty["layer_shift"].columns) == LAYER_SHIFT_COLUMNS
        finish_all(store)
        frames = store.frames("s")
    trials = frames["trials"]
    assert trials.p.tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert set(trials.norm) == {"batch"}
    assert trials.status.tolist() == ["done"] * 4
    assert trials.higher_is_better.dtype == "boolean"
    assert frames["epochs"].groupby("trial_id").size().tolist() == [2, 2, 2, 2]
    assert frames["layer_shift"].ratio.notna().all()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_round_trips(tmp_path: Path, fmt: Any) -> None:
    with registered(tmp_path / "r.db") as store:
        finish_all(store)
        frames = store.frames("s")
        written = store.export("s", tmp_path / "out", fmt=fmt)
        named = store.export("s", tmp_path / f"results.{fmt}", fmt=fmt)
        with pytest.raises(ValueError, match="does not end in"):
            store.export("s", tmp_path / "results.txt.csv", fmt="parquet")
    assert [p.name for p in written] == [f"s_{n}.{fmt}" for n in frames]
    assert [p.name for p in named] == [f"results_{n}.{fmt}" for n in frames]
    for path, (name, frame) in zip(written, frames.items()):
        if fmt == "parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(path), frame, obj=name)
        else:  # CSV keeps values, not types, and writes None and NaN alike
            pd.testing.assert_frame_equal(
                _values(pd.read_csv(path)), _values(frame), check_dtype=False, obj=name
            )


def _values(frame: pd.DataFrame) -> pd.DataFrame:
    plain = frame.astype(object)
    return plain.where(plain.notna(), None)


def test_a_missing_or_foreign_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results database at"):
        ResultStore(tmp_path / "missing.db", create=False)
    (tmp_path / "notes.db").write_text("not a database at all, just some text\n" * 20)
    with pytest.raises(ValueError, match="is not a varshift results database"):
        ResultStore(tmp_path / "notes.db")
    foreign = sqlite3.connect(tmp_path / "other.db")
    foreign.execute("CREATE TABLE people (name TEXT)")
    foreign.close()
    with pytest.raises(ValueError, match=r"other.db is not a varshift results database \(no meta"):
        ResultStore(tmp_path / "other.db")
    with registered(tmp_path / "r.db") as store, pytest.raises(
        ValueError, match=r"no study named 'other' .* it has: s"
    ):
        store.frames("other")
    with registered(tmp_path / "r.db") as store, pytest.raises(
        ValueError, match=r"study 's' has no preset 'full' .* it has: quick"
    ):
        store.summary("s", "full")


def test_close_folds_the_log_back_into_one_file(tmp_path: Path) -> None:
    store = registered(tmp_path / "r.db")
    finish_all(store)
    store.close()
    wal = tmp_path / "r.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    with ResultStore(tmp_path / "r.db", create=False) as again:
        assert again.summary("s")["done"] == 4


def test_the_tiny_study_is_a_study() -> None:
    # The helper study used across the lab tests expands to unique cells.
    cells = TinyStudy({"a": {"p": 0.1}, "b": {"p": 0.2}}).expand("quick")
    assert len({(c.config_hash, c.seed) for c in cells}) == 4
