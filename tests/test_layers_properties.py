"""Properties of every public noise layer and functional, for any argument (hypothesis):
either construction raises a clear ``ValueError``/``TypeError``, or the layer works — finite
output for finite input, same shape and dtype, the identity in eval (``q·x`` for
``ClassicDropout``), and for large inputs the training noise has the mean and variance its
docstring promises. Examples are derandomized and few, so the file runs in seconds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from helpers.strategies import mostly
from varshift.layers import (
    ClassicDropout,
    DropBlock2d,
    DropConnectConv2d,
    DropConnectLinear,
    GaussianDropout,
    Uout,
    VarianceStableDropout,
    functional,
)

K = 5.0  # standard errors allowed for one statistic
FEW = settings(deadline=None, max_examples=25, derandomize=True)
STATISTICS = settings(deadline=None, max_examples=8, derandomize=True)

# Anything a caller might pass as a rate: numbers in and out of range, non-finite ones, huge
# integers, and things that are not numbers at all.
ANYTHING = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-3, max_value=3),
    st.just(10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.builds(torch.tensor, st.floats(0.0, 1.0)),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3).map(torch.tensor),
)
ANY_RATE = mostly(st.floats(0.0, 1.0), ANYTHING)
ANY_SIZE = mostly(
    st.integers(1, 9), st.one_of(st.integers(-2, 0), st.floats(0.0, 9.0), st.booleans())
)


def _constructed(build: Callable[[], nn.Module]) -> nn.Module | None:
    """The layer, or ``None`` when construction refused its arguments with a clear error."""
    try:
        layer = build()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert " must be " in message, message
        assert ", got " in message, message
        assert "\n" not in message, message
        event("refused")
        return None
    event("constructed")
    return layer


def _check_works(layer: nn.Module, x: Tensor, *, eval_scale: float | None = None) -> None:
    """Finite, shape- and dtype-preserving output in training; in eval the input itself, or
    ``eval_scale · x`` when given (``ClassicDropout``)."""
    out = layer.train()(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    evaluated = layer.eval()(x)
    if eval_scale is None:
        assert evaluated is x
    else:
        torch.testing.assert_close(evaluated, x * eval_scale)


def _finite_input(scale: float, offset: float) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 6, 6, generator=generator) * scale + offset


INPUT = st.tuples(st.floats(1e-3, 1e3), st.floats(-1e3, 1e3))


@FEW
@given(p=ANY_RATE, moments=INPUT)
def test_gaussian_dropout_refuses_or_works(p: Any, moments: tuple[float, float]) -> None:
    layer = _constructed(lambda: GaussianDropout(p))
    if layer is not None:
        _check_works(layer, _finite_input(*moments))


@FEW
@given(beta=ANY_RATE, moments=INPUT)
def test_uout_refuses_or_works(beta: Any, moments: tuple[float, float]) -> None:
    layer = _constructed(lambda: Uout(beta))
    if layer is not None:
        _check_works(layer, _finite_input(*moments))


@FEW
@given(p=ANY_RATE, moments=INPUT)
def test_classic_dropout_refuses_or_works(p: Any, moments: tuple[float, float]) -> None:
    layer = _constructed(lambda: ClassicDropout(p))
    if layer is not None:
        _check_works(layer, _finite_input(*moments), eval_scale=1.0 - float(p))


@FEW
@given(p=ANY_RATE, eps=ANY_RATE, moments=INPUT)
def test_variance_stable_dropout_refuses_or_works(
    p: Any, eps: Any, moments: tuple[float, float]
) -> None:
    layer = _constructed(lambda: VarianceStableDropout(p, eps))
    if layer is not None:
        _check_works(layer, _finite_input(*moments))


@FEW
@given(p=ANY_RATE, block_size=ANY_SIZE, shared=st.booleans(), moments=INPUT)
def test_drop_block_refuses_or_works(
    p: Any, block_size: Any, shared: bool, moments: tuple[float, float]
) -> None:
    layer = _constructed(lambda: DropBlock2d(p, block_size, shared_channels=shared))
    if layer is not None:
        _check_works(layer, _finite_input(*moments))


@FEW
@given(p=ANY_RATE, per_sample=st.booleans(), moments=INPUT)
def test_drop_connect_refuses_or_works(
    p: Any, per_sample: bool, moments: tuple[float, float]
) -> None:
    x = _finite_input(*moments)
    for build in (
        lambda: DropConnectLinear(6, 4, p=p, per_sample=per_sample),
        lambda: DropConnectConv2d(3, 4, 3, padding=1, p=p, per_sample=per_sample),
    ):
        layer = _constructed(build)
        if layer is None:
            continue
        out = layer.train()(x)
        assert torch.isfinite(out).all()
        assert out.dtype == x.dtype
        if isinstance(layer, nn.Conv2d):
            plain = layer._conv_forward(x, layer.weight, layer.bias)
        else:
            plain = nn.functional.linear(x, layer.weight, layer.bias)
        assert out.shape == plain.shape
        torch.testing.assert_close(layer.eval()(x), plain)


FUNCTIONALS: dict[str, Callable[[Tensor, Any, bool], Tensor]] = {
    "gaussian_dropout": lambda x, v, t: functional.gaussian_dropout(x, v, t),
    "uout": lambda x, v, t: functional.uout(x, v, t),
    "variance_stable_dropout": lambda x, v, t: functional.variance_stable_dropout(x, v, t),
    "drop_block_2d": lambda x, v, t: functional.drop_block_2d(x, v, 3, t),
}


@pytest.mark.parametrize("name", list(FUNCTIONALS))
@FEW
@given(value=ANY_RATE, moments=INPUT)
def test_functionals_refuse_in_both_modes_or_work(
    name: str, value: Any, moments: tuple[float, float]
) -> None:
    fn, x = FUNCTIONALS[name], _finite_input(*moments)
    try:
        out = fn(x, value, True)
    except (ValueError, TypeError):
        # Refused in training, so refused in eval too: validation comes before the early return.
        with pytest.raises((ValueError, TypeError)):
            fn(x, value, False)
        return
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert fn(x, value, False) is x


# -- statistics of the noise on large inputs ------------------------------------------------

N = 50_000


def _assert_moments(out: Tensor, variance: float, fourth: float, effective_n: float) -> None:
    """Mean within K standard errors of 1 and unbiased variance within K standard errors of
    ``variance``, by the exact ``Var[s²] = μ4/n − σ⁴(n − 3)/(n(n − 1))`` with the noise law's
    fourth central moment ``fourth``, over ``effective_n`` independent samples."""
    sample = out.double().flatten()
    n = effective_n
    assert abs(sample.mean().item() - 1.0) <= K * math.sqrt(variance / n)
    var_stderr = math.sqrt(max(fourth / n - variance**2 * (n - 3) / (n * (n - 1)), 0.0))
    # The float64 floor: a variance of 1e-300 is 0 to rounding.
    assert abs(sample.var().item() - variance) <= K * var_stderr + 1e-15


def _bernoulli_fourth(p: float) -> float:
    """``E[(m − 1)⁴]`` of ``m = b/q``, ``b ~ Bernoulli(q)``: ``(p/q)⁴`` w.p. ``q``, 1 w.p. ``p``."""
    q = 1.0 - p
    return q * (p / q) ** 4 + p


@STATISTICS
@given(p=st.floats(0.0, 0.9))
def test_inverted_noise_has_unit_mean_and_its_variance(p: float) -> None:
    torch.manual_seed(0)
    ones = torch.ones(N, dtype=torch.float64)
    sigma2 = p / (1.0 - p)
    _assert_moments(functional.gaussian_dropout(ones, p), sigma2, 3 * sigma2**2, N)
    classic = functional.classic_dropout(ones, p) / (1.0 - p)
    _assert_moments(classic, sigma2, _bernoulli_fourth(p), N)
    # One weight per output: each output is one DropConnect multiplier.
    weight = torch.ones(N, 1, dtype=torch.float64)
    connected = functional.drop_connect_linear(ones[:1, None], weight, None, p)
    _assert_moments(connected, sigma2, _bernoulli_fourth(p), N)


@STATISTICS
@given(beta=st.floats(0.0, 1.0))
def test_uout_noise_has_unit_mean_and_variance_beta_squared_over_three(beta: float) -> None:
    torch.manual_seed(0)
    out = functional.uout(torch.ones(N, dtype=torch.float64), beta)
    _assert_moments(out, beta**2 / 3, beta**4 / 5, N)


@STATISTICS
@given(p=st.floats(0.0, 0.8), block_size=st.integers(1, 4))
def test_drop_block_noise_has_unit_mean_and_dropout_variance(p: float, block_size: int) -> None:
    torch.manual_seed(0)
    ones = torch.ones(12, 4, 32, 32, dtype=torch.float64)
    out = functional.drop_block_2d(ones, p, block_size)
    # Units within a block are dropped together: about block_size² of them move as one.
    effective_n = ones.numel() / (2 * block_size - 1) ** 2
    _assert_moments(out, p / (1.0 - p), _bernoulli_fourth(p), effective_n)


@STATISTICS
@given(p=st.floats(0.0, 0.9), moments=st.tuples(st.floats(0.1, 10.0), st.floats(-10.0, 10.0)))
def test_variance_stable_dropout_keeps_every_features_batch_moments(
    p: float, moments: tuple[float, float]
) -> None:
    torch.manual_seed(0)
    scale, offset = moments
    x = torch.randn(4096, 8, dtype=torch.float64) * scale + offset
    out = functional.variance_stable_dropout(x, p, eps=1e-8)
    torch.testing.assert_close(out.mean(0), x.mean(0), atol=1e-9 * (1 + abs(offset)), rtol=0)
    # var(y) = (v_x + ε)·v_z / (v_z + ε): v_x up to O(ε).
    torch.testing.assert_close(
        out.var(0, correction=0), x.var(0, correction=0), atol=1e-6, rtol=1e-6
    )
