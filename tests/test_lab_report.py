"""Study reports: the files, the numbers in them (computed again here, independently), a
self-contained HTML page, the reference-arm fallbacks, the one-line errors, and a report read
from a real results store.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from scipy import stats as sps

from helpers.report_frames import (
    ARMS,
    BEFORE,
    EPOCHS,
    PNG,
    RECAL_GAIN,
    REF,
    UOUT,
    curve,
    make_frames,
    shift_ratio,
)
from varshift.lab.report import ReportContext, ReportPaths, build_report, write_report
from varshift.lab.report_plots import plot_metric
from varshift.lab.results import EpochRecord, LayerShiftRecord, TrialResult
from varshift.lab.stats import compare_groups
from varshift.lab.store import ResultStore


def done_values(arm: str, gain: float = 0.0) -> np.ndarray:
    return np.array([v + gain for v in ARMS[arm] if v is not None])


def expected_cells(arm: str, gain: dict[str, float] | None = None) -> str:
    """The Markdown cells from the arm to `significant`, computed here with numpy and scipy."""
    gain = gain or {}
    x = done_values(arm, gain.get(arm, 0.0))
    half = sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    head = f"| {arm} | {x.size} | {x.mean():.4g} ± {half:.2g} | {x.std(ddof=1):.2g} |"
    if arm == REF:
        return head + " reference | — | — | — |"
    ref = done_values(REF, gain.get(REF, 0.0))
    test = sps.ttest_ind(x, ref, equal_var=False)
    interval = test.confidence_interval(0.95)
    others = {a: sps.ttest_ind(done_values(a, gain.get(a, 0.0)), ref, equal_var=False).pvalue
              for a in ARMS if a != REF}
    # Holm with m = 2, written out: the smaller p doubled, the larger kept unless below that.
    smaller = min(others.values())
    p_holm = min(1.0, 2 * smaller) if test.pvalue == smaller else max(min(1.0, 2 * smaller),
                                                                        test.pvalue)
    significant = "yes" if p_holm < 0.05 else "no"
    delta = f"{x.mean() - ref.mean():+.3g} [{interval.low:+.3g}, {interval.high:+.3g}]"
    return head + f" {delta} | {test.pvalue:.3g} | {p_holm:.3g} | {significant} |"


def md_row(markdown: str, arm: str, section: int = 0) -> str:
    """The table line of ``arm`` in the ``section``-th table that lists it."""
    lines = [line for line in markdown.splitlines() if f"| {arm} |" in line]
    return lines[section]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    context = ReportContext(preset="quick", description="Dropout <before> BN & after",
                            source="results.db", reference=REF)
    return build_report(make_frames(), "placement", tmp_path_factory.mktemp("report"),
                        context=context, target=0.895)


def test_files_exist_and_are_nontrivial(report: ReportPaths) -> None:
    assert report.markdown.name == "report.md"
    assert report.html.name == "report.html"
    assert [p.name for p in report.plots] == ["metric.png", "curves.png", "shift.png"]
    for plot in report.plots:
        data = plot.read_bytes()
        assert data.startswith(PNG)
        assert len(data) > 10_000
        height, width, _ = mpimg.imread(io.BytesIO(data)).shape
        assert height > 200
        assert width > 400
    assert len(report.markdown.read_text()) > 2_000


def test_markdown_has_every_arm_with_its_numbers(report: ReportPaths) -> None:
    markdown = report.markdown.read_text()
    assert "# Study report: placement" in markdown
    assert "preset: quick" in markdown
    assert f"reference arm: {REF} (stored with the study)" in markdown
    assert "trials: 15 (14 done, 1 failed)" in markdown
    for arm in ARMS:
        assert expected_cells(arm) in md_row(markdown, arm)
    # Best first: REF (mean 0.915), UOUT (0.91), BEFORE (0.855).
    first_table = [line.split(" | ")[1] for line in markdown.splitlines()
                   if line.startswith(("| 1 |", "| **1** |", "| 2 |", "| 3 |"))][:3]
    assert first_table == [REF, UOUT, BEFORE]
    # The reference row is bold; the failed trial is counted as excluded for BEFORE.
    assert md_row(markdown, REF).startswith("| **1** |")
    assert md_row(markdown, BEFORE).endswith("| 2 | 1 |")


def test_markdown_has_the_recalibrated_metric(report: ReportPaths) -> None:
    markdown = report.markdown.read_text()
    assert "## Test accuracy after BN recalibration" in markdown
    for arm in ARMS:
        assert expected_cells(arm, RECAL_GAIN) in md_row(markdown, arm, section=1)


def test_markdown_power_warning_target_shift_and_failures(report: ReportPaths) -> None:
    markdown = report.markdown.read_text()
    # BEFORE has 4 values: the few-seeds warning names it, with the detectable difference.
    groups = [done_values(arm) for arm in ARMS]
    pooled = math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups)
                       / sum(g.size - 1 for g in groups))
    mdd = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * pooled * math.sqrt(2 / 5)
    assert f"**Warning:** fewer than 5 values in {BEFORE} (n=4):" in markdown
    assert f"a difference of about {mdd:.3g} is detected with 80% power" in markdown
    # Epochs to 0.895: REF and UOUT reach it at the last epoch, BEFORE never.
    assert f"| {REF} | 5/5 | 4 ± 0 |" in markdown
    assert f"| {BEFORE} | 0/4 | never |" in markdown
    # Shift table: BEFORE (index 1) at depth 2, over its 4 done seeds, with the prediction.
    ratios = np.array([shift_ratio(1, 2, seed) for seed in (0, 1, 3, 4)])
    half = sps.t.ppf(0.975, 3) * ratios.std(ddof=1) / 2
    assert f"{ratios.mean():.4g} ± {half:.2g} (theory {1 - 0.06:.4g})" in md_row(markdown, BEFORE,
                                                                                  section=3)
    # Trial 8 = seed 2 of the second arm (seed-major, three arms); only the message's first line.
    assert f"| 8 | {BEFORE} | 2 | RuntimeError: CUDA out of memory |" in markdown
    for name in ("metric.png", "curves.png", "shift.png"):
        assert f"]({name})" in markdown


def test_html_is_self_contained_with_valid_inline_images(report: ReportPaths) -> None:
    page = report.html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.IGNORECASE)
    assert "<link" not in page
    assert "<script" not in page
    assert "url(" not in page  # no CSS fetches either
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data.startswith(PNG)
        assert mpimg.imread(io.BytesIO(data)).shape[0] > 200
    # The same content as the Markdown: every arm, tables, the highlighted reference row, and
    # text escaped rather than interpreted.
    for arm in ARMS:
        assert arm in page
    assert page.count("<table>") == 5
    assert '<tr class="highlight"><td class="num">1</td><td class="wide">' + REF in page
    assert "Dropout &lt;before&gt; BN &amp; after" in page


def fallback_report(tmp_path: Path, frames: dict[str, pd.DataFrame], **kwargs: Any) -> str:
    paths = build_report(frames, "s", tmp_path, **kwargs)
    assert [p.name for p in paths.plots] == ["metric.png"]
    return paths.markdown.read_text()


def test_without_curves_shifts_or_reference(tmp_path: Path) -> None:
    (tmp_path / "shift.png").write_bytes(PNG)  # from an earlier report: must not linger
    frames = make_frames(curves=False, shifts=False)
    markdown = fallback_report(tmp_path, frames)
    assert not (tmp_path / "shift.png").exists()
    assert "No epoch records were stored" in markdown
    assert "No layer shifts were measured" in markdown
    assert f"no reference arm is known for this study: comparing with the first arm, '{REF}'" \
        in markdown
    assert f"reference arm: {REF} (first arm)" in markdown


def test_a_reference_without_values_falls_back_with_a_note(tmp_path: Path) -> None:
    arms = {**ARMS, "dead": [None] * 5}
    markdown = fallback_report(tmp_path, make_frames(arms, curves=False, shifts=False),
                               reference="dead")
    assert "the reference arm 'dead' has no done trial with `test_metric`" in markdown
    assert f"reference arm: {REF} (instead of dead, which has no values)" in markdown
    # The dead arm is still listed, with its five excluded trials.
    assert "| — | dead | 0 | n/a | n/a | n/a | — | — | — | — | 5 |" in markdown


def test_one_line_errors(tmp_path: Path) -> None:
    frames = make_frames(curves=False, shifts=False)
    empty = {**frames, "trials": frames["trials"].iloc[:0]}
    with pytest.raises(ValueError, match=r"^study 'x' has no trials$"):
        build_report(empty, "x", tmp_path)
    pending = {**frames, "trials": frames["trials"].assign(status="pending")}
    with pytest.raises(ValueError, match=r"^study 'x' has no done trials yet \(15 pending\)"):
        build_report(pending, "x", tmp_path)
    with pytest.raises(ValueError, match="reference arm 'nope' is not an arm"):
        build_report(frames, "x", tmp_path, reference="nope")
    with pytest.raises(ValueError, match="metric must be one of"):
        build_report(frames, "x", tmp_path, metric="accuracy")
    assert not (tmp_path / "report.md").exists()


def test_metric_figure_grows_with_the_number_of_arms(tmp_path: Path) -> None:
    def height(count: int) -> int:
        groups = {f"arm{i} with a rather long label=value{i} and more=words": [0.9 - 0.01 * i,
                  0.91 - 0.01 * i, 0.905 - 0.01 * i] for i in range(count)}
        comparison = compare_groups(groups, next(iter(groups)), higher_is_better=True)
        path = plot_metric([("test accuracy", comparison)], tmp_path / f"m{count}.png")
        return int(mpimg.imread(path).shape[0])

    few, many = height(3), height(20)
    # About 0.42 inch per arm at 110 dpi: 17 more arms add roughly 780 pixels.
    assert many - few > 600


# -- from a real results store -------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (arm, seed) cell as the store registers it (TrialLike)."""

    arm: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return f"hash-{self.arm}"


