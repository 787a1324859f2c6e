"""Monte Carlo check of the variance-shift formula (Li et al., CVPR 2019).

:func:`simulate_shift` draws inputs with the moments the formula assumes, multiplies them by the
noise of one kind, optionally sums them through a random linear unit, and measures
``Var_test / Var_train`` of the result, with an honest standard error from the delta method
(:func:`variance_ratio`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from varshift.theory.checks import check_int, check_real
from varshift.theory.draws import aligned_weights, correlated_inputs, cos_squared
from varshift.theory.noise import noise_variance, sample_noise
from varshift.theory.shift import (
    VARIANCE,
    check_unit,
    variance_shift,
)

__all__ = [
    "MAX_SIMULATION_BYTES",
    "MonteCarloEstimate",
    "check_memory",
    "simulate_shift",
    "variance_ratio",
]

# Inputs are drawn in chunks of about this many numbers (8 MiB in float64), so a wide layer
# with many samples never holds a (samples, width) matrix at once.
_CHUNK_ELEMENTS = 1 << 20

MAX_SIMULATION_BYTES = 4 << 30
"""Memory (bytes) a simulation may use at its peak, 4 GiB by default; :func:`simulate_shift`
and :func:`~varshift.theory.simulate_depth` refuse sample counts that would need more (the
message says the largest count allowed). Assign a new value to this module attribute to allow
larger runs or to force smaller ones; both functions read it at every call."""

# Peak float64 numbers held per sample: the test and train outputs (2), their concatenation
# (2) and the deviations, influence and temporaries of variance_ratio (4).
_NUMBERS_PER_SAMPLE = 8


def check_memory(what: str, samples: int, *, per_sample: int, fixed: int, limit: int) -> None:
    """``ValueError`` unless ``per_sample · samples + fixed`` float64 numbers fit in ``limit``
    bytes; the message names ``what`` needs them and the largest sample count that fits."""
    needed = 8 * (per_sample * samples + fixed)
    if needed <= limit:
        return
    allowed = (limit // 8 - fixed) // per_sample
    advice = f"pass at most {allowed} samples" if allowed > 0 else "lower the width or depth"
    raise ValueError(
        f"samples must need at most {limit / 2**30:.3g} GiB of memory (MAX_SIMULATION_BYTES in "
        f"varshift.theory.montecarlo), got samples={samples}, which would need "
        f"{needed / 2**30:.3g} GiB for {what}; {advice}"
    )


@dataclass(frozen=True)
class MonteCarloEstimate:
    """A simulated variance shift next to the formula's value for the same set-up.

    Attributes:
        estimate: ``Var_test / Var_train`` of the simulated unit (ratio of two population
            variances over the same samples).
        stderr: its standard error by the delta method (see :func:`variance_ratio`).
        formula: :func:`~varshift.theory.variance_shift` for the same moments, noise and (with a
            width) the ``cos²θ`` of the weights actually drawn.
        samples: number of samples ``N``.
        train_var: simulated training variance (noise on), per unit of ``Σw²``.
        test_var: simulated test variance (noise off), per unit of ``Σw²``.
        noise_variance: ``σ²`` of the noise kind.
        cos2: ``cos²θ`` of the drawn weights, ``None`` in the direct form.
        method: how ``stderr`` was obtained.
    """

    estimate: float
    stderr: float
    formula: float
    samples: int
    train_var: float
    test_var: float
    noise_variance: float
    cos2: float | None = None
    method: str = "delta method"

    @property
    def z(self) -> float:
        """``(estimate − formula) / stderr``; 0 or ±inf when the estimate has no spread."""
        difference = self.estimate - self.formula
        if self.stderr > 0.0:
            return difference / self.stderr
        return 0.0 if difference == 0.0 else math.copysign(math.inf, difference)


def variance_ratio(test: Tensor, train: Tensor) -> tuple[float, float]:
    """``Var(test) / Var(train)`` over paired samples ``(N,)``, and its standard error.

    Both variances are population variances (the Bessel factors cancel in the ratio). The
    standard error is the delta method's: with ``aᵢ = (testᵢ − mean)²``, ``bᵢ = (trainᵢ −
    mean)²`` and ``R = ā / b̄``, the ratio behaves like the mean of ``ψᵢ = (aᵢ − R bᵢ) / b̄``, so
    ``se(R) = sd(ψ) / √N``. Pairing (the same inputs in both modes) is allowed and usually
    shrinks ``se``; centring on the sample means changes nothing to first order.
    """
    a = (test - test.mean()).square()
    b = (train - train.mean()).square()
    b_mean = b.mean()
    ratio = a.mean() / b_mean
    influence = (a - ratio * b) / b_mean
    stderr = influence.std(correction=1) / math.sqrt(test.numel())
    return float(ratio), float(stderr)


def simulate_shift(
    kind: str,
    mean: float,
    var: float,
    *,
    width: int | None = None,
    cos2: float | None = None,
    rho: float = 0.0,
    samples: int = 100_000,
    seed: int = 0,
    **params: Any,
) -> MonteCarloEstimate:
    """Estimate the variance shift by simulation, to compare with the formula.

    Direct form (``width=None``): ``N`` Gaussian inputs ``x ~ N(c, v)``, noise ``m`` of the kind;
    the shift is ``Var(x) / Var(m x)``. Linear form (``width=d``): inputs ``(N, d)`` with pairwise
    correlation ``ρ`` (see :func:`~varshift.theory.draws.correlated_inputs`), one random weight
    vector ``w`` (``N(0, 1)`` entries, or at exactly ``cos2`` to the all-ones vector when given)
    and the shift of ``y = Σ wᵢ mᵢ xᵢ``. The same inputs serve both modes (paired samples).
    Everything is drawn from one ``torch.Generator`` seeded with ``seed``, in float64.

    Args:
        kind, **params: the noise kind and its parameters (see
            :func:`~varshift.theory.noise_variance`); the kind needs a sampler.
        mean: ``c`` of every input unit.
        var: ``v > 0`` of every input unit.
        width: fan-in ``d ≥ 1``, or ``None`` for the direct form.
        cos2: ``cos²θ`` of the weights in ``[0, 1]``, or ``None`` for Gaussian weights (the
            value drawn is reported); needs ``width``.
        rho: correlation between inputs, in ``[−1/(d − 1), 1]``; needs ``width`` unless 0.
        samples: ``N ≥ 10``; the simulation keeps about 64 bytes per sample, and counts that
            would need more than :data:`MAX_SIMULATION_BYTES` (4 GiB: 67 million samples) are
            refused.
        seed: seed of the generator, ``≥ 0``.

    Returns:
        :class:`MonteCarloEstimate` with the estimate, its delta-method standard error and the
        formula's value; ``.z`` is the discrepancy in standard errors.

    Raises:
        ValueError: bad kind, parameters or moments (as :func:`~varshift.theory.shift_parts`),
            moments whose formula or simulation overflows float64, too many samples for
            :data:`MAX_SIMULATION_BYTES`.
        TypeError: an argument that is not a number (or, for ``samples``/``seed``, an integer).
    """
    sigma2 = noise_variance(kind, **params)
    c = check_real("mean", mean)
    v = check_real("var", var, VARIANCE)
    samples = check_int("samples", samples, low=10)
    seed = check_int("seed", seed, low=0)
    if width is None:
        if cos2 is not None or rho != 0.0:
            raise ValueError(
                "cos2 and rho describe the linear unit after the noise and need width, "
                f"got width=None, cos2={cos2!r}, rho={rho!r}"
            )
        d, correlation = 1, 0.0
        unit: dict[str, Any] = {}
    else:
        d, cos2, correlation = check_unit(width, cos2, rho)
        # The formula for the requested (or, for random weights, the mean) cos2 fails now,
        # before the simulation, when the moments overflow float64.
        unit = {"width": d, "cos2": 1.0 / d if cos2 is None else cos2, "rho": correlation}
    variance_shift(kind, c, v, **unit, **params)
    check_memory(
        "the simulated outputs", samples,
        per_sample=_NUMBERS_PER_SAMPLE, fixed=2 * d, limit=MAX_SIMULATION_BYTES,
    )

    generator = torch.Generator().manual_seed(seed)
    weights = aligned_weights(1, d, cos2=cos2, generator=generator)[0]
    test, train = _simulated_outputs(kind, params, samples, weights, c, v, correlation, generator)
    estimate, stderr = variance_ratio(test, train)
    norm2 = float(weights.square().sum())
    train_var = float(train.var(correction=0)) / norm2
    test_var = float(test.var(correction=0)) / norm2
    if not all(math.isfinite(x) for x in (estimate, stderr, train_var, test_var)):
        raise ValueError(
            "mean and var must keep the simulated outputs and their squares within float64 "
            f"(the estimate came out {estimate!r} +/- {stderr!r}), got mean={mean!r}, var={var!r}"
        )

    if width is None:
        drawn_cos2 = None
        formula = variance_shift(kind, c, v, **params)
    else:
        drawn_cos2 = min(1.0, float(cos_squared(weights)))  # rounding may overshoot 1
        formula = variance_shift(kind, c, v, width=d, cos2=drawn_cos2, rho=correlation, **params)
    return MonteCarloEstimate(
        estimate=estimate,
        stderr=stderr,
        formula=formula,
        samples=samples,
        train_var=train_var,
        test_var=test_var,
        noise_variance=sigma2,
        cos2=drawn_cos2,
    )


def _simulated_outputs(
    kind: str,
    params: dict[str, Any],
    samples: int,
    weights: Tensor,
    mean: float,
    var: float,
    rho: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """The unit's outputs ``(samples,)`` with the noise off (test) and on (train), drawn in
    chunks of inputs so that only the two output vectors grow with ``samples``."""
    width = weights.shape[0]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // width)
    test_parts: list[Tensor] = []
    train_parts: list[Tensor] = []
    for start in range(0, samples, rows_per_chunk):
        x = correlated_inputs(
            min(rows_per_chunk, samples - start), width,
            mean=mean, var=var, rho=rho, generator=generator,
        )
        noise = sample_noise(kind, x, generator=generator, **params)
        test_parts.append(x @ weights)
        train_parts.append((x * noise) @ weights)
    return torch.cat(test_parts), torch.cat(train_parts)
