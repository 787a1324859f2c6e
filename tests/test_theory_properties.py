"""Properties of the theory functions for any argument (hypothesis): either a clear
``ValueError``/``TypeError`` (one line, ``<name> must be ..., got ...`` for a single argument),
or a finite result, the shift in ``[0, 1]``; no ``RuntimeWarning`` escapes on the way (warnings
are errors here). Examples are derandomized and few, so the file runs in seconds."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers.strategies import mostly
from varshift.theory import noise_variance, shift_parts, simulate_depth, simulate_shift

FEW = settings(deadline=None, max_examples=60, derandomize=True)
SIMULATIONS = settings(deadline=None, max_examples=25, derandomize=True)



ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e3, 1e3),
    st.sampled_from([0.0, 1e-320, 1e154, 1e200, -1e308, 10**400]),
    st.integers(-5, 5),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
)
ANY_VARIANCE = st.one_of(ANY_NUMBER, st.floats(1e-300, 1e300))
ANY_RATE = st.one_of(ANY_NUMBER, st.floats(0.0, 1.0))
ANY_WIDTH = st.one_of(st.none(), st.integers(-1, 10**6), st.floats(1.0, 8.0), st.booleans())
KIND_AND_PARAMETER = st.sampled_from([("bernoulli", "p"), ("gaussian", "p"), ("uout", "beta")])


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _result_or_clear_error(fn: Callable[[], Any]) -> Any | None:
    """``fn()``, or ``None`` when it refused its arguments with a one-line ValueError or
    TypeError (a RuntimeWarning turned error would fail the test here)."""
    try:
        return fn()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert "\n" not in message, message
        assert " must " in message or "needs" in message or "need width" in message, message
        return None


@FEW
@given(kind=KIND_AND_PARAMETER, value=ANY_RATE)
def test_noise_variance_is_finite_and_non_negative_or_refused(
    kind: tuple[str, str], value: Any
) -> None:
    sigma2 = _result_or_clear_error(lambda: noise_variance(kind[0], **{kind[1]: value}))
    if sigma2 is not None:
        assert math.isfinite(sigma2)
        assert sigma2 >= 0.0


@FEW
@given(
    kind=KIND_AND_PARAMETER,
    rate=mostly(st.floats(0.0, 1.0), ANY_RATE),
    mean=mostly(st.floats(-1e200, 1e200), ANY_NUMBER),
    var=mostly(st.floats(1e-300, 1e300), ANY_VARIANCE),
)
def test_direct_shift_is_in_the_unit_interval_or_refused(
    kind: tuple[str, str], rate: Any, mean: Any, var: Any
) -> None:
    parts = _result_or_clear_error(lambda: shift_parts(kind[0], mean, var, **{kind[1]: rate}))
    event("computed" if parts is not None else "refused")
    if parts is not None:
        assert 0.0 <= parts.shift <= 1.0
        assert math.isfinite(parts.train_var)
        assert math.isfinite(parts.test_var)


@FEW
@given(
    kind=KIND_AND_PARAMETER,
    rate=st.floats(0.0, 0.99),
    mean=mostly(st.floats(-1e200, 1e200), ANY_NUMBER),
    var=mostly(st.floats(1e-300, 1e300), ANY_VARIANCE),
    width=mostly(st.integers(2, 10**6), ANY_WIDTH),
    cos2=mostly(st.floats(0.0, 1.0), st.one_of(st.none(), ANY_RATE)),
    rho=mostly(st.floats(-1e-6, 1.0), st.one_of(st.none(), st.floats(-1.0, 1.0), ANY_NUMBER)),
)
def test_linear_shift_is_in_the_unit_interval_or_refused(
    kind: tuple[str, str], rate: float, mean: Any, var: Any, width: Any, cos2: Any, rho: Any
) -> None:
    parts = _result_or_clear_error(
        lambda: shift_parts(kind[0], mean, var, width=width, cos2=cos2, rho=rho, **{kind[1]: rate})
    )
    event("computed" if parts is not None else "refused")
    if parts is not None:
        assert 0.0 <= parts.shift <= 1.0


@FEW
@given(
    means=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
    var=st.floats(1e-300, 1e300),
)
def test_per_channel_shifts_are_in_the_unit_interval_or_refused(
    means: list[float], var: float
) -> None:
    shift = _result_or_clear_error(lambda: shift_parts("bernoulli", np.array(means), var, p=0.5))
    if shift is not None:
        assert np.all((shift.shift >= 0.0) & (shift.shift <= 1.0))


@SIMULATIONS
@given(
    kind=KIND_AND_PARAMETER,
    rate=mostly(st.floats(0.0, 0.9), ANY_RATE),
    mean=mostly(st.floats(-1e3, 1e3), ANY_NUMBER),
    var=mostly(st.floats(1e-6, 1e6), ANY_VARIANCE),
    width=st.one_of(st.none(), st.integers(1, 16)),
    samples=mostly(st.integers(10, 300), st.sampled_from([-1, 9, 10**13, 50.0])),
)
def test_simulated_shift_is_finite_or_refused(
    kind: tuple[str, str], rate: Any, mean: Any, var: Any, width: Any, samples: Any
) -> None:
    estimate = _result_or_clear_error(
        lambda: simulate_shift(
            kind[0], mean, var, width=width, samples=samples, **{kind[1]: rate}
        )
    )
    event("simulated" if estimate is not None else "refused")
    if estimate is not None:
        assert math.isfinite(estimate.estimate)
        assert estimate.estimate >= 0.0
        assert math.isfinite(estimate.stderr)
        assert 0.0 <= estimate.formula <= 1.0


@SIMULATIONS
@given(
    depth=mostly(st.integers(1, 3), st.sampled_from([0, 2.0])),
    width=mostly(st.integers(2, 8), st.sampled_from([0, 1, 10**6])),
    rate=mostly(st.floats(0.0, 0.9), ANY_RATE),
    rho=mostly(st.floats(0.0, 1.0), ANY_NUMBER),
    cos2=st.one_of(st.none(), st.floats(0.0, 1.0)),
    samples=mostly(st.integers(64, 400), st.integers(0, 63)),
    blocks=mostly(st.integers(2, 4), st.integers(0, 1)),
)
def test_simulated_depth_profile_is_finite_or_refused(
    depth: Any, width: Any, rate: Any, rho: Any, cos2: Any, samples: int, blocks: int
) -> None:
    profile = _result_or_clear_error(
        lambda: simulate_depth(
            depth=depth, width=width, rho=rho, cos2=cos2, samples=samples, blocks=blocks, p=rate
        )
    )
    event("simulated" if profile is not None else "refused")
    if profile is not None:
        for values in (profile.shift, profile.shift_stderr, profile.local, profile.local_stderr):
            assert values.shape == (depth,)
            assert np.isfinite(values).all()
