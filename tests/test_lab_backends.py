"""Backends and the driver: local and process give the same numbers, a dying worker costs one
trial, resume/retry/fail-fast/Ctrl-C leave the store consistent.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from helpers.tiny_lab import (
    TinyStudy,
    assert_same_results,
    comparable,
    run_tiny,
    tiny_trial,
    two_arm_study,
)
from varshift.lab.backends import (
    LocalBackend,
    ProcessBackend,
    TrialTask,
    execute_trial,
    make_backend,
)
from varshift.lab.runner import run_study
from varshift.lab.store import DriverLock, ResultStore, StudyChangedError


def test_execute_trial_turns_an_exception_into_a_failed_result() -> None:
    outcome = execute_trial(tiny_trial, TrialTask(7, {"raise": True}, 0), None, None)
    assert outcome.trial_id == 7
    assert outcome.result.status == "failed"
    assert outcome.result.error == "RuntimeError: boom in the trial"
    assert "Traceback" in (outcome.result.traceback or "")
    assert outcome.worker.pid == os.getpid()


def test_local_and_process_backends_give_identical_results(tmp_path: Path) -> None:
    study = two_arm_study()
    local = run_tiny(study, tmp_path / "local.db")
    process = run_tiny(study, tmp_path / "process.db", backend="process", workers=2)
    assert (local.done, process.done, local.failed, process.failed) == (4, 4, 0, 0)
    assert process.complete
    a, b = comparable(tmp_path / "local.db"), comparable(tmp_path / "process.db")
    assert_same_results(a, b)
    assert len(a["epochs"]) == 4 * 3
    # The process backend really ran the trials elsewhere.
    with ResultStore(tmp_path / "process.db", create=False) as store:
        pids = {row[0] for row in store._db.execute("SELECT pid FROM trials")}
    assert os.getpid() not in pids


def test_a_dying_worker_fails_only_its_trial_and_the_pool_recovers(tmp_path: Path) -> None:
    study = TinyStudy(
        {"a": {"p": 0.1}, "dies": {"p": 0.3, "crash": True}, "c": {"p": 0.5}}, seeds=(0, 1)
    )
    summary = run_tiny(study, tmp_path / "r.db", backend="process", workers=2)
    assert (summary.done, summary.failed) == (4, 2)
    with ResultStore(tmp_path / "r.db", create=False) as store:
        trials = store.frames("tiny")["trials"]
    failed = trials[trials.status == "failed"]
    assert set(failed.arm) == {"dies"}
    assert set(failed.error) == {"worker died (exit code 3)"}
    assert set(trials[trials.status == "done"].arm) == {"a", "c"}


def test_process_backend_replaces_a_dead_worker_directly() -> None:
    with ProcessBackend(tiny_trial, workers=1, threads=1) as backend:
        backend.submit(TrialTask(1, {"crash": True}, 0))
        first = backend.next_outcome()
        backend.submit(TrialTask(2, {"epochs": 1}, 0))
        second = backend.next_outcome()
    assert first.result.error == "worker died (exit code 3)"
    assert (second.trial_id, second.result.status) == (2, "done")
    assert first.worker.pid != second.worker.pid


def test_backends_report_when_a_trial_really_starts() -> None:
    started: list[int] = []
    with ProcessBackend(tiny_trial, workers=1, threads=1, on_start=started.append) as backend:
        backend.submit(TrialTask(1, {"crash": True}, 0))  # dies inside the trial: it started
        assert backend.next_outcome().result.status == "failed"
        backend.submit(TrialTask(2, {"epochs": 1}, 0))
        assert backend.next_outcome().trial_id == 2
    local = LocalBackend(tiny_trial, on_start=started.append)
    local.submit(TrialTask(3, {"epochs": 1}, 0))
    assert started == [1, 2]  # the local backend starts a trial only when asked for it
    local.next_outcome()
    assert started == [1, 2, 3]


def test_resume_skips_done_trials_and_retry_failed_reruns_failed_ones(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    study = two_arm_study(bad={"raise": True})
    first = run_tiny(study, db)
    assert (first.done, first.failed, first.skipped, first.complete) == (4, 2, 0, False)
    again = run_tiny(study, db)
    assert (again.done, again.failed, again.skipped, again.not_retried) == (0, 0, 4, 2)
    retried = run_tiny(study, db, retry_failed=True)
    assert (retried.done, retried.failed, retried.skipped) == (0, 2, 4)
    with ResultStore(db, create=False) as store:
        assert store.summary("tiny") == {"pending": 0, "running": 0, "done": 4, "failed": 2}
        tracebacks = [r[0] for r in store._db.execute("SELECT traceback FROM trials")]
    assert sum("boom in the trial" in (tb or "") for tb in tracebacks) == 2


def test_a_changed_study_is_refused_unless_extended(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    run_tiny(two_arm_study(), db)
    grown = two_arm_study(more={"p": 0.3})
    with pytest.raises(StudyChangedError, match="--extend"):
        run_tiny(grown, db)
    summary = run_tiny(grown, db, extend=True)
    assert (summary.done, summary.skipped, summary.total) == (2, 4, 6)


def test_fail_fast_stops_at_the_first_failure(tmp_path: Path) -> None:
    study = TinyStudy({"bad": {"raise": True}, "good": {"p": 0.1}}, seeds=(0, 1, 2))
    summary = run_tiny(study, tmp_path / "r.db", fail_fast=True)
    assert summary.stopped_early
    assert (summary.done, summary.failed) == (0, 1)
    assert summary.counts == {"pending": 5, "running": 0, "done": 0, "failed": 1}


def test_ctrl_c_returns_the_running_trial_to_pending(tmp_path: Path) -> None:
    study = TinyStudy({"ok": {"p": 0.1}, "stop": {"interrupt": True}}, seeds=(0,))
    summary = run_tiny(study, tmp_path / "r.db")
    assert summary.interrupted
    assert summary.counts == {"pending": 1, "running": 0, "done": 1, "failed": 0}
    with ResultStore(tmp_path / "r.db", create=False) as store:
        # The interrupted attempt is not held against the trial.
        assert [t.attempts for t in store.trials("tiny", status="pending")] == [0]
    # The driver lock was released: another driver may start.
    with DriverLock(tmp_path / "r.db") as lock:
        assert lock.stale_owner is None


def test_trials_left_running_by_a_dead_driver_are_rerun(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    study = two_arm_study()
    with ResultStore(db) as store:
        store.register("tiny", "quick", study.spec_hash("quick"), {}, study.expand("quick"))
        ids = [t.id for t in store.trials("tiny")]
        assert store.claim(ids[0])
        store.mark_started(ids[0])  # the dead driver's worker had begun this one...
        assert store.claim(ids[1])  # ...and not yet this one: it was never tried
    summary = run_tiny(study, db)
    assert (summary.recovered, summary.done, summary.complete) == (2, 4, True)
    with ResultStore(db, create=False) as store:
        attempts = {t.id: t.attempts for t in store.trials("tiny")}
    assert attempts == {ids[0]: 2, ids[1]: 1, ids[2]: 1, ids[3]: 1}


def test_local_backend_runs_in_this_process() -> None:
    backend = LocalBackend(tiny_trial)
    backend.submit(TrialTask(3, {"epochs": 1}, 5))
    outcome = backend.next_outcome()
    assert (outcome.trial_id, outcome.worker.pid, outcome.result.status) == (3, os.getpid(), "done")
    assert math.isfinite(outcome.result.final["test_loss"])
    with pytest.raises(RuntimeError, match="no trial in flight"):
        backend.next_outcome()


def test_backend_arguments_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend must be one of local, process, ray, got 'gpu'"):
        make_backend("gpu")
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        make_backend("process", workers=0)
    with pytest.raises(ValueError, match="one trial at a time; got workers=2"):
        make_backend("local", workers=2, trial_fn=tiny_trial)
    with pytest.raises(ValueError, match="gpus_per_trial needs the ray backend"):
        make_backend("process", gpus_per_trial=1.0)
    with pytest.raises(TypeError, match="needs a module-level trial function"):
        make_backend("process", trial_fn=lambda config, seed, **_: tiny_trial(config, seed))
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'varshift\[ray\]'"):
        make_backend("ray", trial_fn=tiny_trial)


def test_the_example_study_runs_end_to_end(tmp_path: Path) -> None:
    from varshift.lab.study import load_study

    study = load_study("example")
    db = tmp_path / "example.db"
    summary = run_study(study, db_path=db, backend="process", workers=2, progress=False)
    assert (summary.total, summary.done, summary.failed, summary.complete) == (8, 8, 0, True)
    with ResultStore(db, create=False) as store:
        frames = store.frames("example", "quick")
        spec_hash, spec = store.spec("example", "quick")
    assert spec_hash == study.spec_hash("quick")
    assert spec["reference_arm"] == study.reference_arm("quick")
    trials = frames["trials"]
    assert set(study.axes("quick")) <= set(trials.columns)
    assert set(trials.arm) == set(study.arms("quick"))
    assert trials.metric_name.eq("accuracy").all()
    assert trials[["test_metric", "recal_test_metric"]].notna().all().all()
    assert len(frames["epochs"]) == 8  # one epoch per trial in the quick preset
    assert not frames["layer_shift"].empty
