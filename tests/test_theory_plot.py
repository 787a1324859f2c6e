"""``varshift.theory.plot.plot_shift_curves``: the figure of ``varshift simulate --plot``, the
path it really wrote, and refusals before any simulation."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import varshift.theory.plot as theory_plot
from varshift.theory.plot import plot_shift_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writes_the_figure_and_returns_its_path(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = plot_shift_curves(
        tmp_path / "shift", mean=0.5, width=8, cos2=0.2, rho=0.3, samples=200
    )
    assert written == tmp_path / "shift.png"  # no suffix: .png added, as matplotlib would
    assert written.read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "shift").exists()
    svg = plot_shift_curves(str(tmp_path / "shift.svg"), samples=200)
    assert svg == tmp_path / "shift.svg"
    assert "<svg" in svg.read_text()


def test_refusals_come_before_any_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("simulated although the call was refused")

    monkeypatch.setattr(theory_plot, "simulate_shift", never)
    with pytest.raises(IsADirectoryError, match="is a directory; name a file"):
        plot_shift_curves(tmp_path)
    with pytest.raises(ValueError, match="needs cos2 with width"):
        plot_shift_curves(tmp_path / "x.png", width=4)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'varshift\[plot\]'"):
        plot_shift_curves(tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_imports_nothing_of_varshift_outside_theory() -> None:
    tree = ast.parse(Path(theory_plot.__file__).read_text())
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
    ours = [name for name in imported if name.split(".")[0] == "varshift"]
    assert ours
    assert all(name.startswith("varshift.theory.") for name in ours), ours
