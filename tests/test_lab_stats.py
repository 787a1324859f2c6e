"""The lab's statistics: t-intervals and Welch's test against scipy, Holm on a worked example,
rank groups, the few-seeds warning with the detectable difference, constant samples, failed
trials, and epochs to a target."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from varshift.lab.stats import (
    compare_arms,
    compare_groups,
    epochs_to_target,
    first_epoch_reaching,
    holm,
    min_detectable_difference,
    pooled_sd,
    rank_groups,
    summarize,
    summarize_by,
    welch,
)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_t_interval_matches_scipy(n: int) -> None:
    values = np.random.default_rng(n).normal(0.8, 0.05, n)
    summary = summarize(values, arm="a")
    low, high = sps.t.interval(0.95, n - 1, loc=values.mean(), scale=sps.sem(values))
    assert summary.n == n
    assert summary.mean == pytest.approx(values.mean())
    assert summary.std == pytest.approx(values.std(ddof=1))
    assert (summary.ci_low, summary.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert summary.values == pytest.approx(tuple(values))
    # A 90% interval is narrower: the confidence level is really used.
    assert summarize(values, confidence=0.9).half_width < summary.half_width


def test_one_value_has_no_interval_and_says_so() -> None:
    summary = summarize([0.7], arm="solo")
    assert summary.mean == 0.7
    assert math.isnan(summary.std)
    assert math.isnan(summary.ci_low)
    assert math.isnan(summary.ci_high)
    assert summary.note is not None
    assert "n = 1" in summary.note


def test_constant_values_give_a_zero_width_interval() -> None:
    summary = summarize([0.1, 0.1, 0.1])
    assert summary.std == 0.0
    assert summary.ci_low == summary.ci_high == pytest.approx(0.1)


def test_summarize_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        summarize([], arm="empty")
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, math.nan])
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        summarize([1.0, 2.0], confidence=95)


@pytest.mark.parametrize(("a", "b"), [
    ([1.0, 2.0, 3.5], [2.0, 3.0, 5.0, 7.0]),
    ([0.91, 0.92, 0.90, 0.93, 0.915], [0.85, 0.86, 0.84, 0.87]),
    ([5.0, 5.1, 4.9, 5.2, 5.05, 4.95, 5.0], [5.4, 5.6, 5.5]),
])
def test_welch_matches_scipy(a: list[float], b: list[float]) -> None:
    result = welch(a, b)
    expected = sps.ttest_ind(a, b, equal_var=False)
    assert result.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert result.t == pytest.approx(expected.statistic)
    assert result.p == pytest.approx(expected.pvalue)
    assert result.df == pytest.approx(expected.df)
    interval = expected.confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == pytest.approx((interval.low, interval.high))
    assert result.note is None


def test_welch_interval_against_the_formula() -> None:
    # Written out by hand (Welch–Satterthwaite), independent of scipy's result object.
    a, b = np.array([1.0, 2.0, 4.0]), np.array([3.0, 5.0, 6.0, 9.0])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    result = welch(a, b)
    assert result.df == pytest.approx(df)
    assert result.ci_high - result.ci_low == pytest.approx(2 * half)


def test_welch_on_constant_samples_is_nan_with_a_reason_and_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = welch([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
        one = welch([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
        tiny = welch([0.5], [1.0, 2.0])
    assert math.isnan(both.p)
    assert math.isnan(both.ci_low)
    assert both.diff == -1.0
    assert both.note is not None
    assert "constant" in both.note
    # Only one constant sample: its variance is 0 and Welch is well defined.
    assert math.isfinite(one.p)
    assert one.note is None
    # By hand: se² = 1/3 + 0, t = −1/√(1/3), df = 2.
    assert one.p == pytest.approx(2 * sps.t.sf(1 / math.sqrt(1 / 3), 2))
    assert one.df == pytest.approx(2.0)
    assert math.isnan(tiny.p)
    assert tiny.note is not None
    assert "n < 2" in tiny.note


def test_holm_worked_example() -> None:
    # p = [0.01, 0.04, 0.03, 0.005], m = 4. Ascending: 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1
    # = 0.02, 0.03, 0.06, 0.04; the running maximum makes the last 0.06. Back in input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Capped at 1, and monotone: 0.5·2 = 1.0 stays above 0.6·1.
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    # NaN tests are left out of m: [0.02, 0.04] is adjusted as if alone.
    adjusted = holm([0.02, math.nan, 0.04])
    assert adjusted[[0, 2]] == pytest.approx([0.04, 0.04])
    assert math.isnan(adjusted[1])
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="p-values"):
        holm([0.5, 1.5])


def test_rank_groups_tie_arms_the_data_cannot_separate() -> None:
    groups = {
        "wide": [0.80, 0.95, 0.70, 0.99, 0.85],    # mean 0.858, very noisy
        "best": [0.90, 0.91, 0.89, 0.90, 0.905],  # mean 0.901
        "worst": [0.60, 0.61, 0.59, 0.60, 0.605],
    }
    ranking = rank_groups(groups, higher_is_better=True)
    assert ranking == {"best": (1, 1), "wide": (2, 1), "worst": (3, 2)}
    # Lower is better: "worst" leads alone (0.60 vs 0.86 is significant even with wide's
    # spread); then "wide" leads group 2 and still cannot be told from "best".
    flipped = rank_groups(groups, higher_is_better=False)
    assert flipped == {"worst": (1, 1), "wide": (2, 2), "best": (3, 2)}


def test_equal_means_share_a_group_and_keep_their_order() -> None:
    ranking = rank_groups({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}, higher_is_better=True)
    assert ranking == {"a": (1, 1), "b": (2, 1)}


def test_minimum_detectable_difference() -> None:
    expected = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * 0.02 * math.sqrt(2 / 5)
    assert min_detectable_difference(0.02, 5) == pytest.approx(expected)
    assert min_detectable_difference(0.02, 5) == pytest.approx(0.0354, abs=1e-4)
    assert min_detectable_difference(0.02, 20) < min_detectable_difference(0.02, 5)
    assert pooled_sd([[1.0, 3.0], [2.0, 4.0, 6.0]]) == pytest.approx(math.sqrt((2 + 8) / 3))
    assert math.isnan(pooled_sd([[1.0], [2.0]]))


def test_few_seeds_warn_and_report_the_detectable_difference() -> None:
    groups = {"ref": [0.90, 0.91, 0.92], "other": [0.88, 0.90, 0.89]}
    comparison = compare_groups(groups, "ref", higher_is_better=True)
    sd = pooled_sd(list(groups.values()))
    mdd = min_detectable_difference(sd, 3)
    assert comparison.mdd == pytest.approx(mdd)
    assert comparison.typical_n == 3
    text = " ".join(comparison.warnings)
    assert "fewer than 5 values in every arm (n = 3)" in text
    assert f"{mdd:.3g}" in text
    one_short = compare_groups({**groups, "ref": groups["ref"] * 2}, "ref", higher_is_better=True)
    assert "fewer than 5 values in other (n=3):" in " ".join(one_short.warnings)
    enough = compare_groups({k: v + v[:2] for k, v in groups.items()}, "ref",
                            higher_is_better=True)
    assert not any("fewer than" in w for w in enough.warnings)


def test_compare_groups_rows_tests_and_holm() -> None:
    groups = {
        "ref": [0.90, 0.91, 0.92, 0.905, 0.915],
        "same": [0.906, 0.91, 0.915, 0.90, 0.92],
        "bad": [0.80, 0.81, 0.79, 0.82, 0.80],
    }
    comparison = compare_groups(groups, "ref", higher_is_better=True, excluded={"bad": 2})
    assert [row.arm for row in comparison.rows] == ["same", "ref", "bad"]  # best first
    p = {a: sps.ttest_ind(groups[a], groups["ref"], equal_var=False).pvalue
         for a in ("same", "bad")}
    # Holm with m = 2: the smaller p doubled, the larger one kept unless below that.
    first, second = sorted(p, key=p.__getitem__)
    expected_holm = {first: min(1.0, 2 * p[first])}
    expected_holm[second] = min(1.0, max(expected_holm[first], p[second]))
    for arm in ("same", "bad"):
        row = comparison.row(arm)
        assert row.p_holm == pytest.approx(expected_holm[arm])
        assert row.vs_reference is not None
        assert row.vs_reference.diff == pytest.approx(np.mean(groups[arm]) - np.mean(groups["ref"]))
    assert comparison.row("bad").significant
    assert not comparison.row("same").significant
    assert comparison.row("ref").vs_reference is None
    assert not comparison.row("ref").significant
    assert comparison.row("bad").excluded == 2
    assert comparison.row("bad").group == 2
    assert comparison.row("ref").group == 1
    frame = comparison.to_frame()
    assert frame["arm"].tolist() == ["same", "ref", "bad"]
    assert frame.loc[frame["arm"] == "ref", "reference"].item()
    with pytest.raises(KeyError, match="no arm 'nope'"):
        comparison.row("nope")


def test_constant_arms_do_not_crash_the_comparison() -> None:
    groups = {"ref": [1.0, 1.0, 1.0, 1.0, 1.0], "also": [1.0, 1.0, 1.0, 1.0, 1.0],
              "noisy": [0.9, 0.95, 1.0, 0.92, 0.97]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comparison = compare_groups(groups, "ref", higher_is_better=True)
    also = comparison.row("also")
    assert also.vs_reference is not None
    assert math.isnan(also.vs_reference.p)
    assert math.isnan(also.p_holm)
    assert not also.significant
    assert any("also vs reference" in w and "constant" in w for w in comparison.warnings)
    # Holm's m counts only the one test that could be done.
    noisy = comparison.row("noisy")
    assert noisy.vs_reference is not None
    assert noisy.p_holm == pytest.approx(noisy.vs_reference.p)


def trials_frame() -> pd.DataFrame:
    rows = []
    values = {"ref": [0.90, 0.91, 0.92], "b": [0.80, 0.82, None], "c": [None, None, None]}
    for arm, metrics in values.items():
        for seed, metric in enumerate(metrics):
            failed = metric is None
            rows.append({"trial_id": len(rows) + 1, "arm": arm, "seed": seed,
                         "status": "failed" if failed else "done", "metric_name": "accuracy",
                         "higher_is_better": True,
                         "test_metric": math.nan if failed else metric,
                         "test_loss": math.nan if failed else 1 - metric})
    rows.append({**rows[0], "trial_id": 99, "seed": 9, "status": "pending",
                 "test_metric": math.nan})
    return pd.DataFrame(rows)


def test_compare_arms_excludes_and_counts_failed_trials() -> None:
    frame = trials_frame()
    comparison = compare_arms(frame)
    assert comparison.reference == "ref"  # the first arm
    assert comparison.higher_is_better
    assert comparison.row("ref").summary.n == 3
    # The pending trial of "ref" is not a result yet: neither used nor counted as excluded.
    assert comparison.row("ref").excluded == 0
    assert comparison.row("b").summary.n == 2
    assert comparison.row("b").excluded == 1
    assert comparison.missing == {"c": 3}
    assert any("c (3 trials excluded)" in w for w in comparison.warnings)
    # Losses are lower-is-better whatever the trials' flag says.
    loss = compare_arms(frame, metric="test_loss", reference="b")
    assert not loss.higher_is_better
    assert [row.arm for row in loss.rows] == ["ref", "b"]


def test_compare_arms_errors() -> None:
    frame = trials_frame()
    with pytest.raises(ValueError, match="reference arm 'c' has no values"):
        compare_arms(frame, reference="c")
    with pytest.raises(ValueError, match="no column 'accuracy'"):
        compare_arms(frame, metric="accuracy")
    with pytest.raises(ValueError, match="no done trials"):
        compare_arms(frame.assign(status="failed"))
    with pytest.raises(ValueError, match="empty"):
        compare_arms(frame.iloc[:0])


def test_summarize_by_groups_in_first_appearance_order() -> None:
    frame = pd.DataFrame({"arm": ["b", "b", "a", "a", "a"], "epoch": [1, 1, 1, 1, 2],
                          "value": [1.0, 3.0, 2.0, math.nan, 5.0]})
    out = summarize_by(frame, ["arm", "epoch"], "value")
    assert out[["arm", "epoch", "n"]].values.tolist() == [["b", 1, 2], ["a", 1, 1], ["a", 2, 1]]
    assert out["mean"].tolist() == [2.0, 2.0, 5.0]
    # b's values 1 and 3: s = √2, so the half-width is t(0.975, 1)·√2/√2.
    assert out.loc[0, "ci_high"] == pytest.approx(2 + sps.t.ppf(0.975, 1))


def test_first_epoch_reaching_a_target() -> None:
    assert first_epoch_reaching([1, 2, 3, 4], [0.5, 0.7, 0.9, 0.95], 0.9,
                                higher_is_better=True) == 3.0
    # Unsorted records, and a NaN that must not count as reaching it.
    assert first_epoch_reaching([3, 1, 2], [0.9, math.nan, 0.95], 0.9,
                                higher_is_better=True) == 2.0
    assert math.isnan(first_epoch_reaching([1, 2], [0.5, 0.6], 0.9, higher_is_better=True))
    assert first_epoch_reaching([1, 2, 3], [1.0, 0.4, 0.1], 0.5, higher_is_better=False) == 2.0
    with pytest.raises(ValueError, match="differ in length"):
        first_epoch_reaching([1, 2], [0.5], 0.9, higher_is_better=True)


def test_epochs_to_target_per_trial() -> None:
    curves = {1: ("a", [0.5, 0.8, 0.9]), 2: ("a", [0.85, 0.9, 0.95]), 3: ("b", [0.2, 0.3, 0.4])}
    frame = pd.DataFrame([
        {"trial_id": trial, "arm": arm, "seed": trial, "epoch": epoch, "test_metric": value}
        for trial, (arm, values) in curves.items() for epoch, value in enumerate(values, 1)
    ])
    out = epochs_to_target(frame, 0.85, higher_is_better=True)
    assert out["trial_id"].tolist() == [1, 2, 3]
    assert out["epochs_to_target"].tolist()[:2] == [3.0, 1.0]
    assert math.isnan(out["epochs_to_target"].iloc[2])
    mse = frame.assign(test_metric=1 - frame["test_metric"])
    assert epochs_to_target(mse, 0.151, higher_is_better=False)["epochs_to_target"].tolist()[:2] \
        == [3.0, 1.0]
    with pytest.raises(ValueError, match="finite"):
        epochs_to_target(frame, math.nan, higher_is_better=True)
