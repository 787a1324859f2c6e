"""Statistics for comparing the arms of a study across a handful of seeds (5–10 per arm).

Everything here is a plain function of numbers (numpy arrays, or the lab's pandas frames for the
two adapters :func:`compare_arms` and :func:`epochs_to_target`); the reports only format what it
returns. The choices follow the maintainers' design notes (``shared/LAB.md`` beside the
repository, "Statistics for 5–10 seeds per arm"), summarised here:

- **Per arm**: n, mean, standard deviation (``ddof=1``) and the 95% t-interval
  ``mean ± t(0.975, n−1)·s/√n``. With one value the interval is undefined (NaN, with a note).
- **Each arm against the reference**: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``,
  which does not assume equal variances) and the difference of means with its Welch interval
  ``Δ ± t(0.975, ν)·√(s₁²/n₁ + s₂²/n₂)``, ν from Welch–Satterthwaite. Two constant samples make
  the test undefined (0/0): p is NaN and the note says why, nothing raises.
- **Holm's step-down correction** across the comparisons with the reference (Holm 1979): it
  controls the family-wise error rate like Bonferroni but rejects more. An arm is significant when
  its Holm-adjusted p is below α = 0.05.
- **Rank groups**: see :func:`rank_groups`; arms the data cannot tell apart share a group.
- **Minimum detectable difference**: with few seeds a non-significant result is weak evidence;
  :func:`min_detectable_difference` says what the study could have found (normal approximation).

Percentile bootstrap intervals are left out on purpose: they are too narrow at these sizes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ALPHA",
    "FEW_SEEDS",
    "ArmComparison",
    "ArmSummary",
    "Comparison",
    "WelchResult",
    "compare_arms",
    "compare_groups",
    "epochs_to_target",
    "first_epoch_reaching",
    "holm",
    "min_detectable_difference",
    "n_range",
    "pooled_sd",
    "rank_groups",
    "summarize",
    "summarize_by",
    "welch",
]

#: Significance level of the tests after Holm's correction.
ALPHA = 0.05
#: Below this many values per arm the report warns that the comparison is weak.
FEW_SEEDS = 5

FloatArray = npt.NDArray[np.float64]


def _values(values: npt.ArrayLike, what: str = "values") -> FloatArray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite numbers, got {array.tolist()}")
    return array


def _check_level(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _is_constant(values: FloatArray) -> bool:
    # Exact equality, not a tolerance: ten seeds that all reach 1.0 accuracy are constant, while
    # a genuinely tiny spread is still a spread the t-test can use.
    return values.size > 0 and bool(np.all(values == values[0]))


# -- one arm -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSummary:
    """n, mean, sample standard deviation (``ddof=1``) and t-interval of one arm's values.

    ``std`` and the interval are NaN for ``n = 1`` (``note`` says so); a constant sample has
    ``std = 0`` and a zero-width interval. ``values`` keeps the data (the report plots each
    seed's point beside the interval).
    """

    arm: str
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95
    note: str | None = None
    values: tuple[float, ...] = field(default=(), repr=False)

    @property
    def half_width(self) -> float:
        """``t(1 − (1 − confidence)/2, n−1)·s/√n``: the ± of the interval."""
        return (self.ci_high - self.ci_low) / 2.0


def summarize(values: npt.ArrayLike, *, arm: str = "", confidence: float = 0.95) -> ArmSummary:
    """Summarise one arm: ``mean ± t(1 − (1−confidence)/2, n−1)·s/√n`` with ``s`` the sample
    standard deviation (Bessel-corrected, ``ddof=1``). Needs at least one finite value."""
    from scipy import stats

    _check_level(confidence, "confidence")
    x = _values(values, f"the values of arm {arm!r}" if arm else "values")
    n = int(x.size)
    if n == 0:
        raise ValueError(f"arm {arm!r} has no values to summarise")
    mean = float(np.mean(x))
    if n == 1:
        nan = math.nan
        return ArmSummary(arm, 1, mean, nan, nan, nan, confidence,
                          "n = 1: standard deviation and interval undefined", (mean,))
    std = 0.0 if _is_constant(x) else float(np.std(x, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    note = "constant values: zero-width interval" if std == 0.0 else None
    return ArmSummary(arm, n, mean, std, mean - half, mean + half, confidence, note,
                      tuple(x.tolist()))


# -- two arms ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WelchResult:
    """Welch's comparison of arm ``a`` with arm ``b``: ``diff = mean(a) − mean(b)`` with its
    interval, the t statistic, the Welch–Satterthwaite degrees of freedom ``df`` and the
    two-sided p-value. Undefined quantities are NaN and ``note`` says why."""

    diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p: float
    note: str | None = None


def welch(a: npt.ArrayLike, b: npt.ArrayLike, *, confidence: float = 0.95) -> WelchResult:
    """Welch's unequal-variance t-test of ``a`` against ``b`` and the interval of
    ``mean(a) − mean(b)``: ``diff ± t(·, ν)·se`` with ``se² = s_a²/n_a + s_b²/n_b`` and
    ``ν = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))``.

    Needs two values per arm; two constant samples give NaN t, p and interval (the test divides
    0 by 0), with a note; one constant sample is fine (its variance is simply 0).
    """
    from scipy import stats

    _check_level(confidence, "confidence")
    x, y = _values(a, "a"), _values(b, "b")
    if x.size == 0 or y.size == 0:
        raise ValueError(f"welch needs values in both samples, got {x.size} and {y.size}")
    diff = float(np.mean(x) - np.mean(y))
    nan = math.nan
    if x.size < 2 or y.size < 2:
        return WelchResult(diff, nan, nan, nan, nan, nan,
                           "n < 2 in an arm: variance unknown, test undefined")
    if _is_constant(x) and _is_constant(y):
        return WelchResult(diff, nan, nan, nan, nan, nan,
                           "both arms constant (std 0): Welch's t is undefined")
    va = 0.0 if _is_constant(x) else float(np.var(x, ddof=1)) / x.size
    vb = 0.0 if _is_constant(y) else float(np.var(y, ddof=1)) / y.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    with warnings.catch_warnings():
        # scipy warns about "catastrophic cancellation" when one sample is constant; its result
        # is exact then (that variance is 0), so the warning would only alarm the user.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(x, y, equal_var=False)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df)) * se
    return WelchResult(diff, diff - half, diff + half, float(result.statistic), df,
                       float(result.pvalue))


# -- many comparisons ----------------------------------------------------------------------------


def holm(pvalues: npt.ArrayLike) -> FloatArray:
    """Holm's step-down adjusted p-values, in the input order.

    Sort the ``m`` p-values ascending; the ``i``-th smallest (``i`` from 1) is multiplied by
    ``m − i + 1``, a running maximum keeps the adjusted values monotone, and they are capped at
    1. An arm is significant at level α when its adjusted p is below α. NaN p-values (tests that
    could not be done) stay NaN and do not count in ``m``.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}")
    adjusted = np.full_like(p, np.nan)
    index = np.flatnonzero(finite)
    order = index[np.argsort(p[index], kind="stable")]
    m = order.size
    running = 0.0
    for i, position in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(p[position])))
        adjusted[position] = running
    return adjusted


