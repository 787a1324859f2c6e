"""Monte Carlo against the formula, and the honesty of the Monte Carlo standard error.

Agreement is judged in standard errors computed from each simulation; the standard error itself
is checked against the spread of estimates over independent seeds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from varshift.theory import MonteCarloEstimate, montecarlo, simulate_shift, variance_ratio
from varshift.theory.draws import aligned_weights, correlated_inputs, cos_squared
from varshift.theory.noise import register_noise_kind

K = 4.0  # standard errors allowed for one statistic

NOISES = [
    ("bernoulli", {"p": 0.3}),
    ("bernoulli", {"p": 0.7}),
    ("gaussian", {"p": 0.5}),
    ("uout", {"beta": 0.5}),
    ("uout", {"beta": 1.0}),
]
UNITS: list[dict[str, Any]] = [
    {"mean": 0.0, "var": 1.0},
    {"mean": 1.5, "var": 0.5},
    {"mean": 0.5, "var": 2.0, "width": 16, "cos2": 0.3, "rho": 0.4},
    {"mean": -1.0, "var": 1.0, "width": 8, "rho": 0.2},  # Gaussian weights, cos2 as drawn
    {"mean": 0.3, "var": 1.0, "width": 16, "cos2": 0.9, "rho": -0.05},
]


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize(("kind", "params"), NOISES)
def test_formula_and_monte_carlo_agree(
    kind: str, params: dict[str, Any], unit: dict[str, Any]
) -> None:
    result = simulate_shift(kind, samples=20_000, seed=3, **unit, **params)
    assert result.stderr > 0.0
    assert abs(result.estimate - result.formula) < K * result.stderr, result


@pytest.mark.parametrize(
    ("kind", "params", "unit"),
    [
        ("bernoulli", {"p": 0.5}, {"mean": 0.8, "var": 1.0}),
        ("uout", {"beta": 0.9}, {"mean": 0.3, "var": 2.0, "width": 16, "cos2": 0.3, "rho": 0.4}),
        ("gaussian", {"p": 0.3}, {"mean": 1.0, "var": 1.0, "width": 8, "rho": 0.2}),
    ],
)
def test_the_standard_error_matches_the_spread_over_seeds(
    kind: str, params: dict[str, Any], unit: dict[str, Any]
) -> None:
    seeds = 100
    results = [simulate_shift(kind, samples=2000, seed=s, **unit, **params) for s in range(seeds)]
    errors = np.array([r.estimate - r.formula for r in results])
    mean_stderr = float(np.mean([r.stderr for r in results]))
    # The sample sd of near-normal estimates has relative standard error 1/sqrt(2(K - 1)).
    relative_tolerance = K / math.sqrt(2 * (seeds - 1))
    assert abs(errors.std(ddof=1) / mean_stderr - 1.0) < relative_tolerance
    # And no bias beyond what the spread allows.
    assert abs(errors.mean()) < K * errors.std(ddof=1) / math.sqrt(seeds)


def test_a_seed_reproduces_a_simulation() -> None:
    first = simulate_shift("uout", 0.2, 1.0, width=12, rho=0.3, samples=5000, seed=11, beta=0.6)
    again = simulate_shift("uout", 0.2, 1.0, width=12, rho=0.3, samples=5000, seed=11, beta=0.6)
    other = simulate_shift("uout", 0.2, 1.0, width=12, rho=0.3, samples=5000, seed=12, beta=0.6)
    assert first == again
    assert first.estimate != other.estimate


def test_chunking_does_not_change_the_statistics() -> None:
    # 2**20 // 2048 = 512 rows per chunk: 1200 samples span three chunks, the last one short.
    result = simulate_shift(
        "bernoulli", 0.5, 1.0, width=2048, cos2=0.01, rho=0.1, samples=1200, p=0.2
    )
    assert result.samples == 1200
    assert abs(result.estimate - result.formula) < K * result.stderr


def test_without_noise_the_estimate_is_exactly_one() -> None:
    result = simulate_shift("bernoulli", 0.5, 1.0, width=8, rho=0.2, samples=1000, p=0.0)
    assert (result.estimate, result.stderr, result.formula, result.z) == (1.0, 0.0, 1.0, 0.0)


def test_the_parts_are_reported_per_unit_of_weight_norm() -> None:
    result = simulate_shift(
        "bernoulli", 0.5, 2.0, width=32, cos2=0.25, rho=0.5, samples=40_000, p=0.4
    )
    assert result.cos2 == pytest.approx(0.25, rel=1e-9)
    assert result.noise_variance == pytest.approx(0.4 / 0.6)
    expected_test = 2.0 + 2.0 * 0.5 * (32 * 0.25 - 1)
    # Test variance of a sum of Gaussians: relative standard error sqrt(2/N).
    assert abs(result.test_var / expected_test - 1.0) < K * math.sqrt(2 / result.samples)
    assert result.estimate == pytest.approx(result.test_var / result.train_var, rel=1e-9)


def test_direct_form_reports_no_cos2() -> None:
    result = simulate_shift("gaussian", 0.0, 1.0, samples=1000, p=0.5)
    assert result.cos2 is None
    assert result.method == "delta method"


def test_z_score_handles_a_zero_standard_error() -> None:
    def estimate(value: float, stderr: float) -> MonteCarloEstimate:
        return MonteCarloEstimate(value, stderr, 0.5, 10, 1.0, 0.5, 1.0)

    assert estimate(0.6, 0.05).z == pytest.approx(2.0)
    assert estimate(0.5, 0.0).z == 0.0
    assert estimate(0.4, 0.0).z == -math.inf


def test_variance_ratio_of_independent_samples() -> None:
    generator = torch.Generator().manual_seed(5)
    n = 50_000
    test = 2.0 * torch.randn(n, generator=generator, dtype=torch.float64)
    train = 3.0 * torch.randn(n, generator=generator, dtype=torch.float64)
    ratio, stderr = variance_ratio(test, train)
    assert ratio == pytest.approx(float(test.var()) / float(train.var()), rel=1e-9)
    # Independent Gaussian variances: Var(R) ≈ R² (2/N + 2/N).
    assert stderr == pytest.approx((4 / 9) * math.sqrt(4 / n), rel=0.05)
    assert abs(ratio - 4 / 9) < K * stderr


@pytest.mark.parametrize("rho", [-0.1, 0.0, 0.6, 1.0])
def test_correlated_inputs_have_the_requested_moments(rho: float) -> None:
    n, d = 50_000, 10
    generator = torch.Generator().manual_seed(0)
    x = correlated_inputs(n, d, mean=1.5, var=2.0, rho=rho, generator=generator)
    covariance = torch.cov(x.T)
    # Sample covariance of Gaussians: se(Cov_ij) = sqrt((Σ_ii Σ_jj + Σ_ij²) / N) ≤ sqrt(2/N)·2.
    tolerance = K * 2.0 * math.sqrt(2 / n)
    assert abs(float(x.mean()) - 1.5) < K * math.sqrt(2.0 * (1 + (d - 1) * rho) / (n * d)) + 1e-12
    variances = covariance.diagonal()
    assert torch.allclose(variances, torch.full_like(variances, 2.0), atol=tolerance)
    off_diagonal = covariance[~torch.eye(d, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, 2.0 * rho), atol=tolerance)


@pytest.mark.parametrize(("width", "cos2"), [(1, 1.0), (2, 0.0), (16, 0.3), (64, 1.0)])
def test_aligned_weights_have_the_requested_angle(width: int, cos2: float) -> None:
    w = aligned_weights(5, width, cos2=cos2, generator=torch.Generator().manual_seed(0))
    assert w.shape == (5, width)
    assert torch.allclose(cos_squared(w), torch.full((5,), cos2, dtype=w.dtype), atol=1e-12)
    assert len({tuple(row.tolist()) for row in w}) == (1 if width == 1 or cos2 == 1.0 else 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 5}, r"samples must be an integer in \[10, inf\], got 5"),
        ({"seed": -1}, r"seed must be an integer in \[0, inf\], got -1"),
        ({"rho": 0.3}, r"cos2 and rho .* need width"),
        ({"cos2": 0.3}, r"cos2 and rho .* need width"),
        ({"width": 4, "rho": -0.5}, r"rho must be finite and in \[-0.333333, 1\]"),
        ({"width": 4, "cos2": -0.1}, r"cos2 must be finite and in \[0, 1\]"),
        ({"width": 1, "cos2": 0.5}, r"cos2 must be 1 when width is 1"),
        ({"var": 0.0}, r"var must be finite and in \(0, inf\)"),
        ({"p": 1.0}, r"p must be finite and in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"mean": 0.0, "var": 1.0, "p": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        simulate_shift("bernoulli", **arguments)


@pytest.mark.usefixtures("noise_registry")
def test_a_kind_without_sampler_cannot_be_simulated() -> None:
    register_noise_kind("formula_only", lambda p: p)
    with pytest.raises(ValueError, match=r"without a sampler"):
        simulate_shift("formula_only", 0.0, 1.0, samples=100, p=0.5)


@pytest.mark.parametrize(("samples", "seed"), [(1e5, 0), (100, 1.0), (True, 0)])
def test_counts_that_are_not_integers_raise_type_error(samples: object, seed: object) -> None:
    with pytest.raises(TypeError, match=r"(samples|seed) must be an integer, got"):
        simulate_shift("bernoulli", 0.0, 1.0, samples=samples, seed=seed, p=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": 1e200},  # the old code printed "nan ± nan"
        {"mean": 0.0, "var": 1e308},
        {"mean": 0.0, "var": 1e307, "width": 8, "cos2": 0.5, "rho": 0.5},
    ],
)
def test_moments_that_overflow_float64_are_refused_without_a_warning(
    kwargs: dict[str, Any],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"mean and var must keep"):
            simulate_shift("bernoulli", samples=100, p=0.5, **{"var": 1.0, **kwargs})


def test_a_simulation_beyond_the_memory_limit_is_refused_before_drawing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The old code tried to allocate 10^13 samples.
    with pytest.raises(ValueError, match=r"at most 4 GiB .*MAX_SIMULATION_BYTES.*pass at most"):
        simulate_shift("bernoulli", 0.0, 1.0, samples=10**13, p=0.5)
    # The limit is read at every call: lowering it refuses what fitted before, and the count
    # the message offers does fit.
    monkeypatch.setattr(montecarlo, "MAX_SIMULATION_BYTES", 64_000)
    with pytest.raises(ValueError, match=r"pass at most 999 samples") as refused:
        simulate_shift("bernoulli", 0.0, 1.0, samples=1000, p=0.5)
    assert "samples=1000" in str(refused.value)
    assert simulate_shift("bernoulli", 0.0, 1.0, samples=999, p=0.5).samples == 999
