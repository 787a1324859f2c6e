"""Random inputs and weights with exactly the statistics the variance-shift formula assumes.

The Monte Carlo functions check :func:`~varshift.theory.variance_shift` on draws from here:
inputs whose ``d`` units share mean ``c``, variance ``v`` and pairwise correlation ``ρ``, and
weight vectors at a chosen angle ``θ`` to the all-ones vector. Every draw takes an explicit
``torch.Generator`` so that a seed reproduces a simulation bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["aligned_weights", "correlated_inputs", "cos_squared"]


def correlated_inputs(
    samples: int,
    width: int,
    *,
    mean: float,
    var: float,
    rho: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Gaussian inputs ``(samples, width)``, each unit with mean ``c``, variance ``v`` and
    correlation ``ρ`` with every other unit.

    With ``z ~ N(0, I_d)`` and ``z̄`` its average, ``x = c + √v (a z + b z̄ 1)`` where
    ``a = √(1 − ρ)`` fixes ``Var − Cov = v(1 − ρ)`` and ``b = √(a² + dρ) − a`` fixes
    ``Cov = vρ``. Unlike the usual ``√ρ z_shared + √(1 − ρ) zᵢ`` this also covers the negative
    correlations down to ``−1/(d − 1)``. ``ρ`` must be in that range (unchecked here).
    """
    z = torch.randn(samples, width, generator=generator, dtype=dtype)
    a = math.sqrt(1.0 - rho)
    # max() guards against -1e-17 from rounding at rho = -1/(d - 1).
    b = math.sqrt(max(a * a + width * rho, 0.0)) - a
    return mean + math.sqrt(var) * (a * z + b * z.mean(dim=1, keepdim=True))


def aligned_weights(
    rows: int,
    width: int,
    *,
    cos2: float | None,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Random weight rows ``(rows, width)``, each at squared cosine ``cos2`` to the all-ones
    vector; ``cos2=None`` draws plain ``N(0, 1)`` entries instead (``E[cos²θ] = 1/d``).

    Each row is ``√cos2 e + √(1 − cos2) u`` with ``e = 1/√d`` and ``u`` a uniformly random unit
    vector orthogonal to ``e``, so the angle is exact and everything else is random. The rows
    have unit norm; BatchNorm after the layer makes the scale irrelevant.
    """
    gaussian = torch.randn(rows, width, generator=generator, dtype=dtype)
    if cos2 is None:
        return gaussian
    ones = torch.full((width,), 1.0 / math.sqrt(width), dtype=dtype)
    if width == 1:
        return ones.expand(rows, 1).clone()
    orthogonal: Tensor = gaussian - (gaussian @ ones)[:, None] * ones
    unit: Tensor = orthogonal / orthogonal.norm(dim=1, keepdim=True)
    return math.sqrt(cos2) * ones + math.sqrt(1.0 - cos2) * unit


def cos_squared(weights: Tensor) -> Tensor:
    """``cos²θ = (Σw)² / (d Σw²)`` of each row of ``weights`` ``(rows, d)``, shape ``(rows,)``."""
    width = weights.shape[-1]
    squared_sum: Tensor = weights.sum(dim=-1).square()
    return squared_sum / (width * weights.square().sum(dim=-1))