def _ordered(groups: Mapping[str, FloatArray], higher_is_better: bool) -> list[str]:
    """Arm names best first (stable: equal means keep the given order)."""
    sign = -1.0 if higher_is_better else 1.0
    return sorted(groups, key=lambda arm: sign * float(np.mean(groups[arm])))


def rank_groups(
    groups: Mapping[str, npt.ArrayLike], *, higher_is_better: bool, alpha: float = ALPHA
) -> dict[str, tuple[int, int]]:
    """``{arm: (rank, group)}``: ``rank`` orders the arms by mean (1 = best); ``group`` says
    which arms the data cannot tell apart.

    Group 1 holds the best arm and every arm whose Welch test against it is not significant
    after Holm's correction over those comparisons (an undefined test, NaN p, counts as not
    significant: nothing shows the arm is worse). The remaining arms are grouped the same way
    around the best of them, and so on. This is a descriptive tiering, not a multiple-comparison
    procedure across tiers: read group 1 as "not shown to be worse than the best".
    """
    _check_level(alpha, "alpha")
    arrays = {arm: _values(values, f"the values of arm {arm!r}") for arm, values in
              groups.items()}
    empty = [arm for arm, values in arrays.items() if values.size == 0]
    if empty:
        raise ValueError(f"arms without values cannot be ranked: {', '.join(empty)}")
    ordered = _ordered(arrays, higher_is_better)
    ranks = {arm: i + 1 for i, arm in enumerate(ordered)}
    result: dict[str, tuple[int, int]] = {}
    remaining = ordered
    group = 0
    while remaining:
        group += 1
        leader, others = remaining[0], remaining[1:]
        adjusted = holm([welch(arrays[leader], arrays[arm]).p for arm in others])
        members = {leader} | {arm for arm, p in zip(others, adjusted) if not p < alpha}
        result.update({arm: (ranks[arm], group) for arm in members})
        remaining = [arm for arm in others if arm not in members]
    return result


