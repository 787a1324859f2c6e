"""Hostile input for ``varshift diagnose/recalibrate/theory/simulate/demo``: every case ends with
exit status 2, exactly one line on stderr, no traceback, and no file written; and where a
command succeeds, what it prints is true (the path it wrote, the data it used)."""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest
import torch

import varshift.fix
from helpers.cli import fails_with_one_line, write_zoo
from varshift.cli import main, one_line

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
MODEL = ["--model", "{zoo}:noisy", "--no-progress"]
DIGITS = ["--data", "builtin:digits"]
OUT = ["--out", "fixed.pt"]


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The factories of ``helpers.cli.ZOO`` and the hostile files the table names, in the
    current directory."""
    name = write_zoo(tmp_path, monkeypatch)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    good = tmp_path / "good.pt"
    torch.save(torch.nn.Sequential(torch.nn.BatchNorm2d(6)).state_dict(), good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:200])
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    state = runpy.run_path(f"{name}.py")["noisy"]().state_dict()
    state["bn.running_var"][2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    locked = tmp_path / "locked.pt"
    torch.save(state, locked)
    locked.chmod(0)
    return name


HOSTILE = [
    # Output paths that are folders (refused while parsing, before any work).
    (["diagnose", *MODEL, *DIGITS, "--plot", "adir"], r"argument --plot: 'adir' is a directory"),
    (["diagnose", *MODEL, *DIGITS, "--json", "adir"], r"argument --json: 'adir' is a directory"),
    (["simulate", "--p", "0.3", "--plot", "adir/"], r"argument --plot: 'adir/' is a directory"),
    (["recalibrate", *MODEL, *DIGITS, "--out", "adir"], r"argument --out: 'adir' is a directory"),
    (["demo", "--out", "afile"], r"argument --out: 'afile' is a file, not a folder"),
    # Checkpoints that are no checkpoint.
    (["recalibrate", *MODEL, "--checkpoint", "adir", *DIGITS, *OUT],
     r"checkpoint adir is a directory, not a file"),
    (["diagnose", *MODEL, "--checkpoint", "garbage.pt", *DIGITS],
     r"cannot read checkpoint garbage\.pt \(expected a state_dict saved with torch\.save\): \w+"),
    (["recalibrate", *MODEL, "--checkpoint", "truncated.pt", *DIGITS, *OUT],
     r"cannot read checkpoint truncated\.pt"),
    (["recalibrate", *MODEL, "--checkpoint", "list.pt", *DIGITS, *OUT],
     r"checkpoint list\.pt holds a list, not a state_dict"),
    (["recalibrate", *MODEL, "--checkpoint", "nan.pt", *DIGITS, *OUT],
     r"checkpoint nan\.pt holds NaN or infinite values in bn\.running_var"),
    pytest.param(
        ["recalibrate", *MODEL, "--checkpoint", "locked.pt", *DIGITS, *OUT],
        r"cannot read checkpoint locked\.pt: permission denied",
        marks=pytest.mark.skipif(ROOT, reason="root reads any file"),
    ),
    # Loaders that break, lie or never end.
    # (measure and recalibrate_bn refuse bad values themselves; the CLI adds nothing to that.)
    (["recalibrate", *MODEL, "--data", "{zoo}:bad_labels", *OUT],
     r"batch \d of the data has class labels from 12 to 12, .* labels must be in \[0, 9\]"),
    (["diagnose", *MODEL, "--data", "{zoo}:bad_labels"], r"labels must be in \[0, 9\]"),
    (["recalibrate", *MODEL, "--data", "{zoo}:breaks", *OUT],
     r"--data zoo_\d+:breaks: reading batch 2 raised RuntimeError: disk went away"),
    (["diagnose", *MODEL, "--data", "{zoo}:breaks"], r"reading batch 2 raised RuntimeError"),
    (["recalibrate", *MODEL, "--data", "{zoo}:nan_inputs", *OUT],
     r"batch \d of the data gives nan/inf .*: the model input of that batch holds nan/inf"),
    (["diagnose", *MODEL, "--data", "{zoo}:nan_inputs"], r"the model input of that batch holds"),
    (["recalibrate", *MODEL, "--data", "{zoo}:huge", *OUT], r"(?i)(nan|infinite).* at .*bn"),
    (["diagnose", *MODEL, "--data", "{zoo}:huge"], r"(?i)(nan|infinite).* at .*bn"),
    (["diagnose", *MODEL, "--data", "{zoo}:endless"],
     r"returned a one-shot iterator \(generator\), which may never end .* give --batches N"),
    (["recalibrate", *MODEL, "--data", "{zoo}:endless", *OUT], r"--batches N or --samples N"),
    # Conflicting or out-of-range flags.
    (["recalibrate", *MODEL, *DIGITS, "--keep-noise", "--dropout", "off", *OUT],
     r"argument --dropout: not allowed with argument --keep-noise"),
    (["recalibrate", *MODEL, *DIGITS, "--samples", "0", *OUT], r"argument --samples: must be"),
    (["demo", "--epochs", "-1"], r"argument --epochs: must be an integer >= 0, got '-1'"),
    # Maths that overflows, and numbers that are none.
    (["theory", "--p", "0.5", "--mean", "1e308"], r"mean and var must keep .* within float64"),
    (["theory", "--p", "0.5", "--mean", "inf"], r"argument --mean: must be a finite number"),
    (["theory", "--p", "nan"], r"argument --p: must be a finite number, got 'nan'"),
    (["simulate", "--p", "0.5", "--var=-inf"], r"argument --var: must be a finite number"),
    (["simulate", "--p", "0.5", "--mean", "1e200", "--samples", "100"], r"within float64"),
    (["simulate", "--p", "0.5", "--samples", "10000000000000"], r"pass at most \d+ samples"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), HOSTILE)
def test_hostile_input_gives_one_line_and_writes_nothing(
    zoo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = sorted(path.name for path in tmp_path.iterdir())
    line = fails_with_one_line([arg.format(zoo=zoo) for arg in argv], capsys)
    assert line.startswith("varshift")
    assert re.search(message, line), line
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__")
    assert written == before


def test_recalibrate_writes_nothing_when_the_estimate_fails(
    zoo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # recalibrate_bn refuses non-finite statistics with a ValueError (and restores the old ones).
    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("recalibrate_bn: non-finite running_var in bn")

    monkeypatch.setattr(varshift.fix, "recalibrate_bn", refuse)
    argv = ["recalibrate", f"--model={zoo}:noisy", *DIGITS, *OUT, "--no-progress"]
    assert "non-finite running_var in bn" in fails_with_one_line(argv, capsys)
    assert not (tmp_path / "fixed.pt").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["diagnose", "--model", "{zoo}:noisy", *DIGITS, "--batches", "1", "--plot"],
        ["simulate", "--p", "0.3", "--samples", "100", "--plot"],
    ],
)
@pytest.mark.parametrize(("given", "written"), [("noext", "noext.png"), ("fig.svg", "fig.svg")])
def test_the_printed_plot_path_is_the_file_written(
    zoo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: list[str], given: str, written: str,
) -> None:  # fmt: skip
    pytest.importorskip("matplotlib")
    assert main([*(arg.format(zoo=zoo) for arg in argv), given]) == 0
    printed = re.search(r"^plot written to (.+)$", capsys.readouterr().out, re.MULTILINE)
    assert printed is not None
    assert printed.group(1) == written
    assert (tmp_path / written).is_file()
    assert not (tmp_path / given).exists() or given == written


def test_an_endless_generator_is_read_only_as_far_as_asked(
    zoo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Batches of 16: --samples 100 reads 7 of them, --batches 2 two; both end.
    assert main(["recalibrate", "--model", f"{zoo}:noisy", "--data", f"{zoo}:endless",
                 "--samples", "100", *OUT, "--no-progress"]) == 0  # fmt: skip
    assert "using the first 100 samples" in capsys.readouterr().out
    assert main(["diagnose", "--model", f"{zoo}:noisy", "--data", f"{zoo}:endless",
                 "--batches", "2", "--no-progress"]) == 0  # fmt: skip
    assert "32 samples in 2 batch(es)" in capsys.readouterr().out


def test_a_multi_line_message_is_printed_whole_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(args: object) -> int:
        raise ValueError("invalid configuration (2 problems):\n - seeds: empty\n\n - arms: none")

    monkeypatch.setattr("varshift.cli.theory._run_theory", fail)
    line = fails_with_one_line(["theory"], capsys)
    assert line == "varshift: error: invalid configuration (2 problems): seeds: empty; arms: none"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("one line", "one line"),
        ("  padded  \n", "padded"),
        ("a:\n\tb\n* c", "a: b; c"),
        ("first\nsecond", "first; second"),
        ("", ""),
    ],
)
def test_one_line(message: str, expected: str) -> None:
    assert one_line(message) == expected
