"""``varshift lab``: every sub-command's exit status and output, and one-line errors."""

from __future__ import annotations

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
    assert "preset quick: 8 trials = 4 arms x 2 seeds" in out
    assert "(reference)" in out
    assert main(["lab", "show", str(study)]) == 0
    assert "preset quick: 4 trials = 2 arms x 2 seeds" in capsys.readouterr().out


def test_unknown_study_and_preset_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path
) -> None:
    assert main(["lab", "show", "no-such-study"]) == 2
    one_line_error(capsys, "no-such-study", "built-in studies: ")
    assert main(["lab", "show", "example", "--preset", "huge"]) == 2
    one_line_error(capsys, "has no such preset", "quick, full")
    assert main(["lab", "run", str(study), "--preset", "full", "--db", str(tmp_path / "r.db")]) == 2
    one_line_error(capsys, "has no preset 'full'")
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

    assert main(["lab", "status", str(db)]) == 0
    assert capsys.readouterr().out == (
        "clitest [quick]: 4/4 done (0 pending, 0 running, 4 done, 0 failed)\n"
    )
    assert main(["lab", "status", str(db), "--study", "other"]) == 2
    one_line_error(capsys, "no study named 'other'", "it has: clitest")

    out = tmp_path / "export"
    assert main(["lab", "export", str(db), "--study", "clitest", "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == [
        "clitest_trials.csv", "clitest_epochs.csv", "clitest_layer_shift.csv"
    ]
    trials = pd.read_csv(written[0])
    assert trials.status.tolist() == ["done"] * 4
    assert sorted(trials.rate) == [0.1, 0.1, 0.4, 0.4]  # the swept axis
    parquet = tmp_path / "all.parquet"
    args = ["lab", "export", str(db), "--study", "clitest", "--out", str(parquet)]
    assert main([*args, "--format", "parquet"]) == 0
    assert len(pd.read_parquet(tmp_path / "all_epochs.parquet")) == 4 * 2


def test_missing_database_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "none.db")
    assert main(["lab", "status", missing]) == 2
    one_line_error(capsys, "no results database at")
    assert main(["lab", "export", missing, "--study", "x", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "no results database at")
    assert main(["lab", "report", missing, "--study", "x", "--out", str(tmp_path)]) == 2
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


def test_report_prints_the_written_paths(
    capsys: pytest.CaptureFixture[str], study: Path, tmp_path: Path
) -> None:
    pytest.importorskip("varshift.lab.report")
    db = str(tmp_path / "r.db")
    assert main(["lab", "run", str(study), "--db", db, "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["lab", "report", db, "--study", "clitest", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed
    assert all(Path(p).exists() for p in printed)
    # The options reach write_report: a target adds the epochs-to-target section, a loss metric
    # is named in the tables, and an arm that does not exist is a one-line error.
    again = tmp_path / "again"
    assert main(["lab", "report", db, "--study", "clitest", "--out", str(again),
                 "--metric", "test_loss", "--target", "0.0"]) == 0
    markdown = (again / "report.md").read_text()
    assert "test_loss" in markdown
    assert "Epochs to reach a test metric of 0" in markdown
    capsys.readouterr()
    assert main(["lab", "report", db, "--study", "clitest", "--out", str(again),
                 "--reference", "no-such-arm"]) == 2
    assert "no-such-arm" in capsys.readouterr().err
