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
import math
from typing import Any

from varshift.cli.arguments import figure_file, finite_float

__all__ = ["register"]

# The noise parameters the built-in kinds take, each with its own flag.
_NOISE_FLAGS = ("p", "beta")



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
        "--plot", metavar="FILE", type=figure_file, default=None,
        help="also write a figure of the shift against p for bernoulli, gaussian and uout "
        "(format from the suffix; none: .png is added)",
    )
    simulate.set_defaults(handler=_run_simulate)


def _add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The noise and the unit it hits: shared by both commands."""
    parser.add_argument(
        "--kind", default="bernoulli",
        help="noise kind: bernoulli, gaussian (take --p) or uout (takes --beta); default bernoulli",
    )
    parser.add_argument(
        "--p", type=finite_float, default=None, help="drop probability in [0, 1)"
    )
    parser.add_argument(
        "--beta", type=finite_float, default=None, help="Uout half-width in [0, 1]"
    )
    parser.add_argument(
        "--mean", type=finite_float, default=0.0, help="mean c of the input (default 0)"
    )
    parser.add_argument(
        "--var", type=finite_float, default=1.0, help="variance v > 0 (default 1)"
    )
    parser.add_argument(
        "--width", type=int, default=None,
        help="fan-in d of a linear unit between the noise and the BatchNorm",
    )
    parser.add_argument(
        "--cos2", type=finite_float, default=None,
        help="cos^2 of the angle between the weights and the all-ones vector (with --width)",
    )
    parser.add_argument(
        "--rho", type=finite_float, default=None,
        help="correlation between the inputs (with --width)",
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

    # shift_parts refuses moments whose variances overflow float64: no inf or 0 is printed.
    parts = shift_parts(
        args.kind, args.mean, args.var,
        width=args.width, cos2=args.cos2, rho=args.rho, **_noise_params(args),
    )  # fmt: skip
    rows = (
        ("noise variance", parts.noise_variance, "sigma^2 = Var[m], with E[m] = 1"),
        ("train variance", float(parts.train_var), "noise on: BatchNorm's running variance"),
        ("test variance", float(parts.test_var), "noise off: what BatchNorm sees in eval"),
        ("shift", float(parts.shift), "test / train (1 means no shift)"),
    )
    print(_describe_setup(args, args.cos2))
    for label, value, meaning in rows:
        print(f"{label:<15} {value:<9.6g} {meaning}")
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    from varshift.theory import simulate_shift

    rho = 0.0 if args.rho is None else args.rho
    # simulate_shift refuses overflowing moments and sample counts beyond its memory limit.
    result = simulate_shift(
        args.kind, args.mean, args.var, width=args.width, cos2=args.cos2, rho=rho,
        samples=args.samples, seed=args.seed, **_noise_params(args),
    )  # fmt: skip
    print(_describe_setup(args, result.cos2))
    print(f"formula      {result.formula:.6f}")
    print(
        f"monte carlo  {result.estimate:.6f} +/- {result.stderr:.6f}  ({result.samples} samples, "
        f"seed {args.seed}, {result.method} standard error)"
    )
    # No spread (stderr 0) around an estimate off the formula makes z infinite: a dash, not inf.
    print(f"z-score      {result.z:+.2f}" if math.isfinite(result.z) else "z-score      -")
    if args.plot is not None:
        from varshift.theory.plot import plot_shift_curves

        unit: dict[str, Any] = {}
        if args.width is not None:
            unit = {"width": args.width, "cos2": result.cos2, "rho": rho}
        path = plot_shift_curves(
            args.plot, mean=args.mean, var=args.var, samples=args.samples, seed=args.seed,
            progress=True, **unit,
        )  # fmt: skip
        print(f"plot written to {path}")
    return 0
