"""Structured masks (drop path in row and batch mode, channel dropout): every closed form against
its Monte Carlo, the limits, and argument validation.

Agreement is judged in standard errors of each simulation (fixed seeds); the clustered standard
error of the channel simulation is itself checked against the spread over seeds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from varshift.theory import (
    channel_dropout_shift_through_conv,
    drop_path_running_stats,
    drop_path_shift,
    simulate_channel_dropout,
    simulate_channel_dropout_through_conv,
    simulate_drop_path,
    simulate_drop_path_running_stats,
    variance_shift,
)
from varshift.theory.draws import cos_squared

K = 4.0  # standard errors allowed for one statistic

PAIRS: list[dict[str, float]] = [
    {"trunk_mean": 0.0, "trunk_var": 1.0, "branch_mean": 0.0, "branch_var": 1.0},
    {"trunk_mean": 0.5, "trunk_var": 1.0, "branch_mean": 0.8, "branch_var": 0.5,
     "correlation": 0.3},
    {"trunk_mean": -1.0, "trunk_var": 2.0, "branch_mean": 1.5, "branch_var": 1.0,
     "correlation": -0.6},
]


def _moments(pair: dict[str, float]) -> tuple[float, float, float, float]:
    """Noise-off variance, branch variance, branch mean and total mean of a trunk/branch pair."""
    cov = pair.get("correlation", 0.0) * math.sqrt(pair["trunk_var"] * pair["branch_var"])
    total_var = pair["trunk_var"] + pair["branch_var"] + 2 * cov
    return total_var, pair["branch_var"], pair["branch_mean"], pair["trunk_mean"] + pair[
        "branch_mean"
    ]


# ------------------------------------------------------------------- drop path, row mode


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_row_drop_path_formula_and_monte_carlo_agree(p: float, pair: dict[str, float]) -> None:
    result = simulate_drop_path(p, samples=40_000, seed=1, **pair)
    assert result.stderr > 0.0
    assert abs(result.estimate - result.formula) < K * result.stderr, result


def test_row_drop_path_adds_the_branch_second_moment_not_its_variance() -> None:
    s2 = 0.3 / 0.7
    assert drop_path_shift(0.3, 2.0, 1.5) == pytest.approx(2.0 / (2.0 + s2 * 1.5), rel=1e-12)
    # The paper's direct form is the special case x = 0: total variance v, E[f²] = c² + v.
    assert drop_path_shift(0.3, 1.0, 0.25 + 1.0) == pytest.approx(
        variance_shift("bernoulli", 0.5, 1.0, p=0.3), rel=1e-12
    )


def test_huge_but_finite_variances_keep_their_covariance() -> None:
    # trunk_var * branch_var overflows while neither does: the formula must not turn into 0.
    result = simulate_drop_path(0.5, trunk_var=1e300, branch_var=1e300, samples=20_000, seed=7)
    assert result.formula == pytest.approx(2.0 / 3.0, rel=1e-12)
    assert abs(result.estimate - result.formula) < K * result.stderr, result


def test_drop_path_shift_broadcasts_over_channels() -> None:
    shifts = drop_path_shift(0.2, np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 0.0]))
    assert isinstance(shifts, np.ndarray)
    np.testing.assert_allclose(shifts, [1.0 / (1.0 + 0.25), 1.0, 1.0])


@pytest.mark.parametrize(("p", "second"), [(0.0, 3.0), (0.7, 0.0)])
def test_no_drop_or_no_branch_means_no_shift(p: float, second: float) -> None:
    assert drop_path_shift(p, 1.5, second) == 1.0
    assert drop_path_running_stats(p, total_var=1.5, branch_var=second, branch_mean=second).shift \
        == 1.0


# ------------------------------------------------------ drop path, BatchNorm running statistics


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_running_statistics_match_their_closed_form(mode: str) -> None:
    result = simulate_drop_path_running_stats(
        0.3, mode=mode, batch_size=16, steps=400, chains=64, seed=2, **PAIRS[1]
    )
    formula = result.formula
    for name in ("running_mean", "running_var", "running_mean_var", "shift"):
        estimate, stderr = getattr(result, name), getattr(result, f"{name}_stderr")
        assert stderr > 0.0, name
        assert abs(estimate - getattr(formula, name)) < K * stderr, (name, result)


def test_batch_mode_running_variance_misses_the_jump_of_the_batch_mean() -> None:
    pair = PAIRS[2]
    result = simulate_drop_path_running_stats(
        0.4, mode="batch", batch_size=16, steps=400, chains=64, seed=3, **pair
    )
    total_var, branch_var, branch_mean, _ = _moments(pair)
    row = drop_path_running_stats(
        0.4, total_var=total_var, branch_var=branch_var, branch_mean=branch_mean, mode="row"
    )
    # The row-mode running variance is s² μ² larger, and the simulation tells them apart.
    assert row.running_var - result.formula.running_var == pytest.approx(
        result.formula.batch_mean_spread, rel=1e-12
    )
    assert row.running_var - result.running_var > 10 * result.running_var_stderr
    assert abs(result.running_var - result.formula.running_var) < K * result.running_var_stderr


@pytest.mark.parametrize("pair", PAIRS)
def test_batch_mode_running_variance_is_the_average_of_the_two_cases(
    pair: dict[str, float],
) -> None:
    p, q = 0.3, 0.7
    cov = pair.get("correlation", 0.0) * math.sqrt(pair["trunk_var"] * pair["branch_var"])
    with_branch = pair["trunk_var"] + 2 * cov / q + pair["branch_var"] / q**2
    expected = q * with_branch + p * pair["trunk_var"]
    total_var, branch_var, branch_mean, total_mean = _moments(pair)
    stats = drop_path_running_stats(
        p, total_var=total_var, branch_var=branch_var, branch_mean=branch_mean,
        total_mean=total_mean, batch_size=8, momentum=0.2,
    )
    assert stats.running_var == pytest.approx(expected, rel=1e-12)
    assert stats.running_mean == total_mean
    assert stats.shift == pytest.approx(total_var / expected, rel=1e-12)
    spread = p / q * branch_mean**2
    assert stats.running_mean_var == pytest.approx(0.2 / 1.8 * (spread + expected / 8), rel=1e-12)


def test_a_zero_mean_branch_shifts_both_modes_alike() -> None:
    shifts = {
        mode: drop_path_running_stats(0.3, total_var=2.0, branch_var=0.7, mode=mode).shift
        for mode in ("row", "batch")
    }
    assert shifts["row"] == shifts["batch"] == pytest.approx(drop_path_shift(0.3, 2.0, 0.7))


# ---------------------------------------------------------------------------- channel dropout


@pytest.mark.parametrize(("mean", "rho"), [(0.0, 0.0), (0.7, 0.5), (-1.0, 0.9)])
def test_channel_dropout_into_batchnorm_has_the_elementwise_shift(mean: float, rho: float) -> None:
    result = simulate_channel_dropout(0.3, mean, 1.0, positions=16, rho=rho, seed=4)
    assert result.formula == variance_shift("bernoulli", mean, 1.0, p=0.3)
    assert abs(result.estimate - result.formula) < K * result.stderr, result


def test_the_clustered_standard_error_matches_the_spread_over_seeds() -> None:
    estimates, stderrs = zip(*(
        (r.estimate, r.stderr)
        for r in (
            simulate_channel_dropout(0.5, 0.5, 1.0, positions=8, rho=0.5, samples=1000, seed=s)
            for s in range(60)
        )
    ))
    spread = float(np.std(estimates, ddof=1))
    # 60 seeds: the spread is known to about ±10%; positions sharing a mask would make a
    # per-element standard error about twice too small.
    assert 0.7 < float(np.mean(stderrs)) / spread < 1.4


RNG = np.random.default_rng(0)
WINDOWS: list[dict[str, Any]] = [
    {"weights": RNG.normal(size=(3, 3, 3)) + 0.3, "mean": [0.5, 1.0, -0.2],
     "var": [1.0, 0.5, 2.0], "rho_within": 0.6, "rho_between": 0.2},
    {"weights": np.abs(RNG.normal(size=(2, 9))), "mean": 0.0, "var": 1.0, "rho_within": 0.9},
    {"weights": RNG.normal(size=(4, 5)), "mean": 1.0, "var": 1.0, "rho_within": -0.1,
     "rho_between": -0.03},
]


@pytest.mark.parametrize("window", WINDOWS)
def test_channel_dropout_through_conv_formula_and_monte_carlo_agree(
    window: dict[str, Any],
) -> None:
    result = simulate_channel_dropout_through_conv(0.3, samples=40_000, seed=5, **window)
    assert abs(result.estimate - result.formula) < K * result.stderr, result


def test_channel_masks_through_a_conv_shift_more_than_elementwise_ones() -> None:
    window = WINDOWS[1]  # positive taps on strongly correlated positions
    parts = channel_dropout_shift_through_conv(0.3, **window)
    result = simulate_channel_dropout_through_conv(0.3, samples=40_000, seed=6, **window)
    assert parts.shift < parts.elementwise_shift
    assert result.estimate + 10 * result.stderr < parts.elementwise_shift


def test_elementwise_numbers_are_the_linear_form_when_all_inputs_are_alike() -> None:
    weights = np.random.default_rng(1).normal(size=(3, 4))
    parts = channel_dropout_shift_through_conv(0.2, weights, 0.4, 1.5, 0.3, 0.3)
    cos2 = float(cos_squared(torch.from_numpy(weights.reshape(1, -1)))[0])
    expected = variance_shift("bernoulli", 0.4, 1.5, width=12, cos2=cos2, rho=0.3, p=0.2)
    assert parts.elementwise_shift == pytest.approx(expected, rel=1e-10)


def test_one_tap_makes_channel_and_element_masks_alike() -> None:
    weights = np.random.default_rng(2).normal(size=(5, 1, 1))
    parts = channel_dropout_shift_through_conv(0.4, weights, [0, 1, 2, 3, 4], 2.0, 0.0, 0.1)
    assert parts.shift == pytest.approx(parts.elementwise_shift, rel=1e-12)
    assert parts.shift < 1.0


def test_no_drop_means_no_shift_for_channel_masks() -> None:
    parts = channel_dropout_shift_through_conv(0.0, np.ones((2, 3)), 1.0, 1.0, 0.5)
    assert parts.shift == parts.elementwise_shift == 1.0


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: drop_path_shift(1.0, 1.0, 1.0), ValueError, "p must be finite and in [0, 1)"),
        (lambda: drop_path_shift(0.1, -1.0, 1.0), ValueError, "total_var must be"),
        (lambda: drop_path_shift(0.1, 1.0, True), TypeError, "branch_second_moment must be"),
        (lambda: drop_path_shift("0.1", 1.0, 1.0), TypeError, "p must be a real number"),
        (lambda: drop_path_shift(0.9, 1e308, 1e308), ValueError, "within float64"),
        (lambda: drop_path_running_stats(0.1, total_var=1.0, branch_var=1.0, mode="rows"),
         ValueError, "mode must be 'row' or 'batch', got 'rows'"),
        (lambda: drop_path_running_stats(0.1, total_var=1.0, branch_var=1.0, momentum=0.0),
         ValueError, "momentum must be finite and in (0, 1]"),
        (lambda: drop_path_running_stats(0.1, total_var=1.0, branch_var=1.0, batch_size=1),
         ValueError, "batch_size must be an integer in [2, inf], got 1"),
        (lambda: simulate_drop_path(0.1, correlation=1.5), ValueError, "correlation must be"),
        (lambda: simulate_drop_path(0.1, trunk_var=0.0), ValueError, "trunk_var must be"),
        (lambda: simulate_drop_path(0.1, samples=5.0), TypeError, "samples must be an integer"),
        (lambda: simulate_drop_path_running_stats(0.1, chains=1), ValueError, "chains must be"),
        (lambda: simulate_drop_path(0.5, branch_mean=1e200), ValueError, "within float64"),
        (lambda: drop_path_running_stats(0.5, total_var=1.0, branch_var=1.0, branch_mean=1e200),
         ValueError, "within float64"),
        (lambda: simulate_drop_path_running_stats(0.5, trunk_var=1e300, branch_var=1e300,
                                                  steps=10, chains=2),
         ValueError, "the moments must keep the simulated values and their squares within"),
        (lambda: channel_dropout_shift_through_conv(0.5, [[1e200, 1e200]], 1e200, 1.0, 0.5),
         ValueError, "within float64"),
        (lambda: channel_dropout_shift_through_conv(0.1, [1.0, 2.0], 0.0, 1.0, 0.0),
         ValueError, "weights must have shape (C_in, k...)"),
        (lambda: channel_dropout_shift_through_conv(0.1, np.ones((2, 3)), [0.0] * 3, 1.0, 0.0),
         ValueError, "mean must be a number or one entry per input channel, shape (2,)"),
        (lambda: channel_dropout_shift_through_conv(0.1, np.ones((2, 3)), 0.0, 1.0, -0.6),
         ValueError, "rho_within must be finite and in [-0.5, 1]"),
        (lambda: channel_dropout_shift_through_conv(0.1, np.ones((2, 3)), 0.0, 1.0, 0.0, 0.5),
         ValueError, "rho_between must be finite and in [-0.333333, 0.333333]"),
        (lambda: simulate_channel_dropout(0.1, 0.0, 1.0, positions=0), ValueError,
         "positions must be an integer in [1, inf], got 0"),
    ],
)
def test_bad_arguments_fail_in_one_line(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        call()
    text = str(info.value)
    assert message in text
    assert "\n" not in text
