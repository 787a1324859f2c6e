"""Statistical checks for noise layers, with tolerances derived from the sample size: a sample
moment within ``K`` standard errors of its theoretical value, and a Kolmogorov–Smirnov distance
below the critical value for a false-alarm probability of about ``ALPHA``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

K = 5.0  # standard errors: a correct layer fails with probability ~6e-7 per check
ALPHA = 1e-6  # false-alarm probability of one Kolmogorov–Smirnov check


def assert_mean_within(sample: Tensor, expected: float, variance: float) -> None:
    """Sample mean within K standard errors sqrt(variance / n) of ``expected``."""
    sample = sample.double().flatten()
    stderr = math.sqrt(variance / sample.numel())
    assert abs(sample.mean().item() - expected) <= K * stderr, (sample.mean().item(), expected)


def assert_variance_within(sample: Tensor, expected: float, fourth: float | None = None) -> None:
    """Unbiased sample variance within K standard errors of ``expected``, using the exact
    Var[s²] = μ4/n − σ⁴(n − 3)/(n(n − 1)) with μ4 the fourth central moment (the sample's when
    not given). Its O(1/n²) term matters where μ4 = σ⁴ (Bernoulli with p = 1/2)."""
    sample = sample.double().flatten()
    n = sample.numel()
    var = sample.var().item()
    if fourth is None:
        fourth = ((sample - sample.mean()) ** 4).mean().item()
    sigma4 = expected**2
    stderr = math.sqrt(fourth / n - sigma4 * (n - 3) / (n * (n - 1)))
    assert abs(var - expected) <= K * stderr, (var, expected, stderr)


def assert_distribution_within(sample: Tensor, cdf: Callable[[Tensor], Tensor]) -> None:
    """One-sample Kolmogorov–Smirnov test against a continuous ``cdf`` (float64 in, out):
    ``D = sup |F_n − F|`` below ``sqrt(ln(2/ALPHA) / (2n))``, the asymptotic critical value
    (``P(√n·D > t) ≈ 2·exp(−2t²)``)."""
    ordered = sample.double().flatten().sort().values
    n = ordered.numel()
    expected = cdf(ordered)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = max((ranks / n - expected).max().item(), (expected - (ranks - 1) / n).max().item())
    critical = math.sqrt(math.log(2 / ALPHA) / (2 * n))
    assert distance <= critical, (distance, critical)
