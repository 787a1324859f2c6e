"""Study reports: every arm against the reference arm, with intervals and corrected tests.

:func:`write_report` reads one study from a results database and writes, into one folder,
``report.md`` (Markdown), ``report.html`` (the same content in one self-contained page: CSS
inline, images as data URIs) and the PNG figures ``metric.png``, ``curves.png`` and
``shift.png``. :func:`build_report` does the same from the lab's data frames
(``docs/architecture.md``, "Lab data frames"), so reports can be made from exported files too.

The statistics are those of :mod:`varshift.lab.stats`: per-arm t-intervals, Welch's test of each
arm against the reference with Holm's correction, rank groups and the minimum detectable
difference. The format of the report is documented in ``docs/lab-reports.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.lab.report_doc import (
    Block,
    Bullets,
    Heading,
    Image,
    Table,
    Text,
    to_html,
    to_markdown,
)
from varshift.lab.stats import (
    Comparison,
    compare_arms,
    epochs_to_target,
    n_range,
    summarize_by,
)
from varshift.lab.store_schema import STATUSES

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "METRICS",
    "PLOT_NAMES",
    "ReportContext",
    "ReportPaths",
    "build_report",
    "check_report_options",
    "write_report",
]

#: The columns of the trials frame a report can compare arms on.
METRICS = ("test_metric", "test_loss", "recal_test_metric", "recal_test_loss")
#: The same figure before and after BN recalibration: reported side by side when both exist.
_PARTNER = {"test_metric": "recal_test_metric", "recal_test_metric": "test_metric",
            "test_loss": "recal_test_loss", "recal_test_loss": "test_loss"}
PLOT_NAMES = ("metric.png", "curves.png", "shift.png")


@dataclass(frozen=True)
class ReportPaths:
    """The files one report wrote (``plots`` lists only the figures there was data for)."""

    markdown: Path
    html: Path
    plots: tuple[Path, ...]


@dataclass(frozen=True)
class ReportContext:
    """What is known of the study beyond its frames (all optional): the preset(s), the
    description, the database it came from, and the reference arm stored with the study with a
    few words on where it came from (shown in the report)."""

    preset: str | None = None
    description: str = ""
    source: str | None = None
    reference: str | None = None
    reference_from: str = "stored with the study"


def check_report_options(*, metric: str, target: float | None) -> None:
    """Refuse, in one line, a ``metric`` a report cannot compare or a ``target`` that is not a
    finite number. :func:`write_report` and :func:`build_report` call it before they read or
    write anything, so a refused report leaves no file behind."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or not math.isfinite(target)):
        raise ValueError(f"target must be a finite number, got {target!r}")


def write_report(
    db_path: str | os.PathLike[str],
    study: str,
    out_dir: str | os.PathLike[str],
    *,
    metric: str = "test_metric",
    reference: str | None = None,
    preset: str | None = None,
    target: float | None = None,
) -> ReportPaths:
    """Write the report of ``study`` (every preset, or only ``preset``) from the results
    database ``db_path`` into ``out_dir`` (created); returns the paths written.

    The reference arm is ``reference`` if given, else the one stored with the study in the
    database, else the built-in study's definition, else the first arm (the report says which).
    ``target`` adds a table of the epochs each arm needs to reach that test metric. Raises
    ``FileNotFoundError`` for a missing database and ``ValueError`` (one line) for an unknown
    study, a study without trials or without done trials, an unknown ``metric`` and a
    ``target`` that is not finite; nothing is written when it refuses.
    """
    from varshift.lab.store import ResultStore

    check_report_options(metric=metric, target=target)
    with ResultStore(db_path, create=False) as store:
        frames = store.frames(study, preset)
        presets = [preset] if preset is not None else store.presets(study)
        specs = [store.spec(study, name)[1] for name in presets]
    stored = list(dict.fromkeys(str(spec["reference_arm"]) for spec in specs
                                if spec.get("reference_arm")))
    stored_reference, reference_from = (stored[0], "stored with the study") if stored else \
        _builtin_reference(study, presets)
    if len(stored) > 1:
        reference_from += f" (presets disagree: {', '.join(stored)}; the first is used)"
    descriptions = [str(spec["description"]) for spec in specs if spec.get("description")]
    context = ReportContext(", ".join(presets), descriptions[0] if descriptions else "",
                            str(db_path), stored_reference, reference_from)
    return build_report(frames, study, out_dir, metric=metric, reference=reference,
                        context=context, target=target)