def pooled_sd(groups: Mapping[str, npt.ArrayLike] | Sequence[npt.ArrayLike]) -> float:
    """``√(Σ(nᵢ−1)sᵢ² / Σ(nᵢ−1))`` over the groups with at least two values; NaN if none."""
    samples = groups.values() if isinstance(groups, Mapping) else groups
    arrays = [_values(values) for values in samples]
    dof = sum(x.size - 1 for x in arrays if x.size >= 2)
    if dof == 0:
        return math.nan
    squares = sum(float(np.sum((x - np.mean(x)) ** 2)) for x in arrays if x.size >= 2)
    return math.sqrt(squares / dof)


def min_detectable_difference(
    sd: float, n: float, *, alpha: float = ALPHA, power: float = 0.8
) -> float:
    """The difference of means a two-sided test at level ``alpha`` detects with probability
    ``power`` when both arms have ``n`` values and standard deviation ``sd``:
    ``(z(1 − α/2) + z(power))·sd·√(2/n)``.

    A normal approximation: with n ≈ 5 the t-test needs a difference about 10–20% larger, and a
    Holm-corrected comparison larger still, so read it as a lower bound.
    """
    from scipy import stats

    _check_level(alpha, "alpha")
    _check_level(power, "power")
    if not n > 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not sd >= 0:
        return math.nan
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return z * sd * math.sqrt(2.0 / n)


@dataclass(frozen=True)
class ArmComparison:
    """One arm's line of a :class:`Comparison`. ``vs_reference`` is None for the reference
    itself; ``p_holm`` is the Holm-adjusted p of that comparison; ``failed`` counts the trials of
    this arm that were excluded (failed, or done without a value of the metric)."""

    summary: ArmSummary
    vs_reference: WelchResult | None
    p_holm: float
    significant: bool
    rank: int
    group: int
    excluded: int = 0

    @property
    def arm(self) -> str:
        return self.summary.arm


@dataclass(frozen=True)
class Comparison:
    """Every arm of a study compared with the reference arm on one metric.

    ``rows`` are ordered best first; ``missing`` maps arms without any value to the number of
    their excluded trials; ``mdd`` is :func:`min_detectable_difference` for ``pooled_sd`` and
    ``typical_n`` (the median n per arm); ``warnings`` are sentences for the report.
    """

    metric: str
    higher_is_better: bool
    reference: str
    alpha: float
    confidence: float
    power: float
    rows: tuple[ArmComparison, ...]
    missing: dict[str, int]
    pooled_sd: float
    typical_n: int
    mdd: float
    warnings: tuple[str, ...]

    def row(self, arm: str) -> ArmComparison:
        for row in self.rows:
            if row.arm == arm:
                return row
        raise KeyError(f"no arm {arm!r} in this comparison; arms: "
                       f"{', '.join(r.arm for r in self.rows)}")

    def to_frame(self) -> pd.DataFrame:
        """One line per arm (best first): the summary, Δ vs reference, p, Holm p, rank, group."""
        import pandas as pd

        nan = math.nan
        records: list[dict[str, Any]] = []
        for row in self.rows:
            s, w = row.summary, row.vs_reference
            records.append({
                "arm": s.arm, "n": s.n, "mean": s.mean, "std": s.std, "ci_low": s.ci_low,
                "ci_high": s.ci_high, "diff": nan if w is None else w.diff,
                "diff_low": nan if w is None else w.ci_low,
                "diff_high": nan if w is None else w.ci_high, "df": nan if w is None else w.df,
                "p": nan if w is None else w.p, "p_holm": row.p_holm,
                "significant": row.significant, "rank": row.rank, "group": row.group,
                "excluded": row.excluded, "reference": s.arm == self.reference,
            })
        return pd.DataFrame.from_records(records)


