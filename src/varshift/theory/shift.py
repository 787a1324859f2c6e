"""The variance shift in closed form (Li et al., CVPR 2019, arXiv 1801.05134).

A unit ``x`` with mean ``c`` and variance ``v`` goes through multiplicative noise ``m``
(``E[m] = 1``, ``Var[m] = σ²``, independent of ``x``). In training its variance is
``E[m²] E[x²] − c² = v + σ² (c² + v)``; at test time, with the noise off, it is ``v``. A
BatchNorm fed by it learns the training variance as its running variance and then sees the test
variance, off by the factor ``Δ = Var_test / Var_train ≤ 1``, the *variance shift*.

When the noise feeds a linear (or convolutional) unit ``y = Σᵢ wᵢ mᵢ xᵢ`` of fan-in ``d`` before
the BatchNorm, with the same ``c`` and ``v`` for every input, correlation ``ρ`` between any two
inputs and ``cos²θ = (Σw)² / (d Σw²)`` (the angle between ``w`` and the all-ones vector), the
cross terms ``wᵢ wⱼ Cov(xᵢ, xⱼ)`` are the same in both modes because the noises are independent:

    ``Var_train / Σw² = v + σ²(c² + v) + vρ(d cos²θ − 1)``
    ``Var_test  / Σw² = v + vρ(d cos²θ − 1)``

The shared term grows about linearly with ``d`` when ``ρ > 0`` and ``cos²θ`` stays put, which
drives ``Δ`` towards 1 in wide layers. All variances are population variances (a ratio of two
variances of the same unit needs no Bessel correction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from varshift.theory.checks import Interval, check_int, check_real, check_reals, is_close_to
from varshift.theory.noise import noise_variance

__all__ = [
    "ShiftParts",
    "check_correlation",
    "check_cos2",
    "check_unit",
    "check_width",
    "shift_parts",
    "variance_shift",
]

FloatArray = npt.NDArray[np.float64]

VARIANCE = Interval(0.0, low_open=True, why="a variance")


@dataclass(frozen=True, eq=False)
class ShiftParts:
    """The variance shift and the variances it is the ratio of.

    Each of ``train_var``, ``test_var`` and ``shift`` is a float when every moment passed was a
    number, else an array of the broadcast shape (e.g. one entry per channel ``C``). With a
    fan-in (``width``), the two variances are those of the linear unit's output divided by
    ``Σw²``; their ratio does not depend on the scale of ``w``.

    Attributes:
        noise_variance: ``σ² = Var[m]`` of the multiplicative noise.
        train_var: ``v + σ²(c² + v) [+ vρ(d cos²θ − 1)]``, the variance BN learns in training.
        test_var: ``v [+ vρ(d cos²θ − 1)]``, the variance BN sees at test time.
        shift: ``Δ = test_var / train_var`` in ``[0, 1]``; exactly 1 when ``σ² = 0``.
    """

    noise_variance: float
    train_var: float | FloatArray
    test_var: float | FloatArray
    shift: float | FloatArray


def check_width(width: Any) -> int:
    """The fan-in ``d`` as an int ``≥ 1``."""
    return check_int("width", width, low=1)


def check_cos2(cos2: Any, width: int) -> FloatArray:
    """``cos²θ`` in ``[0, 1]``; exactly 1 when ``width == 1`` (one weight is parallel to 1)."""
    values = check_reals("cos2", cos2, Interval(0.0, 1.0, why="a squared cosine"))
    if width == 1 and not all(is_close_to(float(value), 1.0) for value in values.flat):
        raise ValueError(
            f"cos2 must be 1 when width is 1 (a single weight is parallel to the all-ones "
            f"vector), got {cos2!r}"
        )
    return values


def check_correlation(rho: Any, width: int) -> FloatArray:
    """``ρ`` in ``[−1/(d − 1), 1]``: ``d`` inputs with equal pairwise correlation ``ρ`` have a
    positive semi-definite covariance only there (any ``ρ`` in ``[−1, 1]`` for ``d = 1``)."""
    low = -1.0 if width == 1 else max(-1.0, -1.0 / (width - 1))
    why = f"the correlation between inputs; the lower end is -1/(width - 1) for width={width}"
    return check_reals("rho", rho, Interval(low, 1.0, why=why))


def check_unit(width: Any, cos2: Any, rho: Any) -> tuple[int, float | None, float]:
    """Width, ``cos²θ`` (``None`` allowed: random weights) and ``ρ`` of one simulated linear
    unit, as plain numbers."""
    d = check_width(width)
    correlation = float(check_correlation(check_real("rho", rho), d))
    angle = None if cos2 is None else float(check_cos2(check_real("cos2", cos2), d))
    return d, angle, correlation


def _shift_parts(
    sigma2: float,
    mean: Any,
    var: Any,
    width: int | None,
    cos2: Any,
    rho: Any,
) -> ShiftParts:
    """The formula itself, for a known ``σ²``; see :func:`shift_parts` for the arguments."""
    c = check_reals("mean", mean)
    v = check_reals("var", var, VARIANCE)
    if width is None:
        if cos2 is not None or rho is not None:
            raise ValueError(
                "cos2 and rho describe the linear unit after the noise and need width (its "
                f"fan-in), got width=None, cos2={cos2!r}, rho={rho!r}"
            )
        shared: FloatArray = np.zeros(())
        scalar = c.ndim == 0 and v.ndim == 0
    else:
        d = check_width(width)
        if cos2 is None or rho is None:
            raise ValueError(
                f"width={d} needs both cos2 and rho (use cos2=1/width for random weights, "
                f"rho=0 for independent inputs), got cos2={cos2!r}, rho={rho!r}"
            )
        cos2_values = check_cos2(cos2, d)
        rho_values = check_correlation(rho, d)
        with np.errstate(over="ignore", invalid="ignore"):
            # The covariance between inputs survives the noise unchanged: it adds to both modes.
            shared = v * rho_values * (d * cos2_values - 1.0)
        scalar = all(a.ndim == 0 for a in (c, v, cos2_values, rho_values))
    # Overflow is checked once, on the results, instead of letting numpy warn on the way.
    with np.errstate(over="ignore", invalid="ignore"):
        # Rounding at the edge of the valid correlation range may leave a tiny negative variance.
        test = np.maximum(v + shared, 0.0)
        train = test + sigma2 * (c * c + v)
    _refuse_overflow(train, c, v)
    # train ≥ test, so the ratio is in [0, 1]. train = 0 only when both modes have no variance
    # at all (no noise, or a noise variance so small that it underflows): then there is no
    # shift either.
    shift = np.divide(test, train, out=np.ones_like(train), where=train > 0.0)
    if scalar:
        return ShiftParts(sigma2, float(train), float(test), float(shift))
    return ShiftParts(sigma2, np.asarray(train), np.asarray(test), np.asarray(shift))


def _refuse_overflow(train: FloatArray, mean: FloatArray, var: FloatArray) -> None:
    """``ValueError`` when the training variance ``v + σ²(c² + v) [+ shared]`` is beyond float64
    (``c²`` overflows from ``|c| ≈ 1.3e154`` on), instead of a silent ``Δ = 0`` or NaN; the
    message quotes the moments of the first unit that overflows."""
    overflow = ~np.isfinite(train)
    if not overflow.any():
        return
    index = tuple(int(i) for i in np.argwhere(overflow)[0])
    c, v = (float(np.broadcast_to(a, train.shape)[index]) for a in (mean, var))
    where = f" at index {index}" if index else ""
    raise ValueError(
        "mean and var must keep the training variance v + sigma^2 (c^2 + v) within float64 "
        f"(about 1.8e308; c^2 overflows from |c| = 1.3e154 on), got mean={c!r}, var={v!r}{where}"
    )


def shift_parts(
    kind: str,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    *,
    width: int | None = None,
    cos2: npt.ArrayLike | None = None,
    rho: npt.ArrayLike | None = None,
    **params: Any,
) -> ShiftParts:
    """The variance shift of one noise kind and its parts (Li et al. 2019, Eqs. for Δ).

    Direct form (``width=None``): the noise output itself goes into BN,
    ``Δ = v / (v + σ²(c² + v))``. Linear form (``width=d``): the noise feeds a linear/conv unit
    of fan-in ``d`` with weights at angle ``θ`` to the all-ones vector and inputs with pairwise
    correlation ``ρ``,
    ``Δ = (v + vρ(d cos²θ − 1)) / (v + σ²(c² + v) + vρ(d cos²θ − 1))``.

    Args:
        kind: noise kind (see :func:`~varshift.theory.noise_kinds`).
        mean: ``c``, the mean of each input unit: a number or an array (e.g. ``(C,)`` channels).
        var: ``v > 0``, the population (biased) variance of each input unit; broadcasts with
            ``mean``.
        width: fan-in ``d ≥ 1`` of the linear unit after the noise, or ``None`` (direct form).
        cos2: ``cos²θ = (Σw)² / (d Σw²)`` in ``[0, 1]``; required with ``width`` (``1/d`` is its
            mean for random zero-mean weights), refused without it.
        rho: correlation ``ρ`` between inputs in ``[−1/(d − 1), 1]``; required with ``width``
            (``0`` for independent inputs), refused without it.
        **params: the noise kind's parameters (``p`` or ``beta``).

    Returns:
        :class:`ShiftParts`; floats when all of ``mean``, ``var``, ``cos2``, ``rho`` are numbers,
        arrays of their broadcast shape otherwise.

    Raises:
        ValueError: bad kind or parameters, non-finite moments, ``var ≤ 0``, ``width`` without
            ``cos2``/``rho`` (or the converse), values out of range, moments so large that the
            training variance overflows float64.
        TypeError: an argument that is not a (real) number: a string, a bool, ``None`` where a
            number is required.
    """
    sigma2 = noise_variance(kind, **params)
    return _shift_parts(sigma2, mean, var, width, cos2, rho)


@overload
def variance_shift(
    kind: str,
    mean: float,
    var: float,
    *,
    width: int | None = None,
    cos2: float | None = None,
    rho: float | None = None,
    **params: Any,
) -> float: ...


@overload
def variance_shift(
    kind: str, mean: npt.ArrayLike, var: npt.ArrayLike, **kwargs: Any
) -> float | FloatArray: ...


def variance_shift(kind: str, mean: Any, var: Any, **kwargs: Any) -> float | FloatArray:
    """``Δ = Var_test / Var_train`` at a BatchNorm after multiplicative noise (Li et al. 2019).

    The same arguments as :func:`shift_parts`, which also returns the two variances. Special
    cases: Bernoulli dropout gives ``v / ((c² + v)/q − c²)`` with ``q = 1 − p`` (``q`` for
    ``c = 0``); Uout with ``c = 0`` gives ``3 / (3 + β²)``; no noise gives exactly 1.

    >>> round(variance_shift("bernoulli", 0.0, 1.0, p=0.5), 6)
    0.5
    >>> round(variance_shift("uout", 0.0, 1.0, beta=0.1), 4)
    0.9967
    """
    return shift_parts(kind, mean, var, **kwargs).shift