def _builtin_reference(study: str, presets: Sequence[str]) -> tuple[str | None, str]:
    """A database written before the reference was stored: ask the study's definition."""
    from varshift.lab.study import DEFAULT_PRESET, load_study

    try:
        return (load_study(study).reference_arm(presets[0] if presets else DEFAULT_PRESET),
                "from the built-in study definition")
    except ValueError:  # ConfigError: no such built-in study, or no such preset
        return None, "not stored"


def build_report(
    frames: Mapping[str, pd.DataFrame],
    study: str,
    out_dir: str | os.PathLike[str],
    *,
    metric: str = "test_metric",
    reference: str | None = None,
    context: ReportContext | None = None,
    target: float | None = None,
) -> ReportPaths:
    """Write the report of ``study`` from its data frames (``trials``, ``epochs``,
    ``layer_shift``; the last two may be empty) into ``out_dir``; see :func:`write_report`.

    ``reference`` must name an arm; without it, ``context.reference`` (or the first arm) is
    used, with a note in the report. A reference without values of ``metric`` (all its trials
    failed) is replaced by the first arm that has some, also with a note.
    """
    check_report_options(metric=metric, target=target)
    context = context or ReportContext()
    trials = frames["trials"]
    if trials.empty:
        raise ValueError(f"study {study!r} has no trials")
    counts = {status: int((trials["status"] == status).sum()) for status in STATUSES}
    if counts["done"] == 0:
        raise ValueError(f"study {study!r} has no done trials yet ({_count_text(counts)}); "
                         "run it before reporting")
    arms = list(dict.fromkeys(trials["arm"].tolist()))
    chosen, where, notes = _choose_reference(trials, arms, metric, reference, context)
    done = trials[trials["status"] == "done"]
    name = str(done["metric_name"].dropna().iloc[0]) if done["metric_name"].notna().any() \
        else "metric"
    panels = [(_metric_label(metric, name), compare_arms(trials, metric=metric,
                                                         reference=chosen))]
    partner = _PARTNER[metric]
    if done[partner].notna().any():
        if (done.loc[done["arm"] == chosen, partner].notna()).any():
            panels.append((_metric_label(partner, name),
                           compare_arms(trials, metric=partner, reference=chosen)))
        else:
            notes.append(f"the reference arm has no `{partner}` values: that table is left out.")
    order = [row.arm for row in panels[0][1].rows]
    order += [arm for arm in arms if arm not in order]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_ids = set(done["trial_id"].tolist())
    epochs = _of_done(frames.get("epochs"), done_ids)
    shift = _of_done(frames.get("layer_shift"), done_ids)
    figures = _figures(out, panels, epochs, shift, order, chosen, f"test {name}")

    blocks = _overview(study, context, panels, counts, trials, notes, where)
    for label, comparison in panels:
        blocks += _comparison_section(label, comparison)
    blocks.append(Image(figures["metric.png"], "Each arm's mean with its 95% t-interval (seeds "
                        "as dots); the reference arm in red, dashed at its mean; gN = rank group."))
    # The curves (and the target) are always the per-epoch test metric, whatever the table
    # compares: its direction is the trials' own flag, not the chosen metric's.
    flags = done["higher_is_better"].dropna()
    curve_higher = bool(flags.iloc[0]) if len(flags) else True
    blocks += _curves_section(epochs, figures, order, target, curve_higher)
    blocks += _shift_section(shift, figures, order)
    blocks += _failures_section(trials)

    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(to_markdown(blocks), encoding="utf-8")
    page.write_text(to_html(blocks, f"varshift study report: {study}"), encoding="utf-8")
    return ReportPaths(markdown, page, tuple(figures.values()))


# -- choosing and labelling ----------------------------------------------------------------------


def _count_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in counts.items() if count) or "none"


