"""The variance shift that :func:`varshift.diagnose.lint` predicts along one noise path, from
:func:`varshift.theory.variance_shift` with the noise of the path's source.

* No linear/conv layer on the path (activations, pooling, concatenation, additions only): the
  direct form ``Δ = v / (v + σ²(c² + v))``, averaged over channels with each channel's mean ``c``
  and variance ``v`` when measured, and with ``c = 0`` otherwise (then ``Δ = 1/(1 + σ²)``,
  ``1 − p`` for dropout, whatever ``v``).
* A linear/conv layer on the path (or DropConnect, whose noise is on the weights): the width form
  of Li et al. with ``d`` = the first such layer's fan-in, ``cos²θ`` from its weights, ``ρ`` the
  mean correlation between the noise input's channels when measured (``0`` otherwise, which makes
  the width term vanish: the worst case ``1/(1 + σ²)``), and ``c²``, ``v`` pooled over channels.

Only the first weight layer and the noise input's moments are used; what lies between them and
the normalization is assumed to carry the ratio unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from varshift.diagnose.channel_stats import ChannelStats
from varshift.diagnose.graph import DataflowGraph, NoisePath
from varshift.layers.registry import NoiseSpec
from varshift.theory import variance_shift

__all__ = ["PathPrediction", "combine_shifts", "predict_path_shift"]


@dataclass(frozen=True)
class PathPrediction:
    """The predicted ``Δ = Var_test / Var_train`` at the end of a noise path (``None`` when the
    noise is not modelled or no measured channel varies), and the width-form inputs it used:
    ``width`` (fan-in ``d``), ``cos2`` and ``rho``, all ``None`` in the direct form."""

    shift: float | None
    width: int | None = None
    cos2: float | None = None
    rho: float | None = None


def predict_path_shift(
    graph: DataflowGraph, path: NoisePath, stats: ChannelStats | None
) -> PathPrediction:
    """The prediction for ``path``, with ``stats`` the measured input of its source node
    (``None``: not measured; zero-mean input is assumed)."""
    spec = graph.nodes[path.source].spec
    # The first weight layer is where the width form applies; DropConnect is its own.
    layer = next((graph.nodes[i] for i in path.nodes[:-1] if graph.nodes[i].fan_in), None)
    if layer is None or layer.fan_in is None:
        return PathPrediction(_direct_shift(spec, stats))
    width = layer.fan_in
    cos2 = _assumed_cos2(width, layer.weight_cos2())
    rho = _assumed_rho(width, stats)
    return PathPrediction(_width_shift(spec, stats, width, cos2, rho), width, cos2, rho)


def _assumed_cos2(width: int, measured: float | None) -> float:
    """``cos²θ`` of the weight layer: the one read from its weights when there is one."""
    if width == 1:
        return 1.0  # one weight is always parallel to the (one-element) all-ones vector
    if measured is None:
        # No angle could be read (a transposed conv, all-zero weights): assume zero-mean random
        # weights, for which E[(Σw)²] = d·E[w²] = E[Σw²], so E[cos²θ] ≈ 1/d.
        return 1.0 / width
    # Cauchy–Schwarz bounds (Σw)² by d·Σw²; rounding may still cross [0, 1] by an ulp.
    return min(1.0, max(0.0, measured))


def _assumed_rho(width: int, stats: ChannelStats | None) -> float:
    """``ρ`` between the layer's inputs: the measured mean correlation between channels, else 0
    (independent inputs)."""
    if stats is None or stats.rho is None or width == 1:
        return 0.0  # with one input there is no pair to correlate
    # d inputs with equal pairwise correlation ρ sum to Var = d·v·(1 + (d − 1)ρ) ≥ 0: an
    # equicorrelation matrix is positive semi-definite only for ρ ≥ −1/(d − 1). The measured
    # mean over C channels may fall below that when a conv's d = C·k² exceeds C (its kernel
    # neighbours are assumed as correlated as the channels): clip to the model's range.
    return min(1.0, max(-1.0 / (width - 1), stats.rho))


def _live_moments(
    stats: ChannelStats | None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """``(c, v)`` of the channels that carry variance to shift; zero-mean unit input when not
    measured; ``None`` when no measured channel does (all constant or non-finite)."""
    if stats is None:
        return np.zeros(1), np.ones(1)
    mean, var = stats.mean.numpy(), stats.var.numpy()
    live = np.isfinite(mean) & np.isfinite(var) & (var > 0)
    if not live.any():
        return None
    return mean[live], var[live]


def _direct_shift(spec: NoiseSpec | None, stats: ChannelStats | None) -> float | None:
    moments = None if spec is None else _live_moments(stats)
    if spec is None or moments is None:
        return None
    params: dict[str, Any] = dict(spec.params)
    return float(np.mean(variance_shift(spec.kind, *moments, **params)))


def _width_shift(
    spec: NoiseSpec | None, stats: ChannelStats | None, width: int, cos2: float, rho: float
) -> float | None:
    moments = None if spec is None else _live_moments(stats)
    if spec is None or moments is None:
        return None
    mean, var = moments
    # The width form assumes one (c, v) for all d inputs: pool the channels.
    c = math.sqrt(float(np.mean(mean**2)))
    v = float(np.mean(var))
    params: dict[str, Any] = dict(spec.params)
    return float(variance_shift(spec.kind, c, v, width=width, cos2=cos2, rho=rho, **params))


def combine_shifts(shifts: Sequence[float]) -> float | None:
    """The shift of several independent noise sources at one normalization from each one's
    own: their masks are independent, so their extra variances add, ``Var_train = Var_eval ·
    (1 + Σ (1/Δ_i − 1))``; exact when the sources reach the same channels with the same
    ``Var_eval`` (the per-channel average is otherwise only approximated). ``None`` for none."""
    if not shifts:
        return None
    if min(shifts) <= 0:
        return 0.0  # one source already leaves no test-time variance
    return 1.0 / (1.0 + sum(1.0 / shift - 1.0 for shift in shifts))
