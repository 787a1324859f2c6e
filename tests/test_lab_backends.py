"""Backends and the driver: local and process give the same numbers, a dying worker costs one
trial, resume/retry/fail-fast/Ctrl-C leave the store consistent.

The other lab tests import :func:`tiny_trial` and :class:`TinyStudy` from here: a real (tiny)
torch training run whose numbers depend only on its config and seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from varshift.lab.backends import (
    LocalBackend,
    ProcessBackend,
    TrialTask,
    execute_trial,
    make_backend,
)
from varshift.lab.results import EpochRecord, LayerShiftRecord, TrialResult
from varshift.lab.runner import RunSummary, run_study
from varshift.lab.store import DriverLock, ResultStore, StudyChangedError

# Columns that legitimately differ between two runs of the same cell.
RUN_SPECIFIC = ["wall_time_s"]


def tiny_trial(
    config: dict[str, Any], seed: int, *, data_dir: str | None = None, threads: int | None = None
) -> TrialResult:
    """Train a 2-layer MLP with BatchNorm and dropout for a few full-batch steps on synthetic
    data; ``crash`` kills the process, ``raise`` raises, ``interrupt`` simulates Ctrl-C."""
    if config.get("crash"):
        os._exit(3)
    if config.get("raise"):
        raise RuntimeError("boom in the trial")
    if config.get("interrupt"):
        raise KeyboardInterrupt
    start = time.perf_counter()
    time.sleep(float(config.get("sleep", 0.0)))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    width = int(config.get("width", 16))
    model = nn.Sequential(
        nn.Linear(8, width),
        nn.Dropout(float(config.get("p", 0.2))),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 2),
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=0.2)
    epochs = []
    for epoch in range(1, int(config.get("epochs", 3)) + 1):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        model.eval()
        with torch.no_grad():
            logits = model(x)
            test_loss = float(nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(1) == y).float().mean())
        epochs.append(EpochRecord(epoch, loss.item(), test_loss, accuracy, {"lr": 0.2}))
    with torch.no_grad():
        hidden = model[0](x)
        train_var = float(nn.functional.dropout(hidden, 0.2, training=True).var(0).mean())
        eval_var = float(hidden.var(0).mean())
    stored = model[2].running_var
    assert isinstance(stored, torch.Tensor)
    running_var = float(stored.mean())
    ratio = eval_var / train_var
    shift = LayerShiftRecord("net.2", 1, train_var, eval_var, running_var, ratio, 0.8)
    return TrialResult(
        status="done",
        metric_name="accuracy",
        higher_is_better=True,
        wall_time_s=time.perf_counter() - start,
        epochs=tuple(epochs),
        final={"test_metric": accuracy, "test_loss": test_loss, "extra_metric": 1.5},
        layer_shift=(shift,),
    )


@dataclass(frozen=True)
class TinySpec:
    arm: str
    axes: dict[str, Any]
    config: dict[str, Any]
    seed: int
    config_hash: str


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TinyStudy:
    """A study with arms ``name -> config`` crossed with ``seeds``; satisfies ``StudyLike``."""

    arms: dict[str, dict[str, Any]]
    seeds: Sequence[int] = (0, 1)
    name: str = "tiny"
    description: str = "a tiny study for the lab tests"
    presets: tuple[str, ...] = ("quick",)
    extra: dict[str, Any] = field(default_factory=dict)

    def expand(self, preset: str) -> list[TinySpec]:
        return [
            TinySpec(arm, {"p": cfg.get("p", 0.2)}, cfg, seed, config_hash(cfg))
            for arm, cfg in self.arms.items()
            for seed in self.seeds
        ]

    def spec(self, preset: str) -> dict[str, Any]:
        return {"arms": self.arms, "seeds": list(self.seeds), **self.extra}

    def spec_hash(self, preset: str) -> str:
        return config_hash(self.spec(preset))

    def reference_arm(self, preset: str) -> str:
        return next(iter(self.arms))


def two_arm_study(**extra_arms: dict[str, Any]) -> TinyStudy:
    return TinyStudy({"low": {"p": 0.1}, "high": {"p": 0.5}, **extra_arms})


def run_tiny(study: TinyStudy, db: Path, **options: Any) -> RunSummary:
    """Run ``study`` into ``db`` with :func:`tiny_trial`, quietly."""
    return run_study(study, db_path=db, progress=False, trial_fn=tiny_trial, **options)


def comparable(db: Path, study: str = "tiny") -> dict[str, Any]:
    """The frames of a study without the columns that differ between runs."""
    with ResultStore(db, create=False) as store:
        frames = store.frames(study)
    frames["trials"] = frames["trials"].drop(columns=RUN_SPECIFIC)
    return {name: frame.sort_values(["arm", "seed"], kind="stable").reset_index(drop=True)
            for name, frame in frames.items()}


def assert_same_results(a: dict[str, Any], b: dict[str, Any]) -> None:
    import pandas as pd

    for name in ("trials", "epochs", "layer_shift"):
        # Exact: the same cell gives the same numbers wherever it runs. (Types may differ
        # where one side's column is all NULL.)
        pd.testing.assert_frame_equal(
            a[name].drop(columns="trial_id"),
            b[name].drop(columns="trial_id"),
            check_dtype=False,
            check_exact=True,
            obj=name,
        )


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
        assert store.claim(ids[1])
    summary = run_tiny(study, db)
    assert (summary.recovered, summary.done, summary.complete) == (2, 4, True)
    with ResultStore(db, create=False) as store:
        attempts = {t.id: t.attempts for t in store.trials("tiny")}
    assert attempts == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1}


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