def _metric_label(metric: str, name: str) -> str:
    base = "test loss" if metric.endswith("_loss") else f"test {name}"
    return f"{base} after BN recalibration" if metric.startswith("recal_") else base


def _choose_reference(trials: pd.DataFrame, arms: Sequence[str], metric: str,
                      reference: str | None,
                      context: ReportContext) -> tuple[str, str, list[str]]:
    """The reference arm, where it came from, and notes explaining any fallback."""
    if reference is not None and reference not in arms:
        raise ValueError(f"reference arm {reference!r} is not an arm of this study; arms: "
                         f"{', '.join(arms)}")
    notes: list[str] = []
    chosen, where = reference, "given"
    if chosen is None and context.reference is not None:
        if context.reference in arms:
            chosen, where = context.reference, context.reference_from
        else:
            notes.append(f"the stored reference arm {context.reference!r} has no trials here.")
    usable = trials[(trials["status"] == "done") & trials[metric].notna()]
    with_values = [arm for arm in arms if (usable["arm"] == arm).any()]
    if chosen is None:
        notes.append(f"no reference arm is known for this study: comparing with the first arm, "
                     f"{with_values[0]!r}.")
        return with_values[0], "first arm", notes
    if chosen not in with_values:
        notes.append(f"the reference arm {chosen!r} has no done trial with `{metric}`: comparing "
                     f"with the first arm that has, {with_values[0]!r}.")
        return with_values[0], f"instead of {chosen}, which has no values", notes
    return chosen, where, notes


def _of_done(frame: pd.DataFrame | None, done_ids: set[int]) -> pd.DataFrame | None:
    if frame is None or frame.empty:
        return None
    kept = frame[frame["trial_id"].isin(done_ids)]
    return None if kept.empty else kept


# -- number formatting (the tests format their own numbers with the same rules) ------------------


def _num(value: float, spec: str = ".4g") -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


def _mean_ci(mean: float, low: float, high: float) -> str:
    return f"{_num(mean)} ± {_num((high - low) / 2, '.2g')}"


# -- sections ------------------------------------------------------------------------------------


def _overview(study: str, context: ReportContext, panels: Sequence[tuple[str, Comparison]],
              counts: Mapping[str, int], trials: pd.DataFrame, notes: Sequence[str],
              where: str) -> list[Block]:
    main = panels[0][1]
    blocks: list[Block] = [Heading(f"Study report: {study}", 1)]
    if context.description:
        blocks.append(Text(context.description))
    better = "higher" if main.higher_is_better else "lower"
    items = [f"preset: {context.preset}" if context.preset else "",
             f"results database: `{context.source}`" if context.source else "",
             f"metric: {panels[0][0]} (`{main.metric}`; {better} is better)",
             f"reference arm: {main.reference} ({where})",
             f"trials: {len(trials)} ({_count_text(counts)})",
             _done_per_arm_text(trials),
             _wall_time_text(trials)]
    blocks.append(Bullets(tuple(item for item in items if item)))
    warnings = [*notes, *main.warnings]
    for label, comparison in panels[1:]:
        # The same sentence for both metrics (e.g. the same few seeds) is said once.
        warnings += [f"{label}: {warning}" for warning in comparison.warnings
                     if warning not in main.warnings]
    if counts["failed"]:
        warnings.append(f"failed trials excluded from every statistic: {counts['failed']} "
                        "(listed at the end).")
    if warnings:
        blocks.append(Bullets(tuple(warnings), kind="warning"))
    return blocks


def _done_per_arm_text(trials: pd.DataFrame) -> str:
    """The done trials per arm over every arm of the study, naming the arms that have none
    (a partial run must not read as if every arm had data)."""
    arms = list(dict.fromkeys(trials["arm"].tolist()))
    done = trials[trials["status"] == "done"].groupby("arm").size()
    per_arm = [int(done.get(arm, 0)) for arm in arms]
    empty = [arm for arm, n in zip(arms, per_arm) if n == 0]
    with_data = [n for n in per_arm if n > 0]
    text = f"arms: {len(arms)}; done trials per arm: {n_range(with_data)}"
    if empty:
        listed = ", ".join(f"`{arm}`" for arm in empty)
        text += f" ({len(empty)} {'arm has' if len(empty) == 1 else 'arms have'} none: {listed})"
    return text