def trial_result(final: float | None, arm_index: int) -> TrialResult:
    if final is None:
        return TrialResult("failed", "accuracy", True, 1.0, error="RuntimeError: boom",
                           traceback="Traceback ...")
    return TrialResult(
        "done", "accuracy", True, 2.5,
        epochs=tuple(EpochRecord(e, 1.0 / e, 1.0 / e, curve(final, e))
                     for e in range(1, EPOCHS + 1)),
        final={"test_metric": final, "test_loss": 1 - final},
        layer_shift=(LayerShiftRecord("bn", 1, 1.0, shift_ratio(arm_index, 1, 0), 1.0,
                                      shift_ratio(arm_index, 1, 0)),),
    )


def fill_store(path: Path, study: str, spec: dict[str, Any], arms: Sequence[str]) -> None:
    """Register ``arms`` × the seeds of ARMS and finish every trial with ARMS' numbers."""
    cells = [Cell(arm, seed, {"arm": arm}, {"order": arm.split()[0]})
             for seed in range(5) for arm in arms]
    with ResultStore(path) as store:
        store.register(study, "quick", f"spec-{study}", spec, cells)
        for trial in store.trials(study):
            assert store.claim(trial.id)
            store.finish(trial.id, trial_result(ARMS[trial.arm][trial.seed],
                                                list(ARMS).index(trial.arm)))


