"""``varshift theory`` and ``varshift simulate``: the variance-shift formula and its Monte Carlo
check, from the command line.

    varshift theory --kind bernoulli --p 0.5 --mean 0.5 --var 1
    varshift simulate --kind uout --beta 0.5 --width 64 --cos2 0.2 --rho 0.3 --plot shift.png

Both take the noise (``--kind`` with ``--p`` or ``--beta``) and the moments of the unit it hits
(``--mean``, ``--var``); ``--width`` (with ``--cos2``, ``--rho``) puts a linear unit of that
fan-in between the noise and the BatchNorm. The maths lives in :mod:`varshift.theory`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from varshift.theory import MonteCarloEstimate

__all__ = ["register"]

# The noise parameters the built-in kinds take, each with its own flag.
_NOISE_FLAGS = ("p", "beta")

# Monte Carlo points of the --plot figure: parameter values per kind.
_PLOT_KINDS = (("bernoulli", "p"), ("gaussian", "p"), ("uout", "beta"))
_PLOT_POINTS = 9


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``theory`` and ``simulate`` to the top-level parser."""
    theory = subparsers.add_parser(
        "theory",
        help="the variance shift and its parts, from the formula",
        description="Print the variance shift Var_test / Var_train at a BatchNorm after "
        "multiplicative noise (Li et al. 2019), with the noise, train and test variances.",
    )
    _add_setup_arguments(theory)
    theory.set_defaults(handler=_run_theory)

    simulate = subparsers.add_parser(
        "simulate",
        help="check the formula against a Monte Carlo simulation",
        description="Compare the variance-shift formula with a Monte Carlo estimate (delta-method "
        "standard error and z-score); --plot draws the shift against p for every built-in kind.",
    )
    _add_setup_arguments(simulate)
    simulate.add_argument("--samples", type=int, default=100_000, help="samples N (default 100000)")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    simulate.add_argument(
        "--plot", metavar="FILE", default=None,
        help="also write a PNG of the shift against p for bernoulli, gaussian and uout",
    )
    simulate.set_defaults(handler=_run_simulate)