def _wall_time_text(trials: pd.DataFrame) -> str:
    times = trials.loc[trials["status"].isin(["done", "failed"]), "wall_time_s"].dropna()
    if times.empty:
        return ""
    return (f"compute time: {times.sum():.1f} s in {len(times)} finished trials "
            f"(mean {times.mean():.1f} s per trial)")


def _comparison_section(label: str, comparison: Comparison) -> list[Block]:
    level = f"{comparison.confidence:.0%}"
    header = ("rank", "arm", "n", f"mean ± {level} CI", "std", f"Δ vs reference [{level} CI]",
              "p", "p (Holm)", "significant", "group", "excluded")
    rows = []
    for row in comparison.rows:
        s, w = row.summary, row.vs_reference
        if w is None:
            delta, p, p_holm, significant = "reference", "—", "—", "—"
        else:
            delta = f"{_num(w.diff, '+.3g')} [{_num(w.ci_low, '+.3g')}, {_num(w.ci_high, '+.3g')}]"
            p, p_holm = _num(w.p, ".3g"), _num(row.p_holm, ".3g")
            significant = "yes" if row.significant else "no"
        rows.append((str(row.rank), row.arm, str(s.n), _mean_ci(s.mean, s.ci_low, s.ci_high),
                     _num(s.std, ".2g"), delta, p, p_holm, significant, str(row.group),
                     str(row.excluded)))
    rows += [("—", arm, "0", "n/a", "n/a", "n/a", "—", "—", "—", "—", str(count))
             for arm, count in comparison.missing.items()]
    highlight = frozenset(i for i, row in enumerate(rows) if row[1] == comparison.reference)
    k = len(comparison.rows) - 1
    blocks: list[Block] = [
        Heading(label[0].upper() + label[1:]),
        Text(f"`{comparison.metric}`, best first. Δ is arm − reference with its Welch interval; "
             f"p is Welch's t-test against the reference, Holm-adjusted across the {k} "
             f"comparisons; significant means p (Holm) < {comparison.alpha}. Arms in group 1 "
             "are not shown to differ from the best arm; later groups repeat this among the "
             "rest. `excluded` counts failed trials and done trials without this metric."),
        Table(header, tuple(rows), highlight),
    ]
    if math.isfinite(comparison.mdd):
        blocks.append(Text(
            f"Power: with n = {comparison.typical_n} per arm and a pooled standard deviation of "
            f"{_num(comparison.pooled_sd, '.3g')}, a difference of about "
            f"{_num(comparison.mdd, '.3g')} is detected with {comparison.power:.0%} power at "
            f"α = {comparison.alpha} (normal approximation, one comparison before Holm); "
            "smaller true differences may well be missed."))
    return blocks


def _curves_section(epochs: pd.DataFrame | None, figures: Mapping[str, Path],
                    order: Sequence[str], target: float | None,
                    higher_is_better: bool) -> list[Block]:
    blocks: list[Block] = [Heading("Learning curves")]
    if epochs is None:
        return [*blocks, Text("No epoch records were stored for the done trials.")]
    blocks.append(Image(figures["curves.png"], "Mean test metric per epoch and arm, with the "
                        "95% t-interval across seeds as a band; the reference arm in red."))
    if target is not None:
        blocks += _target_section(epochs, order, target, higher_is_better)
    return blocks


def _target_section(epochs: pd.DataFrame, order: Sequence[str], target: float,
                    higher_is_better: bool) -> list[Block]:
    reached = epochs_to_target(epochs, target, higher_is_better=higher_is_better)
    summary = summarize_by(reached, ["arm"], "epochs_to_target").set_index("arm")
    rows = []
    for arm in order:
        runs = reached[reached["arm"] == arm]
        if runs.empty:
            continue
        hits = int(runs["epochs_to_target"].notna().sum())
        cell = "never" if arm not in summary.index else _mean_ci(
            *(float(summary.loc[arm, key]) for key in ("mean", "ci_low", "ci_high")))
        rows.append((arm, f"{hits}/{len(runs)}", cell))
    word = "at least" if higher_is_better else "at most"
    return [Heading(f"Epochs to reach a test metric of {target:g}", 3),
            Text(f"First epoch at which a trial's test metric is {word} {target:g}; the mean "
                 "and 95% CI are over the trials that reached it."),
            Table(("arm", "reached", "epochs (mean ± 95% CI)"), tuple(rows))]