def compare_groups(
    groups: Mapping[str, npt.ArrayLike],
    reference: str,
    *,
    higher_is_better: bool,
    metric: str = "metric",
    excluded: Mapping[str, int] | None = None,
    alpha: float = ALPHA,
    confidence: float = 0.95,
    power: float = 0.8,
) -> Comparison:
    """Compare every arm's values with ``reference``'s: summaries, Welch tests, Holm across the
    ``k − 1`` comparisons, rank groups and the minimum detectable difference.

    ``groups`` maps arm names to their values (finite numbers); arms with no values are listed in
    :attr:`Comparison.missing`. ``excluded`` counts each arm's trials left out (for the report).
    """
    for level, name in ((alpha, "alpha"), (confidence, "confidence"), (power, "power")):
        _check_level(level, name)
    excluded = dict(excluded or {})
    arrays = {arm: _values(values, f"the values of arm {arm!r}") for arm, values in
              groups.items()}
    present = {arm: values for arm, values in arrays.items() if values.size}
    missing = {arm: excluded.get(arm, 0) for arm, values in arrays.items() if not values.size}
    if reference not in present:
        known = ", ".join(present) or "(none)"
        raise ValueError(f"the reference arm {reference!r} has no values of {metric}; arms "
                         f"with values: {known}")
    others = [arm for arm in present if arm != reference]
    tests = {arm: welch(present[arm], present[reference], confidence=confidence)
             for arm in others}
    adjusted = dict(zip(others, holm([tests[arm].p for arm in others])))
    ranking = rank_groups(present, higher_is_better=higher_is_better, alpha=alpha)
    rows = []
    for arm in sorted(present, key=lambda name: ranking[name][0]):
        p_holm = adjusted.get(arm, math.nan)
        rows.append(ArmComparison(
            summarize(present[arm], arm=arm, confidence=confidence), tests.get(arm), p_holm,
            bool(p_holm < alpha), *ranking[arm], excluded=excluded.get(arm, 0)))
    sizes = [values.size for values in present.values()]
    typical_n = int(np.median(sizes))
    sd = pooled_sd(present)
    mdd = min_detectable_difference(sd, typical_n, alpha=alpha, power=power)
    return Comparison(metric, higher_is_better, reference, alpha, confidence, power,
                      tuple(rows), missing, sd, typical_n, mdd,
                      tuple(_warnings(rows, tests, missing, sd, typical_n, mdd, power, alpha)))


def _warnings(rows: Sequence[ArmComparison], tests: Mapping[str, WelchResult],
              missing: Mapping[str, int], sd: float, typical_n: int, mdd: float, power: float,
              alpha: float) -> list[str]:
    out = []
    few = [f"{row.arm} (n={row.summary.n})" for row in rows if row.summary.n < FEW_SEEDS]
    if few:
        detect = (f"with n = {typical_n} per arm and pooled SD {sd:.3g}, only differences of "
                  f"about {mdd:.3g} or more would be detected with {power:.0%} power "
                  f"(α = {alpha}, normal approximation)" if math.isfinite(mdd) else
                  "the pooled SD is unknown, so no detectable difference can be given")
        where = (f"every arm (n = {n_range([row.summary.n for row in rows])})"
                 if len(few) == len(rows) else ", ".join(few))
        out.append(f"fewer than {FEW_SEEDS} values in {where}: intervals are wide and "
                   f"p-values fragile; {detect}.")
    for row in rows:
        if row.summary.note and row.summary.n == 1:
            out.append(f"{row.arm}: {row.summary.note}.")
    for arm, test in tests.items():
        if test.note:
            out.append(f"{arm} vs reference: {test.note}; p is NaN.")
    if missing:
        out.append("no values (excluded from the comparison): "
                   + ", ".join(f"{arm} ({count} trials excluded)" for arm, count in
                               missing.items()) + ".")
    return out


def n_range(sizes: Sequence[int]) -> str:
    """How the sample sizes of several arms read in a sentence: ``"5"``, ``"4–5"``, or ``"0"``
    for none."""
    if not sizes:
        return "0"
    low, high = min(sizes), max(sizes)
    return str(low) if low == high else f"{low}–{high}"


# -- adapters for the lab's frames ---------------------------------------------------------------


def _higher_is_better(trials: pd.DataFrame, metric: str) -> bool:
    if metric.endswith("_loss"):
        return False
    flags = trials["higher_is_better"].dropna().unique().tolist()
    if len(flags) != 1:
        raise ValueError(f"cannot tell which way {metric} is better: the done trials say "
                         f"higher_is_better = {flags or 'nothing'}; pass higher_is_better")
    return bool(flags[0])


