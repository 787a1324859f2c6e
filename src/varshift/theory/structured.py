"""The variance shift of structured masks: drop path (stochastic depth) and channel dropout.

The element-wise formula of :mod:`~varshift.theory.shift` assumes one independent mask per
element. Two common masks are shared instead, and change what a BatchNorm learns:

- **Drop path / stochastic depth** (Huang et al., ECCV 2016; torchvision ``StochasticDepth``,
  timm ``DropPath``) multiplies a residual branch by one mask per sample, ``y = x + m f`` with
  ``m ∈ {0, 1/q}``, ``q = 1 − p``, ``s² = Var[m] = p/(1 − p)``. In ``"row"`` mode every sample
  draws its own mask; in ``"batch"`` mode (torchvision's ``mode="batch"``) the whole batch
  shares one, so BatchNorm's batch statistics alternate between steps with and without the
  branch, and its running variance (an average of within-batch variances) never sees the jump
  of the batch mean between the two cases.
- **Channel dropout** (``nn.Dropout1d/2d/3d``; DropBlock with a block as large as the feature
  map is the same mask) draws one mask per (sample, channel), shared by every position. Straight
  into a BatchNorm the shift is the element-wise one; through a convolution the noise of a
  channel's whole kernel window moves together, so it adds ``s² E[(w_c · x_c)²]`` per channel
  instead of ``s² Σ w² E[x²]``.

Closed forms work on floats and numpy arrays; the Monte Carlo checks draw in float64 with torch
from a generator seeded with ``seed`` and report standard errors like
:func:`~varshift.theory.simulate_shift`. Derivations: ``docs/theory.md``, section "Structured
masks: drop path and channel dropout".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from varshift.theory.checks import Interval, check_int, check_real, check_reals
from varshift.theory.draws import correlated_inputs, cos_squared
from varshift.theory.montecarlo import (
    MAX_SIMULATION_BYTES,
    MonteCarloEstimate,
    check_memory,
    variance_ratio,
)
from varshift.theory.noise import noise_variance
from varshift.theory.shift import VARIANCE, check_correlation, variance_shift

__all__ = [
    "ChannelDropoutShift",
    "DropPathMode",
    "RunningStats",
    "RunningStatsEstimate",
    "channel_dropout_shift_through_conv",
    "drop_path_running_stats",
    "drop_path_shift",
    "simulate_channel_dropout",
    "simulate_channel_dropout_through_conv",
    "simulate_drop_path",
    "simulate_drop_path_running_stats",
]

FloatArray = npt.NDArray[np.float64]
DropPathMode = Literal["row", "batch"]

NONNEGATIVE = Interval(0.0, why="a variance or second moment")
CORRELATION = Interval(-1.0, 1.0, why="a correlation")
MOMENTUM = Interval(0.0, 1.0, low_open=True, why="BatchNorm's momentum")
# Steps thrown away before the running statistics are averaged: BatchNorm's initial running
# statistics (mean 0, variance 1) have decayed by this factor.
_BURN_IN_DECAY = 1e-9
_ELEMENTS_PER_DRAW = 1 << 20  # numbers per block of drawn batches (8 MiB in float64)


def _bernoulli_variance(p: Any) -> float:
    """``s² = p/(1 − p)`` of an inverted Bernoulli mask, ``p`` validated as everywhere else."""
    return noise_variance("bernoulli", p=p)


def _refuse_non_finite(what: str, received: str, *values: Any) -> None:
    if not all(np.isfinite(np.asarray(value)).all() for value in values):
        raise ValueError(f"{what} must keep the variances within float64, got {received}")


def _refuse_overflowed_simulation(received: str, estimate: float, stderr: float,
                                  *others: float) -> None:
    """``ValueError`` when a simulated statistic left float64 (moments near its limits)."""
    if not all(math.isfinite(x) for x in (estimate, stderr, *others)):
        raise ValueError(
            "the moments must keep the simulated values and their squares within float64 "
            f"(the estimate came out {estimate!r} +/- {stderr!r}), got {received}"
        )


# --------------------------------------------------------------------------- drop path, row


def drop_path_shift(
    p: float, total_var: npt.ArrayLike, branch_second_moment: npt.ArrayLike
) -> float | FloatArray:
    """``Δ`` at a BatchNorm after a residual sum ``x + m f`` with per-sample ("row") drop path.

    With ``z = L(x + m f)`` for a linear map ``L`` (identity, a conv, a linear layer) and one mask
    ``m ∈ {0, 1/q}`` per sample, ``L(m f) = m L(f)`` and ``E[m] = 1``, so the noise adds
    ``s² E[(L f)²]`` to the variance of the noise-off sum and nothing to its mean:

        ``Δ = Var(L(x + f)) / (Var(L(x + f)) + s² E[(L f)²])``, ``s² = p/(1 − p)``.

    Args:
        p: drop probability of the path in ``[0, 1)``.
        total_var: ``Var(L(x + f)) ≥ 0``, the population variance of the noise-off sum (what
            the BatchNorm sees in eval); a number or an array (e.g. one entry per channel).
        branch_second_moment: ``E[(L f)²] ≥ 0``, the second moment (not the variance) of the
            branch's contribution; broadcasts with ``total_var``.

    Returns:
        ``Δ`` in ``[0, 1]``: a float for numbers, an array of the broadcast shape otherwise;
        1 where both variances are 0.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``, negative or non-finite moments, or an overflow.
        TypeError: an argument that is not real numbers.
    """
    s2 = _bernoulli_variance(p)
    test = check_reals("total_var", total_var, NONNEGATIVE)
    second = check_reals("branch_second_moment", branch_second_moment, NONNEGATIVE)
    with np.errstate(over="ignore", invalid="ignore"):
        train = test + s2 * second
    _refuse_non_finite(
        "total_var and branch_second_moment", f"{total_var!r}, {branch_second_moment!r}", train
    )
    shift = np.divide(test, train, out=np.ones_like(train), where=train > 0.0)
    return float(shift) if shift.ndim == 0 else shift


@dataclass(frozen=True)
class _Pair:
    """Trunk ``a = L x`` and branch ``b = L f`` of one BatchNorm unit: jointly Gaussian."""

    trunk_mean: float
    trunk_var: float
    branch_mean: float
    branch_var: float
    correlation: float

    @classmethod
    def checked(cls, trunk_mean: Any, trunk_var: Any, branch_mean: Any, branch_var: Any,
                correlation: Any) -> _Pair:
        pair = cls(
            check_real("trunk_mean", trunk_mean),
            check_real("trunk_var", trunk_var, VARIANCE),
            check_real("branch_mean", branch_mean),
            check_real("branch_var", branch_var, NONNEGATIVE),
            check_real("correlation", correlation, CORRELATION),
        )
        _refuse_non_finite(
            "trunk and branch moments", pair.describe(), pair.total_var,
            pair.branch_second_moment, pair.total_mean * pair.total_mean,
        )
        return pair

    def describe(self) -> str:
        return (
            f"trunk_mean={self.trunk_mean!r}, trunk_var={self.trunk_var!r}, "
            f"branch_mean={self.branch_mean!r}, branch_var={self.branch_var!r}"
        )

    @property
    def covariance(self) -> float:
        # Two square roots: the product of the variances may overflow when neither does.
        return self.correlation * math.sqrt(self.trunk_var) * math.sqrt(self.branch_var)

    @property
    def total_mean(self) -> float:
        return self.trunk_mean + self.branch_mean

    @property
    def total_var(self) -> float:
        total = self.trunk_var + self.branch_var + 2.0 * self.covariance
        # Rounding at correlation = -1 may leave a tiny negative number (NaN stays NaN).
        return 0.0 if total < 0.0 else total

    @property
    def branch_second_moment(self) -> float:
        return self.branch_var + self.branch_mean * self.branch_mean

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        z = torch.randn((2, *shape), generator=generator, dtype=torch.float64)
        r = self.correlation
        trunk = self.trunk_mean + math.sqrt(self.trunk_var) * z[0]
        mixed = r * z[0] + math.sqrt(max(0.0, 1.0 - r * r)) * z[1]
        branch = self.branch_mean + math.sqrt(self.branch_var) * mixed
        return trunk, branch


def _path_masks(shape: tuple[int, ...], p: float, generator: torch.Generator) -> Tensor:
    keep = 1.0 - p
    return torch.empty(shape, dtype=torch.float64).bernoulli_(keep, generator=generator) / keep


def simulate_drop_path(
    p: float,
    *,
    trunk_mean: float = 0.0,
    trunk_var: float = 1.0,
    branch_mean: float = 0.0,
    branch_var: float = 1.0,
    correlation: float = 0.0,
    samples: int = 100_000,
    seed: int = 0,
) -> MonteCarloEstimate:
    """Monte Carlo check of :func:`drop_path_shift` for per-sample ("row") drop path.

    Draws ``N`` pairs ``(a, b)`` of jointly Gaussian trunk and branch contributions at the unit
    (``a = L x``, ``b = L f``: means, variances and correlation as given) and one mask
    ``m ∈ {0, 1/q}`` per sample, and measures ``Var(a + b) / Var(a + m b)`` on the same draws
    with the delta-method standard error of :func:`~varshift.theory.variance_ratio`. The formula
    is :func:`drop_path_shift` with the population moments of the pair.

    Args:
        p: drop probability in ``[0, 1)``.
        trunk_mean, trunk_var: mean and variance ``> 0`` of the trunk ``a``.
        branch_mean, branch_var: mean and variance ``≥ 0`` of the branch ``b``.
        correlation: correlation of ``a`` and ``b`` in ``[−1, 1]``.
        samples: ``N ≥ 10``.
        seed: seed of the generator, ``≥ 0``.

    Returns:
        :class:`~varshift.theory.MonteCarloEstimate` (``cos2`` is ``None``; the variances are
        those of the unit itself).
    """
    s2 = _bernoulli_variance(p)
    pair = _Pair.checked(trunk_mean, trunk_var, branch_mean, branch_var, correlation)
    samples = check_int("samples", samples, low=10)
    seed = check_int("seed", seed, low=0)
    check_memory("the simulated outputs", samples, per_sample=12, fixed=0,
                 limit=MAX_SIMULATION_BYTES)
    formula = drop_path_shift(p, pair.total_var, pair.branch_second_moment)

    generator = torch.Generator().manual_seed(seed)
    trunk, branch = pair.draw((samples,), generator)
    test = trunk + branch
    train = trunk + _path_masks((samples,), p, generator) * branch
    estimate, stderr = variance_ratio(test, train)
    _refuse_overflowed_simulation(pair.describe(), estimate, stderr)
    return MonteCarloEstimate(
        estimate=estimate,
        stderr=stderr,
        formula=float(formula),
        samples=samples,
        train_var=float(train.var(correction=0)),
        test_var=float(test.var(correction=0)),
        noise_variance=s2,
    )


# ------------------------------------------------------------- drop path, BN running statistics


def _check_mode(mode: Any) -> DropPathMode:
    if isinstance(mode, str) and mode == "row":
        return "row"
    if isinstance(mode, str) and mode == "batch":
        return "batch"
    raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")


@dataclass(frozen=True)
class RunningStats:
    """What BatchNorm's running statistics converge to after a drop-path residual sum.

    Attributes:
        mode: ``"row"`` (one mask per sample) or ``"batch"`` (one mask per batch).
        noise_variance: ``s² = p/(1 − p)``.
        running_mean: ``E[running_mean] = E[L(x + f)]``, the eval mean, in both modes.
        running_var: ``E[running_var]``: ``T + s²(V + μ²)`` in row mode, ``T + s² V`` in batch
            mode (``T = Var(L(x + f))``, ``V = Var(L f)``, ``μ = E[L f]``).
        test_var: ``T``, the variance BatchNorm sees in eval.
        shift: ``test_var / running_var``.
        batch_mean_spread: variance of the batch means between steps that does not shrink with
            the batch size: ``s² μ²`` in batch mode, 0 in row mode. It is what batch mode takes out
            of the running variance, and it makes the running mean wander instead.
        running_mean_var: the stationary variance of the running mean around its expectation,
            ``momentum/(2 − momentum) · (batch_mean_spread + running_var/B)``; ``None`` without a
            batch size.
    """

    mode: DropPathMode
    noise_variance: float
    running_mean: float
    running_var: float
    test_var: float
    shift: float
    batch_mean_spread: float
    running_mean_var: float | None


def drop_path_running_stats(
    p: float,
    *,
    total_var: float,
    branch_var: float,
    branch_mean: float = 0.0,
    total_mean: float = 0.0,
    mode: DropPathMode = "batch",
    batch_size: int | None = None,
    momentum: float = 0.1,
) -> RunningStats:
    """The expected running statistics of a BatchNorm fed ``L(x + m f)``, and the shift.

    BatchNorm updates ``running ← (1 − momentum) running + momentum · batch statistic`` with the
    batch mean and the *unbiased* batch variance, so in expectation the running variance is the
    average over steps of the within-batch variance. In row mode each batch holds samples with
    and without the branch and that average is the training variance of
    :func:`drop_path_shift`, ``T + s²(V + μ²)``. In batch mode a step has the branch (scaled by
    ``1/q``) with probability ``q`` and not at all otherwise:

        ``E[running_var] = q Var(L x + L f/q) + p Var(L x) = T + s² V``,

    smaller than row mode's by ``s² μ²``: the jump of the batch mean between the two cases
    (``E[L f]/q`` with probability ``q``) has variance ``s² μ²`` over steps, which the
    running mean absorbs (it still converges to ``q E[L x + L f/q] + p E[L x] = E[L(x + f)]``)
    and the running variance never sees. So a branch with zero mean has the same shift in both
    modes, and batch mode's shift is ``T / (T + s² V)``.

    Args:
        p: drop probability in ``[0, 1)``.
        total_var: ``T = Var(L(x + f)) ≥ 0``, the noise-off variance.
        branch_var: ``V = Var(L f) ≥ 0``.
        branch_mean: ``μ = E[L f]``.
        total_mean: ``E[L(x + f)]``, reported as the running mean's limit.
        mode: ``"batch"`` (one mask per batch) or ``"row"`` (one per sample).
        batch_size: ``B ≥ 2`` for :attr:`RunningStats.running_mean_var`, or ``None``.
        momentum: BatchNorm's momentum in ``(0, 1]``.

    Raises:
        ValueError: out-of-range arguments, an unknown mode, an overflow.
        TypeError: an argument of the wrong type.
    """
    s2 = _bernoulli_variance(p)
    test = check_real("total_var", total_var, NONNEGATIVE)
    v = check_real("branch_var", branch_var, NONNEGATIVE)
    mu = check_real("branch_mean", branch_mean)
    mean = check_real("total_mean", total_mean)
    checked_mode = _check_mode(mode)
    size = None if batch_size is None else check_int("batch_size", batch_size, low=2)
    m = check_real("momentum", momentum, MOMENTUM)
    spread = s2 * mu * mu if checked_mode == "batch" else 0.0
    running_var = test + s2 * v + (0.0 if checked_mode == "batch" else s2 * mu * mu)
    _refuse_non_finite(
        "total_var, branch_var and branch_mean",
        f"{total_var!r}, {branch_var!r}, {branch_mean!r}", running_var, spread,
    )
    wander = None if size is None else m / (2.0 - m) * (spread + running_var / size)
    return RunningStats(
        mode=checked_mode,
        noise_variance=s2,
        running_mean=mean,
        running_var=running_var,
        test_var=test,
        shift=test / running_var if running_var > 0.0 else 1.0,
        batch_mean_spread=spread,
        running_mean_var=wander,
    )


@dataclass(frozen=True)
class RunningStatsEstimate:
    """BatchNorm's running statistics simulated over many steps, next to the closed form.

    Each of ``chains`` independent BatchNorm channels runs ``burn_in + steps`` training steps;
    every estimate is the mean over chains of a per-chain average over the ``steps`` after the
    burn-in, and its standard error is the spread of those per-chain averages over
    ``√chains`` (chains are independent, steps within a chain are not).

    Attributes:
        formula: :func:`drop_path_running_stats` for the simulated set-up.
        running_mean, running_mean_stderr: time-averaged running mean.
        running_var, running_var_stderr: time-averaged running variance.
        running_mean_var, running_mean_var_stderr: time-averaged squared deviation of the running
            mean from its exact expectation ``E[L(x + f)]``.
        shift, shift_stderr: noise-off variance of the drawn units over the time-averaged
            running variance (delta method over chains).
        steps, chains, batch_size, burn_in: the simulation's size.
    """

    formula: RunningStats
    running_mean: float
    running_mean_stderr: float
    running_var: float
    running_var_stderr: float
    running_mean_var: float
    running_mean_var_stderr: float
    shift: float
    shift_stderr: float
    steps: int
    chains: int
    batch_size: int
    burn_in: int


def _mean_and_stderr(values: Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std(correction=1)) / math.sqrt(values.numel())


def _ratio_of_means(numerator: Tensor, denominator: Tensor) -> tuple[float, float]:
    """``mean(numerator) / mean(denominator)`` over independent units and its delta-method
    standard error, ``sd(ψ)/√n`` with ``ψ = (numerator − R denominator) / mean(denominator)``."""
    scale = denominator.mean()
    ratio = numerator.mean() / scale
    influence = (numerator - ratio * denominator) / scale
    return float(ratio), float(influence.std(correction=1)) / math.sqrt(numerator.numel())


def simulate_drop_path_running_stats(
    p: float,
    *,
    trunk_mean: float = 0.0,
    trunk_var: float = 1.0,
    branch_mean: float = 0.0,
    branch_var: float = 1.0,
    correlation: float = 0.0,
    mode: DropPathMode = "batch",
    batch_size: int = 32,
    momentum: float = 0.1,
    steps: int = 1000,
    chains: int = 64,
    seed: int = 0,
) -> RunningStatsEstimate:
    """Simulate BatchNorm's running statistics after drop path, to check
    :func:`drop_path_running_stats`.

    At each step every chain draws a batch of ``B`` jointly Gaussian pairs ``(a, b)`` (as in
    :func:`simulate_drop_path`) and masks (one per batch in batch mode, one per sample in row
    mode), and ``torch.nn.functional.batch_norm`` in training mode updates that chain's running
    mean and variance, exactly as an ``nn.BatchNorm1d`` with ``chains`` channels would (the
    chains are its channels). The first ``burn_in`` steps, enough for the initial statistics to
    decay by ``1e-9``, are not averaged.

    Args:
        p, trunk_mean, trunk_var, branch_mean, branch_var, correlation: as in
            :func:`simulate_drop_path`.
        mode: ``"batch"`` or ``"row"``.
        batch_size: ``B ≥ 2``.
        momentum: BatchNorm's momentum in ``(0, 1]``.
        steps: ``≥ 10`` averaged steps per chain.
        chains: ``≥ 2`` independent chains.
        seed: seed of the generator, ``≥ 0``.
    """
    pair = _Pair.checked(trunk_mean, trunk_var, branch_mean, branch_var, correlation)
    checked_mode = _check_mode(mode)
    size = check_int("batch_size", batch_size, low=2)
    m = check_real("momentum", momentum, MOMENTUM)
    steps = check_int("steps", steps, low=10)
    chains = check_int("chains", chains, low=2)
    seed = check_int("seed", seed, low=0)
    formula = drop_path_running_stats(
        p, total_var=pair.total_var, branch_var=pair.branch_var, branch_mean=pair.branch_mean,
        total_mean=pair.total_mean, mode=checked_mode, batch_size=size, momentum=m,
    )
    burn_in = 1 if m == 1.0 else math.ceil(math.log(_BURN_IN_DECAY) / math.log1p(-m))

    generator = torch.Generator().manual_seed(seed)
    averages = _averaged_running_stats(pair, p, checked_mode, size, m, burn_in, steps, chains,
                                       generator)
    mean, mean_se = _mean_and_stderr(averages[0])
    var, var_se = _mean_and_stderr(averages[1])
    wander, wander_se = _mean_and_stderr(averages[2])
    shift, shift_se = _ratio_of_means(averages[3], averages[1])
    _refuse_overflowed_simulation(
        pair.describe(), mean, mean_se, var, var_se, wander, wander_se, shift, shift_se
    )
    return RunningStatsEstimate(
        formula=formula,
        running_mean=mean,
        running_mean_stderr=mean_se,
        running_var=var,
        running_var_stderr=var_se,
        running_mean_var=wander,
        running_mean_var_stderr=wander_se,
        shift=shift,
        shift_stderr=shift_se,
        steps=steps,
        chains=chains,
        batch_size=size,
        burn_in=burn_in,
    )


def _averaged_running_stats(
    pair: _Pair,
    p: float,
    mode: DropPathMode,
    size: int,
    momentum: float,
    burn_in: int,
    steps: int,
    chains: int,
    generator: torch.Generator,
) -> Tensor:
    """Per chain, the averages over the steps after ``burn_in`` of the running mean, the running
    variance, the squared deviation of the running mean from ``E[a + b]`` and the unbiased
    noise-off batch variance: shape ``(4, chains)``."""
    running_mean = torch.zeros(chains, dtype=torch.float64)
    running_var = torch.ones(chains, dtype=torch.float64)  # BatchNorm's initial statistics
    sums = torch.zeros(4, chains, dtype=torch.float64)
    total = burn_in + steps
    # Batches are drawn a block of steps at a time (about _ELEMENTS_PER_DRAW numbers); only
    # BatchNorm's update runs step by step.
    block = max(1, _ELEMENTS_PER_DRAW // (size * chains))
    for start in range(0, total, block):
        count = min(block, total - start)
        trunk, branch = pair.draw((count, size, chains), generator)
        mask_shape = (count, 1, chains) if mode == "batch" else (count, size, chains)
        batches = trunk + _path_masks(mask_shape, p, generator) * branch
        history = torch.empty(2, count, chains, dtype=torch.float64)
        for step in range(count):
            F.batch_norm(batches[step], running_mean, running_var, training=True,
                         momentum=momentum)
            history[0, step] = running_mean
            history[1, step] = running_var
        kept = slice(max(0, burn_in - start), count)
        sums[0] += history[0, kept].sum(dim=0)
        sums[1] += history[1, kept].sum(dim=0)
        sums[2] += (history[0, kept] - pair.total_mean).square().sum(dim=0)
        sums[3] += (trunk + branch)[kept].var(dim=1, correction=1).sum(dim=0)
    return sums / steps


# ------------------------------------------------------------------------- channel dropout


@dataclass(frozen=True)
class ChannelDropoutShift:
    """The shift at a BatchNorm after channel dropout and one conv/linear output unit, next to
    what element-wise dropout of the same ``p`` would give.

    Attributes:
        noise_variance: ``s² = p/(1 − p)``.
        test_var: ``Var(Σ_c w_c · x_c)``, the unit's noise-off variance.
        train_var: ``test_var + s² Σ_c E[(w_c · x_c)²]`` (one mask per channel).
        shift: ``test_var / train_var``.
        elementwise_train_var: ``test_var + s² Σ_c Σ_j w_cj² E[x_cj²]`` (one mask per element).
        elementwise_shift: ``test_var / elementwise_train_var``.
    """

    noise_variance: float
    test_var: float
    train_var: float
    shift: float
    elementwise_train_var: float
    elementwise_shift: float


@dataclass(frozen=True)
class _Window:
    """The checked input window of one conv output unit: weights ``(C, k)`` and moments."""

    weights: FloatArray
    mean: FloatArray  # (C,)
    var: FloatArray  # (C,)
    rho_within: float
    rho_between: float

    @property
    def channels(self) -> int:
        return int(self.weights.shape[0])

    @property
    def positions(self) -> int:
        return int(self.weights.shape[1])

    def covariance(self) -> FloatArray:
        """The ``(C k, C k)`` covariance of the window, channel-major like ``weights.ravel()``."""
        c, k = self.channels, self.positions
        sd = np.repeat(np.sqrt(self.var), k)
        same_channel = np.kron(np.eye(c), np.ones((k, k)))
        correlation = np.where(same_channel > 0, self.rho_within, self.rho_between)
        np.fill_diagonal(correlation, 1.0)
        return np.asarray(correlation * np.outer(sd, sd), dtype=np.float64)


def _check_window(
    weights: Any, mean: Any, var: Any, rho_within: Any, rho_between: Any
) -> _Window:
    w = check_reals("weights", weights)
    if w.ndim < 2 or w.size == 0:
        raise ValueError(
            "weights must have shape (C_in, k...) (one row of kernel taps per input channel), "
            f"got shape {w.shape}"
        )
    w = w.reshape(w.shape[0], -1)
    c, k = w.shape
    moments = []
    for name, value, interval in (("mean", mean, Interval()), ("var", var, VARIANCE)):
        values = check_reals(name, value, interval)
        if values.shape not in ((), (c,)):
            raise ValueError(
                f"{name} must be a number or one entry per input channel, shape ({c},), "
                f"got shape {values.shape}"
            )
        moments.append(np.broadcast_to(values, (c,)).astype(np.float64))
    within_low = -1.0 if k == 1 else max(-1.0, -1.0 / (k - 1))
    within_why = (
        f"the correlation between positions of a channel; the lower end is -1/(k - 1) for k={k}"
    )
    within = check_real("rho_within", rho_within, Interval(within_low, 1.0, why=within_why))
    # The covariance is PSD iff, on channel-constant vectors, (1 + (k−1)ρ − kρ_b) I + kρ_b J
    # is: ρ_b between −(1 + (k−1)ρ)/(k(C − 1)) and (1 + (k−1)ρ)/k.
    block = 1.0 + (k - 1) * within
    low, high = (-1.0, 1.0) if c == 1 else (-block / (k * (c - 1)), block / k)
    why = (
        f"the correlation between channels; its range is [-(1 + (k-1) rho_within)/(k (C-1)), "
        f"(1 + (k-1) rho_within)/k] for C={c}, k={k}"
    )
    between = check_real(
        "rho_between", rho_between, Interval(max(-1.0, low), min(1.0, high), why=why)
    )
    return _Window(w, moments[0], moments[1], within, between)


def channel_dropout_shift_through_conv(
    p: float,
    weights: npt.ArrayLike,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    rho_within: float,
    rho_between: float = 0.0,
) -> ChannelDropoutShift:
    """``Δ`` at a BatchNorm after channel dropout (``nn.Dropout2d``) and one conv output unit.

    The unit is ``y = Σ_c m_c u_c`` with ``u_c = w_c · x_c`` the channel's kernel-window sum and
    one mask ``m_c`` per (sample, channel). The masks have mean 1 and are independent of ``x``
    and of each other, so they leave the mean and the noise-off covariance alone and add
    ``s² Σ_c E[u_c²]``, where, with ``S_c = Σ_j w_cj`` and ``‖w_c‖² = Σ_j w_cj²``,

        ``E[u_c²] = c_c² S_c² + v_c((1 − ρ)‖w_c‖² + ρ S_c²)``
        ``Var_test = Σ_c v_c((1 − ρ)‖w_c‖² + ρ S_c²) + ρ_b((Σ_c √v_c S_c)² − Σ_c v_c S_c²)``.

    Element-wise dropout would add ``s² Σ_c ‖w_c‖²(c_c² + v_c)`` instead: the same when the
    kernel has one tap (``k = 1``); with positively correlated positions and same-sign taps the
    channel mask adds up to ``k`` times more. With ``rho_between == rho_within`` and equal
    moments the element-wise numbers are :func:`~varshift.theory.variance_shift`'s linear form.

    Args:
        p: drop probability in ``[0, 1)``.
        weights: the unit's weights ``(C_in, k...)`` (a conv's ``weight[out]``; trailing kernel
            dimensions are flattened into ``k`` positions).
        mean: ``c``, the mean of the inputs: a number or one per channel ``(C_in,)``.
        var: ``v > 0``, their population variance: a number or ``(C_in,)``.
        rho_within: correlation ``ρ`` between two positions of the same channel (and sample),
            in ``[−1/(k − 1), 1]``.
        rho_between: correlation ``ρ_b`` between positions of two different channels, in the
            range that keeps the covariance positive semi-definite (quoted when violated).

    Raises:
        ValueError: out-of-range or non-finite values, badly shaped ``weights``/moments.
        TypeError: arguments that are not real numbers.
    """
    s2 = _bernoulli_variance(p)
    window = _check_window(weights, mean, var, rho_within, rho_between)
    w, c, v = window.weights, window.mean, window.var
    rho, rho_b = window.rho_within, window.rho_between
    with np.errstate(over="ignore", invalid="ignore"):
        taps = w.sum(axis=1)
        norm2 = np.square(w).sum(axis=1)
        channel_var = v * ((1.0 - rho) * norm2 + rho * taps**2)
        shared = np.square(np.sqrt(v) * taps).sum()
        cross = rho_b * (np.sum(np.sqrt(v) * taps) ** 2 - shared)
        test = float(channel_var.sum() + cross)
        test = 0.0 if test < 0.0 else test  # rounding at the edge of the valid correlations
        train = test + s2 * float(np.sum(channel_var + (c * taps) ** 2))
        elementwise = test + s2 * float(np.sum(norm2 * (c * c + v)))
    _refuse_non_finite("weights, mean and var", "an overflow", test, train, elementwise)
    return ChannelDropoutShift(
        noise_variance=s2,
        test_var=test,
        train_var=train,
        shift=test / train if train > 0.0 else 1.0,
        elementwise_train_var=elementwise,
        elementwise_shift=test / elementwise if elementwise > 0.0 else 1.0,
    )


def simulate_channel_dropout_through_conv(
    p: float,
    weights: npt.ArrayLike,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    rho_within: float,
    rho_between: float = 0.0,
    *,
    samples: int = 100_000,
    seed: int = 0,
) -> MonteCarloEstimate:
    """Monte Carlo check of :func:`channel_dropout_shift_through_conv`.

    Draws ``N`` Gaussian windows ``(C_in, k)`` with exactly the given covariance, one Bernoulli
    mask per (sample, channel) repeated over the ``k`` positions, and measures
    ``Var(w · x) / Var(w · (m x))`` with the delta-method standard error. ``cos2`` of the result
    is that of the flattened weights.
    """
    s2 = _bernoulli_variance(p)
    window = _check_window(weights, mean, var, rho_within, rho_between)
    samples = check_int("samples", samples, low=10)
    seed = check_int("seed", seed, low=0)
    formula = channel_dropout_shift_through_conv(
        p, window.weights, window.mean, window.var, window.rho_within, window.rho_between
    )
    dims = window.weights.size
    check_memory("the simulated windows", samples, per_sample=4 * dims + 8, fixed=dims * dims,
                 limit=MAX_SIMULATION_BYTES)

    generator = torch.Generator().manual_seed(seed)
    # A symmetric square root of the covariance also handles the singular edges (ρ = 1).
    eigenvalues, vectors = np.linalg.eigh(window.covariance())
    root = torch.from_numpy((vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T)
    z = torch.randn(samples, dims, generator=generator, dtype=torch.float64)
    centre = torch.from_numpy(np.repeat(window.mean, window.positions))
    x = (centre + z @ root).reshape(samples, window.channels, window.positions)
    masks = _path_masks((samples, window.channels, 1), p, generator)
    w = torch.from_numpy(window.weights)
    test = torch.einsum("nck,ck->n", x, w)
    train = torch.einsum("nck,ck->n", x * masks, w)
    estimate, stderr = variance_ratio(test, train)
    _refuse_overflowed_simulation(f"mean={mean!r}, var={var!r}", estimate, stderr)
    return MonteCarloEstimate(
        estimate=estimate,
        stderr=stderr,
        formula=formula.shift,
        samples=samples,
        train_var=float(train.var(correction=0)),
        test_var=float(test.var(correction=0)),
        noise_variance=s2,
        cos2=min(1.0, float(cos_squared(w.reshape(1, -1))[0])),
    )


def simulate_channel_dropout(
    p: float,
    mean: float,
    var: float,
    *,
    positions: int,
    rho: float = 0.0,
    samples: int = 20_000,
    seed: int = 0,
) -> MonteCarloEstimate:
    """Monte Carlo check that channel dropout straight into a BatchNorm has the element-wise
    shift ``v / (v + s²(c² + v))`` (:func:`~varshift.theory.variance_shift`).

    Draws ``N`` samples of one channel with ``positions`` positions (mean ``c``, variance ``v``,
    correlation ``ρ`` between positions), one mask per sample shared by its positions, and
    compares the variances pooled over samples and positions, as BatchNorm pools them. The
    positions of one sample are not independent (they share the mask and are correlated), so
    the delta-method standard error treats samples as the independent units: with ``a_n``,
    ``b_n`` the sample's mean squared deviation in the two modes, ``R = ā/b̄`` and
    ``se = sd((a_n − R b_n)/b̄)/√N``.
    """
    s2 = _bernoulli_variance(p)
    c = check_real("mean", mean)
    v = check_real("var", var, VARIANCE)
    k = check_int("positions", positions, low=1)
    correlation = float(check_correlation(check_real("rho", rho), k))
    samples = check_int("samples", samples, low=10)
    seed = check_int("seed", seed, low=0)
    formula = variance_shift("bernoulli", c, v, p=p)
    check_memory("the simulated channel", samples, per_sample=6 * k, fixed=0,
                 limit=MAX_SIMULATION_BYTES)

    generator = torch.Generator().manual_seed(seed)
    test = correlated_inputs(samples, k, mean=c, var=v, rho=correlation, generator=generator)
    train = test * _path_masks((samples, 1), p, generator)
    per_sample_test = (test - test.mean()).square().mean(dim=1)
    per_sample_train = (train - train.mean()).square().mean(dim=1)
    estimate, stderr = _ratio_of_means(per_sample_test, per_sample_train)
    _refuse_overflowed_simulation(f"mean={mean!r}, var={var!r}", estimate, stderr)
    return MonteCarloEstimate(
        estimate=estimate,
        stderr=stderr,
        formula=formula,
        samples=samples,
        train_var=float(per_sample_train.mean()),
        test_var=float(per_sample_test.mean()),
        noise_variance=s2,
        method="delta method over samples (positions share the mask)",
    )