def test_report_from_a_real_store(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    spec = {"name": "mini", "description": "three arms", "preset": "quick",
            "reference_arm": UOUT}
    fill_store(db, "mini", spec, list(ARMS))
    with ResultStore(db) as store:  # a second study, registered but never run
        store.register("idle", "quick", "spec-idle", {}, [Cell(REF, 0)])
    paths = write_report(db, "mini", tmp_path / "out")
    markdown = paths.markdown.read_text()
    assert f"reference arm: {UOUT} (stored with the study)" in markdown
    assert "three arms" in markdown
    assert f"results database: `{db}`" in markdown
    assert "trials: 15 (14 done, 1 failed)" in markdown
    # The numbers went through SQLite and back: REF's row against the stored reference UOUT.
    x, ref = done_values(REF), done_values(UOUT)
    test = sps.ttest_ind(x, ref, equal_var=False)
    assert f"| {REF} | 5 | {x.mean():.4g} ± " in markdown
    assert f"| {x.mean() - ref.mean():+.3g} [" in md_row(markdown, REF)
    assert f"| {test.pvalue:.3g} |" in md_row(markdown, REF)
    assert "after BN recalibration" not in markdown  # no recal values were stored
    assert [p.name for p in paths.plots] == ["metric.png", "curves.png", "shift.png"]
    # An explicit reference wins over the stored one.
    again = write_report(db, "mini", tmp_path / "out2", reference=REF).markdown.read_text()
    assert f"reference arm: {REF} (given)" in again

    with pytest.raises(ValueError, match=r"^no study named 'nope' in .*; it has: idle, mini$"):
        write_report(db, "nope", tmp_path / "x")
    with pytest.raises(ValueError, match=r"^study 'idle' has no done trials yet \(1 pending\)"):
        write_report(db, "idle", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no results database"):
        write_report(tmp_path / "missing.db", "mini", tmp_path / "x")
    assert not (tmp_path / "missing.db").exists()


def test_reference_from_the_builtin_study_when_the_store_has_none(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    # A store written without the reference: the built-in "example" study defines it (REF).
    fill_store(db, "example", {"cells": []}, [UOUT, REF])
    markdown = write_report(db, "example", tmp_path / "out").markdown.read_text()
    assert f"reference arm: {REF} (from the built-in study definition)" in markdown


def test_a_loss_report_keeps_the_curves_direction(tmp_path: Path) -> None:
    # Arms compared on the loss (lower is better), while the curves and the target are the
    # per-epoch accuracy (higher is better): the target must not flip with the table.
    paths = build_report(make_frames(shifts=False), "s", tmp_path, metric="test_loss",
                         reference=REF, target=0.895)
    markdown = paths.markdown.read_text()
    assert "metric: test loss (`test_loss`; lower is better)" in markdown
    assert f"| {REF} | 5/5 | 4 ± 0 |" in markdown
    assert f"| {BEFORE} | 0/4 | never |" in markdown
    # Best first by loss: BEFORE's loss is highest, so it is ranked last.
    assert md_row(markdown, BEFORE).startswith("| 3 |")


@pytest.mark.parametrize("target", [math.nan, math.inf, -math.inf])
def test_a_target_that_is_not_finite_writes_nothing(tmp_path: Path, target: float) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^target must be a finite number, got"):
        build_report(make_frames(), "x", out, target=target)
    with pytest.raises(ValueError, match=r"^target must be a finite number, got"):
        write_report(tmp_path / "missing.db", "x", out, target=target)  # refused before reading
    assert not out.exists()


def test_done_trials_per_arm_name_the_arms_without_any(tmp_path: Path) -> None:
    frames = make_frames({**ARMS, "queued": [0.5] * 5, "waiting": [0.5] * 5}, curves=False,
                         shifts=False)
    trials = frames["trials"]
    trials.loc[trials["arm"].isin(["queued", "waiting"]), "status"] = "pending"
    paths = build_report({**frames, "trials": trials}, "partial", tmp_path)
    markdown = paths.markdown.read_text()
    # REF and UOUT have 5 done trials, BEFORE 4 (one failed); the two pending arms have none.
    assert ("arms: 5; done trials per arm: 4–5 (2 arms have none: `queued`, `waiting`)"
            in markdown)
    assert "| — | queued | 0 | n/a |" in markdown