def _shift_section(shift: pd.DataFrame | None, figures: Mapping[str, Path],
                   order: Sequence[str]) -> list[Block]:
    blocks: list[Block] = [Heading("Variance shift per BatchNorm layer")]
    if shift is None:
        return [*blocks, Text("No layer shifts were measured (no BatchNorm layers, or not "
                              "recorded).")]
    ratio = summarize_by(shift, ["arm", "depth"], "ratio").set_index(["arm", "depth"])
    theory = shift.groupby(["arm", "depth"], sort=False)["predicted"].mean()
    depths = sorted(set(shift["depth"].tolist()))
    rows = []
    for arm in order:
        if arm not in ratio.index.get_level_values("arm"):
            continue
        cells = [arm]
        for depth in depths:
            if (arm, depth) not in ratio.index:
                cells.append("—")
                continue
            line = ratio.loc[(arm, depth)]
            text = _mean_ci(float(line["mean"]), float(line["ci_low"]), float(line["ci_high"]))
            predicted = float(theory.get((arm, depth), math.nan))
            cells.append(text + (f" (theory {_num(predicted)})" if math.isfinite(predicted)
                                 else ""))
        rows.append(tuple(cells))
    return [*blocks,
            Text("Mean over seeds of eval_var / train_var at each BatchNorm input (1 = no "
                 "shift; below 1, inference sees less variance than BN learned), with its 95% "
                 "CI and, where recorded, the theory's prediction. Depth counts BatchNorm "
                 "layers in forward order."),
            Table(("arm", *(f"depth {d}" for d in depths)), tuple(rows)),
            Image(figures["shift.png"], "Measured shift per BatchNorm depth and arm (95% CI "
                  "over seeds); dashed: the theory's prediction; grey line: no shift.")]


def _failures_section(trials: pd.DataFrame) -> list[Block]:
    failed = trials[trials["status"] == "failed"]
    if failed.empty:
        return []
    rows = tuple((str(int(row.trial_id)), str(row.arm), str(int(row.seed)),
                  _first_line(row.error)) for row in failed.itertuples())
    return [Heading("Failed trials"),
            Text("Excluded from every statistic above; the full tracebacks are in the "
                 "database."),
            Table(("trial", "arm", "seed", "error"), rows)]


def _first_line(error: Any, limit: int = 160) -> str:
    text = "" if error is None or (isinstance(error, float) and math.isnan(error)) else str(error)
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- figures -------------------------------------------------------------------------------------


def _figures(out: Path, panels: Sequence[tuple[str, Comparison]], epochs: pd.DataFrame | None,
             shift: pd.DataFrame | None, order: Sequence[str], reference: str,
             curve_label: str) -> dict[str, Path]:
    """Draw the figures there is data for; remove those of an earlier report that are not."""
    from varshift.lab import report_plots

    figures = {"metric.png": report_plots.plot_metric(panels, out / "metric.png")}
    if epochs is not None:
        curves = summarize_by(epochs, ["arm", "epoch"], "test_metric")
        figures["curves.png"] = report_plots.plot_curves(curves, order, reference, curve_label,
                                                         out / "curves.png")
    if shift is not None:
        ratio = summarize_by(shift, ["arm", "depth"], "ratio")
        predicted = (shift.dropna(subset=["predicted"])
                     .groupby(["arm", "depth"], sort=False)["predicted"].mean().reset_index())
        figures["shift.png"] = report_plots.plot_shift(ratio, predicted, order, reference,
                                                       out / "shift.png")
    for name in PLOT_NAMES:
        if name not in figures:
            (out / name).unlink(missing_ok=True)
    return figures
