"""Attempts: counted when a worker starts a trial, not when the driver claims it, so that a
driver killed while its workers start up costs nothing; the count and the limit are visible
through ``ResultStore.status_counts``; a failed trial's printed reason keeps its details."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.tiny_lab import TinyStudy, run_tiny, tiny_trial, two_arm_study
from varshift.lab.results import one_line_reason
from varshift.lab.runner import DEFAULT_MAX_ATTEMPTS
from varshift.lab.store import ResultStore, StoreError

TESTS = Path(__file__).resolve().parent


def _one_trial(path: Path) -> tuple[ResultStore, int]:
    store = ResultStore(path)
    store.register("s", "quick", "h", {}, two_arm_study().expand("quick")[:1])
    return store, store.trials("s")[0].id


def test_a_claim_that_never_started_is_not_an_attempt(tmp_path: Path) -> None:
    store, trial = _one_trial(tmp_path / "r.db")
    with store:
        # More kills before the start than the limit allows attempts: never abandoned.
        for _ in range(DEFAULT_MAX_ATTEMPTS + 1):
            assert store.claim(trial)
            assert store.recover(max_attempts=DEFAULT_MAX_ATTEMPTS) == (1, 0)
        assert store.trials("s")[0].attempts == 0
        assert store.claim(trial)
        store.mark_started(trial)
        with pytest.raises(StoreError, match="already started"):
            store.mark_started(trial)
        store.finish(trial, tiny_trial({}, 0))
        assert store.trials("s")[0].attempts == 1


def test_finishing_an_unmarked_trial_counts_its_attempt_once(tmp_path: Path) -> None:
    store, trial = _one_trial(tmp_path / "r.db")
    with store:
        assert store.claim(trial)
        store.finish(trial, tiny_trial({}, 0))
        assert store.trials("s")[0].attempts == 1


def test_ctrl_c_gives_back_only_an_attempt_that_was_counted(tmp_path: Path) -> None:
    store, trial = _one_trial(tmp_path / "r.db")
    with store:
        assert store.claim(trial)
        store.mark_started(trial)
        store.release([trial])
        assert store.claim(trial)  # claimed again, then stopped before it started
        store.release([trial])
        assert store.trials("s")[0].attempts == 0


def test_status_counts_show_attempts_and_the_limit(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as store:
        store.register("s", "quick", "h", {}, two_arm_study().expand("quick"))
        first, second, third, _ = (t.id for t in store.trials("s"))
        for _ in range(2):  # the driver died twice while running the first trial
            assert store.claim(first)
            store.mark_started(first)
            store.recover(max_attempts=2)
        assert store.claim(second)
        store.finish(second, tiny_trial({}, 0))
        assert store.claim(third)
        counts = store.status_counts("s")
        assert counts.by_status == {"pending": 1, "running": 1, "done": 1, "failed": 1}
        assert counts.attempts == {0: 2, 1: 1, 2: 1}
        assert (counts.total, counts.abandoned) == (4, 1)
        assert counts.describe(max_attempts=2) == (
            "1/4 done (1 pending, 1 running, 1 done, 1 failed); attempts 0:2 1:1 2:1 of at "
            "most 2; 1 abandoned at the limit"
        )
        assert store.status_counts("s", "quick") == counts


_DRIVER = """
import sys
from helpers.tiny_lab import SlowToStart, two_arm_study
from varshift.lab.runner import run_study

run_study(two_arm_study(), db_path=sys.argv[1], backend="process", workers=2, progress=False,
          trial_fn=SlowToStart(sys.argv[2]), max_attempts=1)
"""


def _running(db: Path) -> int:
    try:
        with ResultStore(db, create=False) as store:
            return store.summary("tiny")["running"] if "tiny" in store.study_names() else 0
    except (FileNotFoundError, ValueError):
        return 0


def test_a_kill_while_workers_start_up_costs_no_attempt(tmp_path: Path) -> None:
    db, release = tmp_path / "r.db", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(db), str(release)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        # Both workers are still starting (unpickling the slow trial function) when the
        # driver has claimed a trial for each.
        while _running(db) < 2:
            assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
            assert time.monotonic() < deadline, "the driver never claimed its trials"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        release.touch()  # let the orphaned workers finish starting, find the driver gone, exit
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    # The limit is one attempt: had the claims counted, both trials would now be abandoned.
    summary = run_tiny(two_arm_study(), db, max_attempts=1)
    assert (summary.recovered, summary.abandoned, summary.done, summary.failed) == (2, 0, 4, 0)
    with ResultStore(db, create=False) as store:
        assert [t.attempts for t in store.trials("tiny")] == [1, 1, 1, 1]


def test_a_failed_trial_prints_its_reason_with_the_details(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "invalid configuration (1 problem):\n  - train.lr: must be > 0, got -1"
    summary = run_tiny(TinyStudy({"bad": {"raise": reason}}, seeds=(0,)), tmp_path / "r.db")
    assert summary.failed == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if "failed:" in line]
    assert line.endswith(
        "arm bad seed 0: RuntimeError: invalid configuration (1 problem): - train.lr: must be "
        "> 0, got -1"
    )


def test_one_line_reason_joins_lines_and_cuts_long_ones() -> None:
    assert one_line_reason("first\n\n  second  line\nthird") == "first; second line; third"
    assert one_line_reason(None) == one_line_reason("  \n") == "unknown error"
    cut = one_line_reason("x" * 300, limit=50)
    assert (len(cut), cut[-1]) == (50, "…")
    with pytest.raises(ValueError, match="limit must be >= 2"):
        one_line_reason("x", limit=1)
