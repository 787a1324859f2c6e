"""``varshift theory`` and ``varshift simulate``: output, one-line errors, the --plot PNG."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import fails_with_one_line
from varshift.cli import main
from varshift.theory import shift_parts, simulate_shift, variance_shift

K = 4.0  # standard errors allowed for one statistic


def _value(output: str, label: str) -> float:
    """The first number on the line that starts with ``label``."""
    line = next(line for line in output.splitlines() if line.startswith(label))
    return float(line[len(label):].split()[0])


def test_theory_prints_the_shift_and_its_parts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "--kind", "bernoulli", "--p", "0.5", "--mean", "0.5", "--var", "1"]) == 0
    out = capsys.readouterr().out
    parts = shift_parts("bernoulli", 0.5, 1.0, p=0.5)
    assert "bernoulli noise (p=0.5)" in out
    assert _value(out, "noise variance") == pytest.approx(parts.noise_variance, rel=1e-5)
    assert _value(out, "train variance") == pytest.approx(parts.train_var, rel=1e-5)
    assert _value(out, "test variance") == pytest.approx(parts.test_var, rel=1e-5)
    assert _value(out, "shift") == pytest.approx(parts.shift, rel=1e-5)


def test_theory_with_a_linear_unit_and_uout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["theory", "--kind", "uout", "--beta", "0.4", "--mean", "0.2", "--var", "2",
            "--width", "512", "--cos2", "0.1", "--rho", "0.3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = variance_shift("uout", 0.2, 2.0, width=512, cos2=0.1, rho=0.3, beta=0.4)
    assert _value(out, "shift") == pytest.approx(expected, rel=1e-5)
    assert "fan-in 512" in out


def test_simulate_compares_formula_and_monte_carlo(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--kind", "gaussian", "--p", "0.4", "--mean", "1", "--var", "0.5",
            "--width", "16", "--cos2", "0.3", "--rho", "0.2", "--samples", "5000", "--seed", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = simulate_shift(
        "gaussian", 1.0, 0.5, width=16, cos2=0.3, rho=0.2, samples=5000, seed=2, p=0.4
    )
    assert _value(out, "formula") == pytest.approx(expected.formula, abs=1e-6)
    assert _value(out, "monte carlo") == pytest.approx(expected.estimate, abs=1e-6)
    assert "+/-" in out
    assert "delta method" in out
    z = _value(out, "z-score")
    assert z == pytest.approx(expected.z, abs=0.01)
    assert abs(z) < K


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["theory"], r"missing p"),
        (["theory", "--kind", "uout", "--p", "0.5"], r"missing beta and unexpected p"),
        (["theory", "--p", "1"], r"p must be finite and in \[0, 1\)"),
        (["theory", "--kind", "dropsy", "--p", "0.5"], r"known kinds: bernoulli, gaussian, uout"),
        (["theory", "--p", "0.5", "--width", "8"], r"needs both cos2 and rho"),
        (["theory", "--p", "0.5", "--var", "0"], r"var must be finite and in \(0, inf\)"),
        (["theory", "--p", "x"], r"argument --p: invalid float value: 'x'"),
        (["simulate", "--p", "0.5", "--samples", "3"], r"samples must be an integer in \[10"),
        (["simulate", "--p", "0.5", "--rho", "0.2"], r"need width"),
        (["simulate", "--p", "0.5", "--width", "2.5"], r"invalid int value"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails_with_one_line(argv, capsys)
    assert line.startswith("varshift")
    assert re.search(message, line), line


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "shift.png"
    argv = ["simulate", "--p", "0.3", "--mean", "0.5", "--width", "8", "--rho", "0.3",
            "--samples", "500", "--plot", str(path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"plot written to {path}" in captured.out
    assert "simulating" in captured.err  # the progress bar goes to stderr
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # two panels of lines and points, not an empty canvas


def test_plot_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    argv = ["simulate", "--p", "0.3", "--samples", "100", "--plot", str(tmp_path / "x.png")]
    line = fails_with_one_line(argv, capsys)
    assert "pip install 'varshift[plot]'" in line
    assert not (tmp_path / "x.png").exists()


def test_the_installed_script_fails_cleanly() -> None:
    # One real process (it pays torch's import): the entry point, the exit status, no traceback.
    script = Path(sys.executable).with_name("varshift")
    if not script.exists():
        pytest.skip("the varshift script is not installed next to this interpreter")
    bad = subprocess.run(
        [str(script), "theory", "--kind", "uout", "--beta", "3"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1
    assert "beta must be finite and in [0, 1]" in bad.stderr
