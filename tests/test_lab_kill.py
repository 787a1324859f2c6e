"""The kill loop of the maintainers' design notes (``shared/LAB.md`` beside the repository):
SIGKILL ``varshift lab run`` mid-study, restart it, and nothing is lost, nothing runs twice, and
the numbers equal those of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from helpers.lab_studies import study_toml
from varshift.lab.runner import run_study
from varshift.lab.store import ResultStore

STUDY = "killtest"
TRIALS = 8  # 2 arms x 4 seeds, about 0.3 s each: long enough for a signal to land inside one
# Ctrl-C first (a clean stop), then two hard kills.
SIGNALS = (signal.SIGINT, signal.SIGKILL, signal.SIGKILL)
KILLS = SIGNALS.count(signal.SIGKILL)


def _done(db: Path) -> int:
    """Done trials so far, read while the driver writes (0 before the tables exist)."""
    try:
        with ResultStore(db, create=False) as store:
            return store.summary(STUDY)["done"] if STUDY in store.study_names() else 0
    except (FileNotFoundError, ValueError):
        return 0


def _start(study: Path, db: Path) -> subprocess.Popen[bytes]:
    # One torch thread, as in this test process, so that the numbers can be compared exactly.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "varshift", "lab", "run", str(study), "--db", str(db)]
    return subprocess.Popen(
        [*command, "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # A shell without job control starts background jobs with SIGINT ignored, and children
        # inherit that (CI may run us so); Python then never raises KeyboardInterrupt. Give the
        # driver the default disposition, as a terminal's Ctrl-C would find it.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _results(db: Path) -> dict[str, pd.DataFrame]:
    with ResultStore(db, create=False) as store:
        frames = store.frames(STUDY)
    return {
        name: frame.drop(columns=["trial_id", *(["wall_time_s"] if name == "trials" else [])])
        .sort_values(["arm", "seed"], kind="stable")
        .reset_index(drop=True)
        for name, frame in frames.items()
    }


def test_interrupted_and_killed_runs_resume_to_the_same_results(tmp_path: Path) -> None:
    db = tmp_path / "killed.db"
    study = tmp_path / "killtest.toml"
    study.write_text(study_toml(STUDY, seeds=4, train_size=600, epochs=10))
    rng = random.Random(0)
    for step, sent in enumerate(SIGNALS, start=1):
        driver = _start(study, db)
        deadline = time.monotonic() + 120
        while _done(db) < 2 * step and driver.poll() is None:
            assert time.monotonic() < deadline, "the study made no progress"
            time.sleep(0.02)
        assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere inside the next trial
        driver.send_signal(sent)
        driver.wait(timeout=60)
        with ResultStore(db, create=False) as store:
            running = store.summary(STUDY)["running"]
        if sent == signal.SIGINT:
            # Ctrl-C: exit status 130, the trial in flight back to pending.
            assert (driver.returncode, running) == (130, 0)
        else:
            # The driver claims the next trial as soon as one finishes, so a kill leaves one.
            assert (driver.returncode, running) == (-signal.SIGKILL, 1)
    # The last run goes to the end, in this process (it has loaded torch and the data already).
    summary = run_study(study, db_path=db, progress=False)
    assert (summary.recovered, summary.complete) == (1, True)

    with ResultStore(db, create=False) as store:
        trials = store.trials(STUDY)
        assert store.summary(STUDY) == {"pending": 0, "running": 0, "done": TRIALS, "failed": 0}
    assert len(trials) == TRIALS
    assert len({(t.arm, t.seed) for t in trials}) == TRIALS
    # Trials cut off by a kill were claimed twice; one cut off by Ctrl-C was not held against.
    assert sorted(t.attempts for t in trials)[-KILLS:] == [2] * KILLS
    assert sorted(t.attempts for t in trials)[:-KILLS] == [1] * (TRIALS - KILLS)

    reference = tmp_path / "reference.db"
    run_study(study, db_path=reference, progress=False)
    killed, clean = _results(db), _results(reference)
    for name in ("trials", "epochs", "layer_shift"):
        pd.testing.assert_frame_equal(killed[name], clean[name], check_exact=True, obj=name)
    assert len(killed["epochs"]) == 10 * TRIALS
