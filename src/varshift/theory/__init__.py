"""The maths of the Dropout/BatchNorm variance shift (Li et al., CVPR 2019, arXiv 1801.05134).

Multiplicative noise ``m`` with ``E[m] = 1`` and ``Var[m] = σ²`` (every dropout variant here)
leaves the mean of a unit alone but adds ``σ²(c² + v)`` to its variance in training. A
BatchNorm downstream learns that inflated variance and meets the smaller one at test time; the
ratio ``Δ = Var_test / Var_train`` is the variance shift.

- :mod:`~varshift.theory.noise`: ``σ²`` per noise kind, a registry of kinds, noise samplers.
- :mod:`~varshift.theory.shift`: the closed-form shift (direct, and after a linear unit).
- :mod:`~varshift.theory.montecarlo`: a Monte Carlo estimate to check the formula against.
- :mod:`~varshift.theory.depth`: the shift at every BN of a deep noisy stack.
- :mod:`~varshift.theory.structured`: masks shared by a sample (drop path, row and batch mode)
  or a channel (``nn.Dropout2d``), in closed form and by simulation.
- :mod:`~varshift.theory.checks`: the argument checks every theory function and every noise
  layer of :mod:`varshift.layers` validates through (one message form, ``TypeError`` for the
  wrong type, ``ValueError`` for a value out of range or not finite).

This package imports nothing else of varshift; the closed-form functions use floats and numpy.
"""

from __future__ import annotations

from varshift.theory.depth import DepthProfile, simulate_depth
from varshift.theory.montecarlo import MonteCarloEstimate, simulate_shift, variance_ratio
from varshift.theory.noise import (
    noise_kinds,
    noise_variance,
    register_noise_kind,
    sample_noise,
)
from varshift.theory.shift import ShiftParts, shift_parts, variance_shift
from varshift.theory.structured import (
    ChannelDropoutShift,
    RunningStats,
    RunningStatsEstimate,
    channel_dropout_shift_through_conv,
    drop_path_running_stats,
    drop_path_shift,
    simulate_channel_dropout,
    simulate_channel_dropout_through_conv,
    simulate_drop_path,
    simulate_drop_path_running_stats,
)

__all__ = [
    "ChannelDropoutShift",
    "DepthProfile",
    "MonteCarloEstimate",
    "RunningStats",
    "RunningStatsEstimate",
    "ShiftParts",
    "channel_dropout_shift_through_conv",
    "drop_path_running_stats",
    "drop_path_shift",
    "noise_kinds",
    "noise_variance",
    "register_noise_kind",
    "sample_noise",
    "shift_parts",
    "simulate_channel_dropout",
    "simulate_channel_dropout_through_conv",
    "simulate_depth",
    "simulate_drop_path",
    "simulate_drop_path_running_stats",
    "simulate_shift",
    "variance_ratio",
    "variance_shift",
]
