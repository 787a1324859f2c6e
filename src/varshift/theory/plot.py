"""The variance shift against the noise strength for every built-in kind, formula and Monte Carlo
side by side: the figure of ``varshift simulate --plot``.

    from varshift.theory.plot import plot_shift_curves

    plot_shift_curves("shift.png", mean=0.5, var=1.0, samples=20_000)

matplotlib is optional (``pip install 'varshift[plot]'``) and imported only when a figure is
drawn, through the Agg canvas object (never ``pyplot``, so the caller's backend and open figures
are untouched). Like the rest of :mod:`varshift.theory`, this module imports nothing else of
varshift.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from varshift.theory.montecarlo import simulate_shift
from varshift.theory.noise import noise_variance
from varshift.theory.shift import variance_shift

__all__ = ["PLOT_KINDS", "plot_shift_curves"]

PLOT_KINDS = (("bernoulli", "p"), ("gaussian", "p"), ("uout", "beta"))
"""The kinds drawn, each with the parameter on its x axis: ``p`` from 0 to 0.8, ``beta`` from 0
to 1."""

# Monte Carlo points per kind, and formula points per line.
_POINTS = 9
_LINE_POINTS = 161
# Largest parameter drawn: p = 0.8 keeps Bernoulli's 1/(1 - p) scale readable; beta = 1 is Uout's
# whole range.
_LARGEST = {"p": 0.8, "beta": 1.0}

_COLOURS = {"bernoulli": "tab:blue", "gaussian": "tab:orange", "uout": "tab:green"}
_LINE_STYLES: dict[str, Any] = {"bernoulli": "-", "gaussian": (0, (5, 4)), "uout": "-"}
_MARKERS = {"bernoulli": "o", "gaussian": "s", "uout": "^"}
# Bernoulli and Gaussian points sit on top of each other: hollow squares keep both visible.
_FACES = {"bernoulli": "tab:blue", "gaussian": "none", "uout": "tab:green"}


def plot_shift_curves(
    path: str | os.PathLike[str],
    *,
    mean: float = 0.0,
    var: float = 1.0,
    width: int | None = None,
    cos2: float | None = None,
    rho: float = 0.0,
    samples: int = 100_000,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Draw the variance shift ``Δ`` against the noise strength and write it to ``path``.

    Left panel: ``Δ`` against each kind's own parameter (``p`` for bernoulli and gaussian,
    ``β`` for uout): the formula as a line, :func:`~varshift.theory.simulate_shift` at
    nine values as points with ±2 standard errors. Right panel: the same points against the
    noise variance written as a drop probability, ``σ²/(1 + σ²)``, where one curve (the
    formula) serves every kind, since ``Δ`` depends on the noise only through ``σ²``.

    Args:
        path: the file to write; the format follows the suffix, and a name without one gets
            ``.png``.
        mean, var: moments ``c`` and ``v > 0`` of the unit the noise hits.
        width, cos2, rho: a linear unit of fan-in ``width`` between the noise and the
            BatchNorm, with weights at ``cos2`` to the all-ones vector (required with
            ``width``, so that lines and points describe the same unit) and input
            correlation ``rho``.
        samples, seed: of each Monte Carlo point.
        progress: a tqdm bar on stderr over the 27 simulations.

    Returns:
        The path written (``path`` with ``.png`` added when it had no suffix).

    Raises:
        IsADirectoryError: ``path`` is an existing directory.
        ValueError: ``cos2`` missing with ``width``, and whatever
            :func:`~varshift.theory.simulate_shift` refuses.
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    target = _figure_path(path)
    if width is not None and cos2 is None:
        raise ValueError(f"plot_shift_curves needs cos2 with width, got width={width}, cos2=None")
    unit: dict[str, Any] = {} if width is None else {"width": width, "cos2": cos2, "rho": rho}
    figure = _new_figure()  # without matplotlib, fail before the simulations
    points = _simulated_points(mean, var, unit, samples=samples, seed=seed, progress=progress)
    by_parameter, by_variance = figure.subplots(1, 2, sharey=True)
    for kind, name in PLOT_KINDS:
        grid = _grid(name, _LINE_POINTS)
        line = [variance_shift(kind, mean, var, **unit, **{name: value}) for value in grid]
        symbol = "p" if name == "p" else "β"
        by_parameter.plot(
            grid, line, color=_COLOURS[kind], linestyle=_LINE_STYLES[kind],
            label=f"{kind} formula (x = {symbol})",
        )  # fmt: skip
        value, equivalent, shift, stderr = (list(column) for column in zip(*points[kind]))
        for axis, x in ((by_parameter, value), (by_variance, equivalent)):
            axis.errorbar(
                x, shift, yerr=[2 * s for s in stderr], fmt=_MARKERS[kind], color=_COLOURS[kind],
                markerfacecolor=_FACES[kind], markersize=6, capsize=2,
                label=f"{kind} Monte Carlo (±2 s.e.)",
            )  # fmt: skip
    grid = _grid("p", _LINE_POINTS)
    common = [variance_shift("bernoulli", mean, var, **unit, p=value) for value in grid]
    by_variance.plot(grid, common, color="black", label="formula (every kind)")
    _label(by_parameter, by_variance)
    setup = f"c = {mean:g}, v = {var:g}"
    if width is not None:
        setup += f", fan-in d = {width}, cos²θ = {cos2:.3g}, ρ = {rho:g}"
    figure.suptitle(
        f"Variance shift after multiplicative noise ({setup}; Monte Carlo N = {samples})"
    )
    figure.savefig(target, dpi=120)
    return target


def _figure_path(path: str | os.PathLike[str]) -> Path:
    """``path``, with ``.png`` when it has no suffix (matplotlib would add it unasked, and the
    caller would report a file that does not exist); a directory is refused."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"plot path {str(path)!r} is a directory; name a file")
    return target if target.suffix else target.with_name(target.name + ".png")


def _grid(name: str, count: int) -> list[float]:
    largest = _LARGEST[name]
    return [largest * i / (count - 1) for i in range(count)]


def _simulated_points(
    mean: float, var: float, unit: dict[str, Any], *, samples: int, seed: int, progress: bool
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per kind: (parameter, σ²/(1 + σ²), simulated shift, its standard error) at each point."""
    from tqdm import tqdm

    todo = [(kind, name, value) for kind, name in PLOT_KINDS for value in _grid(name, _POINTS)]
    points: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k, _ in PLOT_KINDS}
    bar = tqdm(todo, desc="simulating", file=sys.stderr, unit="point", disable=not progress)
    for kind, name, value in bar:
        noise = {name: value}
        estimate = simulate_shift(kind, mean, var, samples=samples, seed=seed, **unit, **noise)
        sigma2 = noise_variance(kind, **noise)
        points[kind].append((value, sigma2 / (1 + sigma2), estimate.estimate, estimate.stderr))
    return points


def _new_figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot_shift_curves needs matplotlib: pip install 'varshift[plot]'"
        ) from None
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _label(by_parameter: Any, by_variance: Any) -> None:
    by_parameter.set_xlabel("drop probability p (bernoulli, gaussian) or half-width β (uout)")
    by_parameter.set_ylabel("variance shift Δ = Var_test / Var_train")
    by_parameter.set_title("by each kind's own parameter")
    by_variance.set_xlabel("noise variance as a drop probability, σ²/(1+σ²)  (uout: β²/(3+β²))")
    by_variance.set_title("by noise variance: one curve for every kind")
    for axis in (by_parameter, by_variance):
        axis.grid(alpha=0.3)
        axis.set_xlim(-0.02, 1.02)
        axis.legend(fontsize=8, loc="lower left")
