"""``varshift lab`` refuses hostile arguments the same way every time: exit status 2, one line on
stderr, no traceback, and nothing created or written where the call was refused.

Each case runs ``varshift.cli.main`` in-process, in an empty working folder (so that default
paths such as ``./varshift-lab.db`` and ``./varshift-report/`` would land there), and checks that
the folder is still empty afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import varshift.lab.backends
from helpers.cli import fails_with_one_line
from helpers.lab_studies import study_toml
from varshift.cli import main


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Study files and a results database with one done study, outside the working folder."""
    folder = tmp_path_factory.mktemp("lab")
    study = folder / "hostile.toml"
    study.write_text(study_toml("hostile", seeds=1, train_size=60, epochs=1))
    text = study.read_text()
    (folder / "bigseed.toml").write_text(text.replace("seeds = 1", f"seeds = [{2**64}]"))
    (folder / "huge.toml").write_text(text.replace("seeds = 1", "seeds = 10000000"))
    (folder / "twoproblems.toml").write_text(
        text.replace("train.epochs = 1", "train.epochs = 0\ntrain.lr = -1"))
    db = folder / "done.db"
    assert main(["lab", "run", str(study), "--db", str(db), "--no-progress"]) == 0
    (folder / "afile").write_text("not a folder")
    return {"STUDY": str(study), "DB": str(db), "FOLDER": str(folder)}


def no_ray() -> None:
    raise ImportError("the ray backend needs Ray, which is not installed: pip install "
                      "'varshift[ray]'")


# (argv with {STUDY}/{DB}/{FOLDER} placeholders, a fragment of the one error line)
CASES = [
    # report: every argument is checked before a file is written
    ("report hostile --db {DB} --target nan", "target must be a finite number, got nan"),
    ("report hostile --db {DB} --target inf --out rep", "target must be a finite number"),
    ("report hostile --db {DB} --metric accuracy", "metric must be one of test_metric"),
    ("report hostile --db {DB} --reference nope", "reference arm 'nope' is not an arm"),
    ("report hostile --db {DB} --preset full", "has no preset 'full'"),
    ("report nope --db {DB}", "no study named 'nope'"),
    ("report hostile --db missing.db", "no results database at missing.db"),
    ("report hostile --db {DB} --out {FOLDER}/afile", "is a file; the report needs a folder"),
    # the old form (database first, --study) is explained in the new one
    ("report {DB} --study hostile --out rep",
     "lab report takes the study as its argument and the database as --db: "
     "varshift lab report hostile --db {DB}"),
    ("status runs.db", "varshift lab status STUDY --db runs.db"),
    ("export {DB} --study hostile --out x", "varshift lab export hostile --db {DB}"),
    ("status --db missing.db", "no results database at missing.db; name one with --db FILE"),
    ("export hostile --db missing.db", "no results database at missing.db"),
    ("export hostile --db {DB} --out x.csv --format parquet", "does not end in .parquet"),
    # run: refused before the database is created
    ("run {STUDY} --workers 0", "--workers must be >= 1, got 0"),
    ("run {STUDY} --workers 2", "the local backend runs one trial at a time"),
    ("run {STUDY} --preset full", "has no such preset"),
    ("run {STUDY} --ray-address auto", "need --backend ray"),
    ("run {STUDY} --backend ray --gpus-per-trial -1", "--gpus-per-trial must be a number >= 0"),
    ("run {STUDY} --data-dir nowhere", "--data-dir nowhere is not a folder"),
    ("run {STUDY} --backend ray --workers 2", "the ray backend needs Ray, which is not installed"),
    ("run {FOLDER}/bigseed.toml", "got 18446744073709551616"),
    ("run no-such-study", "no study file or built-in study of that name"),
    # show: a study of ten million seeds is refused at load (it used to hang), errors are one line
    ("show {FOLDER}/huge.toml", "got the count 10000000"),
    ("show {FOLDER}/twoproblems.toml", "(2 problems): base.train.lr: expected a number > 0"),
    ("show {STUDY} --preset full", "has no such preset"),
]


@pytest.mark.parametrize(("command", "fragment"), CASES, ids=[c for c, _ in CASES])
def test_refused_with_one_line_and_nothing_written(
    command: str,
    fragment: str,
    lab: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(varshift.lab.backends, "import_ray", no_ray)
    before = sorted(Path(lab["FOLDER"]).iterdir())
    argv = ["lab", *(part.format(**lab) for part in command.split())]
    line = fails_with_one_line(argv, capsys)
    assert line.startswith("varshift: error: ")
    assert fragment.format(**lab) in line
    assert list(tmp_path.iterdir()) == []  # no database, report or export in the working folder
    assert sorted(Path(lab["FOLDER"]).iterdir()) == before  # nor beside the given files


@pytest.mark.parametrize("sub", ["run hostile", "status", "report hostile", "export hostile"])
@pytest.mark.parametrize(("db", "fragment"), [("", "an empty path names no file"),
                                              ("{FOLDER}", "is a directory; name a file")])
def test_a_db_that_names_no_file_is_refused_while_parsing(
    sub: str, db: str, fragment: str, lab: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    line = fails_with_one_line(["lab", *sub.split(), "--db", db.format(**lab)], capsys)
    assert "argument --db" in line
    assert fragment in line
    assert list(tmp_path.iterdir()) == []
