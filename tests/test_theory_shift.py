"""The closed-form variance shift: the paper's special cases, the linear form, arrays, errors."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import pytest

from varshift.theory import ShiftParts, noise_variance, shift_parts, variance_shift

MOMENTS = [(0.0, 1.0), (0.5, 1.0), (-2.0, 0.3), (3.0, 7.0)]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("var", [0.2, 1.0, 5.0])
def test_uout_with_zero_mean_is_three_over_three_plus_beta_squared(beta: float, var: float) -> None:
    expected = 3 / (3 + beta**2)
    assert variance_shift("uout", 0.0, var, beta=beta) == pytest.approx(expected, rel=1e-12)


def test_uout_matches_the_papers_number() -> None:
    assert round(variance_shift("uout", 0.0, 1.0, beta=0.1), 4) == 0.9967


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bernoulli_with_zero_mean_is_the_keep_ratio(p: float) -> None:
    assert variance_shift("bernoulli", 0.0, 2.5, p=p) == pytest.approx(1.0 - p, rel=1e-12)


@pytest.mark.parametrize(("mean", "var"), MOMENTS)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_bernoulli_matches_the_papers_form(mean: float, var: float, p: float) -> None:
    q = 1.0 - p
    expected = var / ((mean**2 + var) / q - mean**2)
    assert variance_shift("bernoulli", mean, var, p=p) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("mean", "var"), MOMENTS)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_gaussian_equals_bernoulli_at_the_same_p(mean: float, var: float, p: float) -> None:
    assert variance_shift("gaussian", mean, var, p=p) == variance_shift("bernoulli", mean, var, p=p)


@pytest.mark.parametrize(("kind", "params"), [("bernoulli", {"p": 0.0}), ("uout", {"beta": 0.0})])
@pytest.mark.parametrize("unit", [{}, {"width": 64, "cos2": 0.3, "rho": 0.2}])
def test_no_noise_means_no_shift(
    kind: str, params: dict[str, float], unit: dict[str, float]
) -> None:
    assert variance_shift(kind, 1.5, 0.4, **unit, **params) == 1.0


def test_no_noise_is_no_shift_even_when_the_unit_is_constant() -> None:
    # rho = 1 and weights orthogonal to the ones vector: zero variance in both modes.
    assert variance_shift("bernoulli", 1.0, 1.0, width=4, cos2=0.0, rho=1.0, p=0.0) == 1.0
    assert variance_shift("bernoulli", 1.0, 1.0, width=4, cos2=0.0, rho=1.0, p=0.5) == 0.0


@pytest.mark.parametrize(("mean", "var"), MOMENTS)
def test_the_parts_add_up(mean: float, var: float) -> None:
    parts = shift_parts("uout", mean, var, width=16, cos2=0.4, rho=0.3, beta=0.8)
    assert isinstance(parts, ShiftParts)
    sigma2 = noise_variance("uout", beta=0.8)
    assert parts.noise_variance == sigma2
    assert parts.train_var - parts.test_var == pytest.approx(sigma2 * (mean**2 + var))
    assert parts.test_var == pytest.approx(var + var * 0.3 * (16 * 0.4 - 1))
    assert parts.shift == pytest.approx(parts.test_var / parts.train_var, rel=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_the_linear_form_reduces_to_the_direct_one_without_shared_variance(rho: float) -> None:
    direct = variance_shift("bernoulli", 0.7, 1.3, p=0.4)
    # rho = 0: nothing shared; d cos²θ = 1 (here d = 1): the shared term vanishes.
    assert variance_shift("bernoulli", 0.7, 1.3, width=100, cos2=0.37, rho=0.0, p=0.4) == (
        pytest.approx(direct, rel=1e-12)
    )
    assert variance_shift("bernoulli", 0.7, 1.3, width=1, cos2=1.0, rho=rho, p=0.4) == (
        pytest.approx(direct, rel=1e-12)
    )


def test_the_shift_grows_towards_one_with_width_and_falls_with_p() -> None:
    widths = [2, 4, 16, 64, 256, 1024, 4096]
    shifts = [
        variance_shift("bernoulli", 0.5, 1.0, width=d, cos2=0.2, rho=0.4, p=0.5) for d in widths
    ]
    assert all(a < b for a, b in itertools.pairwise(shifts))
    assert 1.0 - shifts[-1] < 0.01 * (1.0 - shifts[0])
    ps = np.linspace(0.0, 0.95, 20)
    by_p = [variance_shift("gaussian", 0.5, 1.0, p=p) for p in ps]
    assert all(a > b for a, b in itertools.pairwise(by_p))


def test_arrays_give_one_shift_per_channel() -> None:
    means = np.array([0.0, 0.5, -1.0, 2.0])
    variances = np.array([1.0, 0.5, 2.0, 0.1])
    shifts = variance_shift("bernoulli", means, variances, p=0.3)
    assert isinstance(shifts, np.ndarray)
    assert shifts.shape == (4,)
    for shift, mean, var in zip(shifts, means, variances):
        assert shift == variance_shift("bernoulli", float(mean), float(var), p=0.3)


def test_arrays_broadcast_with_cos2_and_rho() -> None:
    cos2 = np.array([[0.1], [0.5]])  # (2, 1) against three channels
    shifts = variance_shift("uout", np.zeros(3), np.ones(3), width=8, cos2=cos2, rho=0.2, beta=0.5)
    assert isinstance(shifts, np.ndarray)
    assert shifts.shape == (2, 3)
    assert shifts[1, 0] == variance_shift("uout", 0.0, 1.0, width=8, cos2=0.5, rho=0.2, beta=0.5)


def test_numbers_give_python_floats() -> None:
    assert type(variance_shift("bernoulli", 0, 1, p=0.5)) is float
    parts = shift_parts("bernoulli", np.float64(0.0), 1, p=0.5)
    assert all(type(x) is float for x in (parts.train_var, parts.test_var, parts.shift))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"var": 0.0}, r"var must be finite and in \(0, inf\).*got 0.0"),
        ({"var": -1.0}, r"var must be finite and in \(0, inf\)"),
        ({"mean": math.nan}, r"mean must be finite, got nan"),
        ({"width": 8}, r"width=8 needs both cos2 and rho.*cos2=1/width.*rho=0"),
        ({"width": 8, "cos2": 0.1}, r"width=8 needs both cos2 and rho"),
        ({"cos2": 0.1}, r"cos2 and rho .* need width"),
        ({"rho": 0.1}, r"cos2 and rho .* need width"),
        ({"width": 0, "cos2": 0.1, "rho": 0.0}, r"width must be an integer in \[1, inf\], got 0"),
        ({"width": 8, "cos2": 1.1, "rho": 0.0}, r"cos2 must be finite and in \[0, 1\]"),
        ({"width": 8, "cos2": 0.5, "rho": 1.5}, r"rho must be finite and in \[-0.142857, 1\]"),
        ({"width": 8, "cos2": 0.5, "rho": -0.2}, r"lower end is -1/\(width - 1\).*got -0.2"),
        ({"width": 1, "cos2": 0.5, "rho": 0.0}, r"cos2 must be 1 when width is 1"),
    ],
)
def test_bad_arguments_name_the_argument_range_and_value(
    kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, Any] = {"mean": 0.0, "var": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        variance_shift("bernoulli", p=0.5, **arguments)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": "a"}, r"mean must be a real number or an array of them, got 'a'"),
        ({"mean": True}, r"mean must be a real number or an array of them, got True"),
        ({"var": np.array([True])}, r"var must be a real number or an array of them"),
        ({"width": 2.0, "cos2": 0.1, "rho": 0.0}, r"width must be an integer, got 2.0"),
        ({"width": True, "cos2": 0.1, "rho": 0.0}, r"width must be an integer, got True"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error(
    kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, Any] = {"mean": 0.0, "var": 1.0, **kwargs}
    with pytest.raises(TypeError, match=message):
        variance_shift("bernoulli", p=0.5, **arguments)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": 1e308},  # c² overflows: the old code printed a RuntimeWarning and "shift 0"
        {"mean": 1e200},
        {"mean": 0.0, "var": 1e308},  # v + σ²(c² + v) overflows
        {"mean": 10**400},  # a Python int beyond float64
        {"mean": np.array([0.0, 1e300]), "var": np.array([1.0, 1.0])},
        {"mean": 0.0, "var": 1e308, "width": 4, "cos2": 1.0, "rho": 1.0},
    ],
)
def test_moments_that_overflow_float64_are_refused_without_a_warning(
    kwargs: dict[str, Any],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"(mean|var) must"):
            shift_parts("bernoulli", p=0.5, **{"var": 1.0, **kwargs})


def test_a_noise_variance_that_underflows_leaves_no_shift() -> None:
    # σ²(c² + v) underflows to 0 and ρ = 1, cos²θ = 0 leave no test variance: both modes have
    # none, which is no shift, not 0/0 (the old code returned NaN with a RuntimeWarning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parts = shift_parts("uout", 0.0, 1e-300, width=2, cos2=0.0, rho=1.0, beta=1e-160)
    assert parts.train_var == 0.0
    assert parts.shift == 1.0


def test_the_first_bad_channel_is_quoted_with_its_index() -> None:
    with pytest.raises(ValueError, match=r"var must be .*got -2.0 at index \(2,\)"):
        variance_shift("bernoulli", np.zeros(4), np.array([1.0, 1.0, -2.0, -3.0]), p=0.5)


def test_negative_correlation_is_allowed_down_to_its_limit() -> None:
    shift = variance_shift("bernoulli", 0.0, 1.0, width=5, cos2=1.0, rho=-0.25, p=0.5)
    assert shift == 0.0  # weights along the ones vector cancel the inputs exactly
    assert 0.0 < variance_shift("bernoulli", 0.0, 1.0, width=5, cos2=0.2, rho=-0.25, p=0.5) < 1.0