def compare_arms(
    trials: pd.DataFrame,
    *,
    metric: str = "test_metric",
    reference: str | None = None,
    higher_is_better: bool | None = None,
    alpha: float = ALPHA,
    confidence: float = 0.95,
    power: float = 0.8,
) -> Comparison:
    """:func:`compare_groups` on the ``trials`` frame of a study (``docs/architecture.md``):
    done trials with a value of ``metric`` count; failed trials and done trials without the
    metric are excluded (counted per arm in ``excluded``); pending and running trials are not
    results yet and are neither used nor counted. Arms keep their
    order of first appearance; ``reference=None`` takes the first arm.

    ``higher_is_better`` defaults to the trials' own flag for metrics and False for losses.
    """
    if metric not in trials.columns:
        raise ValueError(f"no column {metric!r} in the trials frame; columns: "
                         f"{', '.join(map(str, trials.columns))}")
    arms = list(dict.fromkeys(trials["arm"].tolist()))
    if not arms:
        raise ValueError("the trials frame is empty: no arms to compare")
    usable = trials[(trials["status"] == "done") & trials[metric].notna()]
    if usable.empty:
        raise ValueError(f"no done trials with a value of {metric} to compare")
    if higher_is_better is None:
        higher_is_better = _higher_is_better(usable, metric)
    groups = {arm: usable.loc[usable["arm"] == arm, metric].to_numpy(np.float64) for arm in arms}
    finished = trials[trials["status"].isin(("done", "failed"))]
    counts = finished.groupby("arm", sort=False).size()
    excluded = {arm: int(counts.get(arm, 0)) - groups[arm].size for arm in arms}
    return compare_groups(groups, arms[0] if reference is None else reference,
                          higher_is_better=higher_is_better, metric=metric, excluded=excluded,
                          alpha=alpha, confidence=confidence, power=power)


def summarize_by(
    frame: pd.DataFrame, by: Sequence[str], value: str, *, confidence: float = 0.95
) -> pd.DataFrame:
    """Per group of ``by`` (first-appearance order): n, mean, std and t-interval of the finite
    values of column ``value`` — e.g. a learning curve per arm and epoch, or the measured shift
    per arm and BN depth. Groups without finite values are dropped."""
    import pandas as pd

    columns = [*by, "n", "mean", "std", "ci_low", "ci_high"]
    records = []
    finite = frame[np.isfinite(frame[value].to_numpy(np.float64))]
    for key, group in finite.groupby(list(by), sort=False):
        s = summarize(group[value].to_numpy(np.float64), confidence=confidence)
        keys = key if isinstance(key, tuple) else (key,)
        records.append((*keys, s.n, s.mean, s.std, s.ci_low, s.ci_high))
    return pd.DataFrame.from_records(records, columns=columns)


# -- epochs to a target --------------------------------------------------------------------------


def first_epoch_reaching(
    epochs: npt.ArrayLike, values: npt.ArrayLike, target: float, *, higher_is_better: bool
) -> float:
    """The first epoch (in epoch order) at which ``values`` reaches ``target`` (``>=`` when
    higher is better, ``<=`` otherwise); NaN if it never does. NaN values never reach it."""
    e = np.asarray(epochs, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if e.shape != v.shape:
        raise ValueError(f"epochs and values differ in length: {e.size} and {v.size}")
    order = np.argsort(e, kind="stable")
    e, v = e[order], v[order]
    with np.errstate(invalid="ignore"):
        reached = v >= target if higher_is_better else v <= target
    hits = np.flatnonzero(reached)
    return float(e[hits[0]]) if hits.size else math.nan


def epochs_to_target(
    epochs: pd.DataFrame, target: float, *, higher_is_better: bool, column: str = "test_metric"
) -> pd.DataFrame:
    """Per trial of an ``epochs`` frame: the first epoch whose ``column`` reaches ``target``
    (:func:`first_epoch_reaching`), NaN when it never does. Columns ``trial_id, arm, seed,
    epochs_to_target``, one row per trial in first-appearance order. Summarise it per arm with
    :func:`summarize_by` on the reached ones, and count the NaNs as "never reached"."""
    import pandas as pd

    if not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target}")
    records = [
        (trial_id, group["arm"].iloc[0], group["seed"].iloc[0],
         first_epoch_reaching(group["epoch"], group[column], target,
                              higher_is_better=higher_is_better))
        for trial_id, group in epochs.groupby("trial_id", sort=False)
    ]
    return pd.DataFrame.from_records(
        records, columns=["trial_id", "arm", "seed", "epochs_to_target"])