def _add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The noise and the unit it hits: shared by both commands."""
    parser.add_argument(
        "--kind", default="bernoulli",
        help="noise kind: bernoulli, gaussian (take --p) or uout (takes --beta); default bernoulli",
    )
    parser.add_argument("--p", type=float, default=None, help="drop probability in [0, 1)")
    parser.add_argument("--beta", type=float, default=None, help="Uout half-width in [0, 1]")
    parser.add_argument("--mean", type=float, default=0.0, help="mean c of the input (default 0)")
    parser.add_argument("--var", type=float, default=1.0, help="variance v > 0 (default 1)")
    parser.add_argument(
        "--width", type=int, default=None,
        help="fan-in d of a linear unit between the noise and the BatchNorm",
    )
    parser.add_argument(
        "--cos2", type=float, default=None,
        help="cos^2 of the angle between the weights and the all-ones vector (with --width)",
    )
    parser.add_argument(
        "--rho", type=float, default=None, help="correlation between the inputs (with --width)"
    )


def _noise_params(args: argparse.Namespace) -> dict[str, float]:
    """The noise flags given on the command line; the kind itself refuses missing or extra ones."""
    return {name: getattr(args, name) for name in _NOISE_FLAGS if getattr(args, name) is not None}


def _describe_setup(args: argparse.Namespace, cos2: float | None) -> str:
    params = ", ".join(f"{name}={value:g}" for name, value in _noise_params(args).items())
    text = f"{args.kind} noise ({params}) on an input of mean {args.mean:g}, variance {args.var:g}"
    if args.width is not None:
        rho = 0.0 if args.rho is None else args.rho
        cos2_text = "random" if cos2 is None else f"{cos2:.4g}"
        text += (
            f",\nthen a linear unit of fan-in {args.width} (cos2={cos2_text}, rho={rho:g}); "
            "variances per unit of |w|^2"
        )
    return text


def _run_theory(args: argparse.Namespace) -> int:
    from varshift.theory import shift_parts

    parts = shift_parts(
        args.kind, args.mean, args.var,
        width=args.width, cos2=args.cos2, rho=args.rho, **_noise_params(args),
    )
    print(_describe_setup(args, args.cos2))
    print(f"noise variance  {parts.noise_variance:<10.6g}sigma^2 = Var[m], with E[m] = 1")
    print(f"train variance  {float(parts.train_var):<10.6g}noise on: BatchNorm's running variance")
    print(f"test variance   {float(parts.test_var):<10.6g}noise off: what BatchNorm sees in eval")
    print(f"shift           {float(parts.shift):<10.6g}test / train (1 means no shift)")
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    from varshift.theory import simulate_shift

    rho = 0.0 if args.rho is None else args.rho
    params = _noise_params(args)
    result = simulate_shift(
        args.kind, args.mean, args.var, width=args.width, cos2=args.cos2, rho=rho,
        samples=args.samples, seed=args.seed, **params,
    )
    print(_describe_setup(args, result.cos2))
    print(f"formula      {result.formula:.6f}")
    print(
        f"monte carlo  {result.estimate:.6f} +/- {result.stderr:.6f}  ({result.samples} samples, "
        f"seed {args.seed}, {result.method} standard error)"
    )
    print(f"z-score      {result.z:+.2f}")
    if args.plot is not None:
        _write_plot(args.plot, args, result, rho)
        print(f"plot written to {args.plot}")
    return 0


def _write_plot(
    path: str, args: argparse.Namespace, result: MonteCarloEstimate, rho: float
) -> None:
    """Shift against the noise strength for every built-in kind: formula lines, Monte Carlo
    points with ±2 standard errors; left by each kind's own parameter, right on one axis."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'varshift[plot]'") from exc
    import numpy as np
    from tqdm import tqdm

    from varshift.theory import noise_variance, simulate_shift, variance_shift

    # The simulated unit's cos2 (drawn or given) is used everywhere, so lines and points agree.
    unit: dict[str, Any] = {}
    if args.width is not None:
        unit = {"width": args.width, "cos2": result.cos2, "rho": rho}
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    by_parameter, by_variance = figure.subplots(1, 2, sharey=True)
    colours = {"bernoulli": "tab:blue", "gaussian": "tab:orange", "uout": "tab:green"}
    styles = {"bernoulli": "-", "gaussian": (0, (5, 4)), "uout": "-"}
    markers = {"bernoulli": "o", "gaussian": "s", "uout": "^"}
    # Bernoulli and Gaussian points sit on top of each other: hollow squares keep both visible.
    faces = {"bernoulli": "tab:blue", "gaussian": "none", "uout": "tab:green"}
    points = [
        (kind, name, value)
        for kind, name in _PLOT_KINDS
        for value in np.linspace(0.0, 0.8 if name == "p" else 1.0, _PLOT_POINTS)
    ]
    simulated: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k, _ in _PLOT_KINDS}
    for kind, name, value in tqdm(points, desc="simulating", file=sys.stderr, unit="point"):
        noise: dict[str, Any] = {name: float(value)}
        estimate = simulate_shift(
            kind, args.mean, args.var, samples=args.samples, seed=args.seed, **unit, **noise
        )
        sigma2 = noise_variance(kind, **noise)
        simulated[kind].append((value, sigma2 / (1 + sigma2), estimate.estimate, estimate.stderr))

    for kind, name in _PLOT_KINDS:
        grid = np.linspace(0.0, 0.8 if name == "p" else 1.0, 161)
        line = [variance_shift(kind, args.mean, args.var, **unit, **{name: g}) for g in grid]
        axis_name = "p" if name == "p" else "β"
        by_parameter.plot(
            grid, line, color=colours[kind], linestyle=styles[kind],
            label=f"{kind} formula (x = {axis_name})",
        )
        value, equivalent, shift, stderr = (np.array(column) for column in zip(*simulated[kind]))
        for axis, x in ((by_parameter, value), (by_variance, equivalent)):
            axis.errorbar(
                x, shift, yerr=2 * stderr, fmt=markers[kind], color=colours[kind],
                markerfacecolor=faces[kind], markersize=6, capsize=2,
                label=f"{kind} Monte Carlo (±2 s.e.)",
            )
    # Δ depends on the noise only through σ², and σ²/(1+σ²) is Bernoulli's p: one curve for all.
    grid = np.linspace(0.0, 0.8, 161)
    common = [variance_shift("bernoulli", args.mean, args.var, **unit, p=g) for g in grid]
    by_variance.plot(grid, common, color="black", label="formula (every kind)")

    by_parameter.set_xlabel("drop probability p (bernoulli, gaussian) or half-width β (uout)")
    by_parameter.set_ylabel("variance shift Δ = Var_test / Var_train")
    by_parameter.set_title("by each kind's own parameter")
    by_variance.set_xlabel("noise variance as a drop probability, σ²/(1+σ²)  (uout: β²/(3+β²))")
    by_variance.set_title("by noise variance: one curve for every kind")
    for axis in (by_parameter, by_variance):
        axis.grid(alpha=0.3)
        axis.set_xlim(-0.02, 1.02)
        axis.legend(fontsize=8, loc="lower left")
    setup = f"c = {args.mean:g}, v = {args.var:g}"
    if args.width is not None:
        setup += f", fan-in d = {args.width}, cos²θ = {result.cos2:.3g}, ρ = {rho:g}"
    figure.suptitle(
        f"Variance shift after multiplicative noise ({setup}; Monte Carlo N = {args.samples})"
    )
    figure.savefig(path, dpi=120)
