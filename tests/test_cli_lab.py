"""``varshift lab``: every sub-command's exit status and output, and one-line errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

import varshift.lab.trial
from helpers.lab_studies import study_toml
from varshift.cli import main
from varshift.lab.results import TrialResult
from varshift.lab.store import DriverLock


@pytest.fixture
def study(tmp_path: Path) -> Path:
    path = tmp_path / "clitest.toml"
    path.write_text(study_toml("clitest", seeds=2, train_size=120, epochs=2))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("varshift: error: ")
    for fragment in fragments:
        assert fragment in err


def test_list_and_show(capsys: pytest.CaptureFixture[str], study: Path) -> None:
    assert main(["lab", "list"]) == 0
    listing = capsys.readouterr().out
    assert "example: " in listing
    assert "    presets: quick, full, full-avg, full-digits" in listing  # orderings
    assert main(["lab", "show", "example", "--preset", "quick"]) == 0
    out = capsys.readouterr().out
    assert "preset quick: 8 trials = 4 arms x 2 seeds (seeds 0-1)" in out
    assert "(reference)" in out
    assert main(["lab", "show", str(study)]) == 0
    out = capsys.readouterr().out
    assert "preset quick: 4 trials = 2 arms x 2 seeds" in out
    # What the arms share, resolved (defaults included); the swept key is not among it.
    assert "  shared by every arm:" in out
    assert "    data: dataset=digits train_size=120 test_size=60 seed=0 task=auto" in out
    for setting in ("epochs=2", "optimizer=adam", "norm=batch", "depth=unset"):
        assert setting in out.split()
    dropout_line = next(line for line in out.splitlines() if line.startswith("    dropout:"))
    assert " rate=" not in dropout_line


def test_unknown_study_and_preset_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path
) -> None:
    assert main(["lab", "show", "no-such-study"]) == 2
    one_line_error(capsys, "no-such-study", "built-in studies: ")
    assert main(["lab", "show", "example", "--preset", "huge"]) == 2
    one_line_error(capsys, "has no such preset", "quick, full")
    assert main(["lab", "run", str(study), "--preset", "full", "--db", str(tmp_path / "r.db")]) == 2
    one_line_error(capsys, "has no such preset; presets: quick")
    assert main(["lab", "run", str(study), "--workers", "2", "--db", str(tmp_path / "r.db")]) == 2
    one_line_error(capsys, "one trial at a time")
    assert main(["lab", "run", str(study), "--ray-address", "auto"]) == 2
    one_line_error(capsys, "need --backend ray")


def test_run_status_export(capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path) -> None:
    db = tmp_path / "runs" / "lab.db"
    assert main(["lab", "run", str(study), "--db", str(db), "--no-progress"]) == 0
    assert "clitest [quick] on local: 4 done, 0 failed" in capsys.readouterr().out
    # Again: everything is skipped.
    assert main(["lab", "run", str(study), "--db", str(db), "--no-progress"]) == 0
    assert "0 done, 0 failed, 4 already done" in capsys.readouterr().out

    assert main(["lab", "status", "--db", str(db)]) == 0
    assert capsys.readouterr().out == (
        "clitest [quick]: 4/4 done (0 pending, 0 running, 4 done, 0 failed); "
        "at most 3 attempts per trial\n"
    )
    assert main(["lab", "status", str(study), "--db", str(db)]) == 0  # the file names the study
    assert capsys.readouterr().out.startswith("clitest [quick]: 4/4 done")
    assert main(["lab", "status", "other", "--db", str(db)]) == 2
    one_line_error(capsys, "no study named 'other'", "it has: clitest")

    out = tmp_path / "export"
    assert main(["lab", "export", "clitest", "--db", str(db), "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == [
        "clitest_trials.csv", "clitest_epochs.csv", "clitest_layer_shift.csv"
    ]
    trials = pd.read_csv(written[0])
    assert trials.status.tolist() == ["done"] * 4
    assert sorted(trials.rate) == [0.1, 0.1, 0.4, 0.4]  # the swept axis
    parquet = tmp_path / "all.parquet"
    args = ["lab", "export", "clitest", "--db", str(db), "--out", str(parquet)]
    assert main([*args, "--format", "parquet"]) == 0
    assert len(pd.read_parquet(tmp_path / "all_epochs.parquet")) == 4 * 2


def test_missing_database_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "none.db")
    assert main(["lab", "status", "--db", missing]) == 2
    one_line_error(capsys, "no results database at", "--db FILE")
    assert main(["lab", "export", "x", "--db", missing, "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "no results database at")
    assert main(["lab", "report", "x", "--db", missing, "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "no results database at")
    assert not (tmp_path / "none.db").exists()


def test_a_busy_database_is_refused(
    capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path
) -> None:
    db = tmp_path / "r.db"
    with DriverLock(db):
        assert main(["lab", "run", str(study), "--db", str(db), "--no-progress"]) == 2
    one_line_error(capsys, "is being written by another driver (pid ")


def test_failed_trials_are_shown_and_give_exit_status_1(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    study: Path,
    tmp_path: Path,
) -> None:
    def failing(config: object, seed: int, **_: object) -> TrialResult:
        raise MemoryError(f"no room for seed {seed}")

    monkeypatch.setattr(varshift.lab.trial, "run_trial", failing)
    db = str(tmp_path / "r.db")
    assert main(["lab", "run", str(study), "--db", db, "--no-progress", "--fail-fast"]) == 1
    captured = capsys.readouterr()
    assert "stopped at the first failure" in captured.out
    assert "failed: arm rate=0.1 seed 0: MemoryError: no room for seed 0" in captured.err
    assert main(["lab", "run", str(study), "--db", db, "--no-progress"]) == 1
    assert "--retry-failed re-runs them" in capsys.readouterr().out
    # status lists each failed trial with its attempts and the whole first line of its error.
    assert main(["lab", "status", "clitest", "--db", db]) == 0
    status = capsys.readouterr().out
    assert "  failed: arm rate=0.1 seed 0 (attempt 1 of 3): MemoryError: no room for seed 0" \
        in status


def test_report_prints_the_written_paths(
    capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path
) -> None:
    pytest.importorskip("varshift.lab.report")
    db = str(tmp_path / "r.db")
    assert main(["lab", "run", str(study), "--db", db, "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["lab", "report", "clitest", "--db", db, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed
    assert all(Path(p).exists() for p in printed)
    # The options reach write_report: a target adds the epochs-to-target section, a loss metric
    # is named in the tables, and an arm that does not exist is a one-line error.
    again = tmp_path / "again"
    assert main(["lab", "report", "clitest", "--db", db, "--out", str(again),
                 "--metric", "test_loss", "--target", "0.0"]) == 0
    markdown = (again / "report.md").read_text()
    assert "test_loss" in markdown
    assert "Epochs to reach a test metric of 0" in markdown
    capsys.readouterr()
    assert main(["lab", "report", "clitest", "--db", db, "--out", str(again),
                 "--reference", "no-such-arm"]) == 2
    assert "no-such-arm" in capsys.readouterr().err


def test_default_database_and_output_folders(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    study: Path,
    tmp_path: Path,
) -> None:
    pytest.importorskip("varshift.lab.report")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["lab", "run", str(study), "--no-progress"]) == 0
    assert (work / "varshift-lab.db").is_file()
    assert main(["lab", "status"]) == 0
    assert capsys.readouterr().out.endswith("clitest [quick]: 4/4 done (0 pending, 0 running, "
                                            "4 done, 0 failed); at most 3 attempts per trial\n")
    assert main(["lab", "report", "clitest"]) == 0
    assert capsys.readouterr().out.split() == [
        str(Path("varshift-report/clitest/report.md")),
        str(Path("varshift-report/clitest/report.html")),
    ]
    assert main(["lab", "report", str(study), "--preset", "quick"]) == 0  # the file names it
    assert (work / "varshift-report" / "clitest-quick" / "report.md").is_file()
    assert main(["lab", "export", "clitest", "--preset", "quick"]) == 0
    assert (work / "varshift-export" / "clitest-quick" / "clitest_trials.csv").is_file()


def test_status_shows_the_attempts_of_a_running_trial(
    capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path
) -> None:
    db = tmp_path / "r.db"
    assert main(["lab", "run", str(study), "--db", str(db), "--no-progress"]) == 0
    capsys.readouterr()
    # A driver that died in its second attempt at trial 1 leaves it so.
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE trials SET status = 'running', attempts = 2 WHERE id = 1")
    connection.close()
    assert main(["lab", "status", "clitest", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("clitest [quick]: 3/4 done (0 pending, 1 running, 3 done, ")
    assert lines[1] == "  running: arm rate=0.1 seed 0 (attempt 2 of 3)"
