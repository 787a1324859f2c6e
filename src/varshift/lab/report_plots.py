"""The report's figures: the metric per arm, the learning curves, the measured shift vs depth.

matplotlib is imported only here, inside the functions, and drives the Agg canvas object
directly (never ``pyplot``), so drawing neither needs a display nor changes the calling
program's backend or open figures. Figures grow with the number of arms, and arm labels are
wrapped, so a study of 20 arms stays readable.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from varshift.lab.stats import Comparison

__all__ = ["plot_curves", "plot_metric", "plot_shift"]

_DPI = 110
_REFERENCE_COLOUR = "#d62728"
_WRAP = 30


def _wrap(label: str, width: int = _WRAP) -> str:
    # Arm labels are "axis=value axis=value"; wrapping at spaces keeps each pair on one line.
    return textwrap.fill(label, width, break_on_hyphens=False)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("lab reports need matplotlib: pip install 'varshift[lab]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colours(arms: Sequence[str], reference: str) -> dict[str, Any]:
    """One colour per arm; the reference always in the same strong red, never reused."""
    from matplotlib import colormaps

    others = [arm for arm in arms if arm != reference]
    # Leave out the palettes' reds, which would read as the reference.
    name, reds = ("tab10", (3,)) if len(others) <= 9 else ("tab20", (6, 7))
    cmap = colormaps[name]
    palette = [cmap(i) for i in range(cmap.N) if i not in reds]
    colours: dict[str, Any] = {arm: palette[i % len(palette)] for i, arm in enumerate(others)}
    colours[reference] = _REFERENCE_COLOUR
    return colours


def _legend(figure: Any, axes: Any, count: int) -> None:
    """Legend outside the axes (to the right), in two columns when there are many arms."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside right upper", fontsize="small",
                      ncols=2 if count > 12 else 1, frameon=False)


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=_DPI)
    return path


def plot_metric(panels: Sequence[tuple[str, Comparison]], path: Path) -> Path:
    """One panel per comparison (e.g. the test metric, then after BN recalibration): each arm's
    mean with its t-interval as a horizontal error bar, the seeds as small dots, the reference
    arm in red with a dashed line at its mean. Arms are in the first panel's ranking, best at the
    top; the rank group is written at the right."""
    first = panels[0][1]
    arms = [row.arm for row in first.rows]
    for _, comparison in panels[1:]:
        arms += [row.arm for row in comparison.rows if row.arm not in arms]
    height = max(3.2, 0.42 * len(arms) + 1.6)
    figure = _figure(5.0 * len(panels) + 2.5, height)
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    positions = {arm: len(arms) - 1 - i for i, arm in enumerate(arms)}
    for axes, (title, comparison) in zip(axes_list, panels):
        for row in comparison.rows:
            s, y = row.summary, positions[row.arm]
            colour = _REFERENCE_COLOUR if row.arm == comparison.reference else "#1f5fa8"
            error = [[s.mean - s.ci_low], [s.ci_high - s.mean]] if math.isfinite(s.ci_low) \
                else None
            axes.errorbar([s.mean], [y], xerr=error, fmt="o", color=colour, capsize=3,
                          markersize=6, linewidth=1.6)
            axes.scatter(s.values, [y - 0.22] * len(s.values), s=9, color=colour, alpha=0.5,
                         linewidths=0)
            axes.annotate(f"g{row.group}", (1.0, y), xycoords=("axes fraction", "data"),
                          xytext=(4, 0), textcoords="offset points", va="center",
                          fontsize="x-small", color="#555c68")
        axes.axvline(comparison.row(comparison.reference).summary.mean, color=_REFERENCE_COLOUR,
                     linestyle="--", linewidth=0.9)
        better = "higher" if comparison.higher_is_better else "lower"
        axes.set_title(f"{title}\n(mean, {comparison.confidence:.0%} CI, dots = seeds; "
                       f"{better} is better)", fontsize="medium")
        axes.grid(axis="x", alpha=0.3)
    axes_list[0].set_yticks(list(positions.values()), [_wrap(arm) for arm in positions],
                            fontsize="small")
    for label in axes_list[0].get_yticklabels():
        if label.get_text() == _wrap(first.reference):
            label.set_color(_REFERENCE_COLOUR)
            label.set_fontweight("bold")
    axes_list[0].set_ylim(-0.8, len(arms) - 0.4)
    return _save(figure, path)


def _arm_axes(arms: Sequence[str]) -> tuple[Any, Any]:
    """A wide figure with one axes and room on the right for a legend of ``arms``."""
    figure = _figure(11.0, 5.2 if len(arms) <= 12 else 6.5)
    return figure, figure.subplots()


def _arm_lines(frame: pd.DataFrame, arms: Sequence[str], reference: str,
               x: str) -> Iterator[tuple[str, pd.DataFrame, dict[str, Any]]]:
    """Each arm's rows of ``frame`` sorted by ``x``, with its line style (colour, width, label);
    the reference is drawn thicker and labelled as such. Arms without rows are skipped."""
    colours = _colours(arms, reference)
    for arm in arms:
        data = frame[frame["arm"] == arm].sort_values(x)
        if data.empty:
            continue
        main = arm == reference
        yield arm, data, {"color": colours[arm], "linewidth": 2.4 if main else 1.3,
                          "label": _wrap(arm + (" (reference)" if main else ""))}


def _finish(figure: Any, axes: Any, arms: Sequence[str], path: Path, *, xlabel: str,
            ylabel: str, title: str) -> Path:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    _legend(figure, axes, len(arms))
    return _save(figure, path)


def plot_curves(curves: pd.DataFrame, arms: Sequence[str], reference: str, ylabel: str,
                path: Path) -> Path:
    """Mean test metric per epoch for each arm with its t-interval as a band (where n ≥ 2);
    ``curves`` has columns arm, epoch, n, mean, ci_low, ci_high (:func:`summarize_by`)."""
    figure, axes = _arm_axes(arms)
    for arm, data, style in _arm_lines(curves, arms, reference, "epoch"):
        axes.plot(data["epoch"], data["mean"], zorder=3 if arm == reference else 2, **style)
        band = data[data["n"] >= 2]
        axes.fill_between(band["epoch"], band["ci_low"], band["ci_high"], color=style["color"],
                          alpha=0.15, linewidth=0)
    return _finish(figure, axes, arms, path, xlabel="epoch", ylabel=ylabel,
                   title="Learning curves (mean over seeds, 95% CI band)")


def plot_shift(shift: pd.DataFrame, predicted: pd.DataFrame, arms: Sequence[str], reference: str,
               path: Path) -> Path:
    """Measured variance shift (eval_var / train_var, 1 = none) at each BatchNorm depth, per arm,
    with its t-interval over seeds; the theory's prediction, where recorded, as a dashed line of
    the same colour. ``shift`` is :func:`summarize_by` of the ratio per (arm, depth);
    ``predicted`` has columns arm, depth, predicted."""
    from matplotlib.lines import Line2D

    figure, axes = _arm_axes(arms)
    for arm, data, style in _arm_lines(shift, arms, reference, "depth"):
        # An interval is NaN for a single seed: draw the point without a bar then.
        low = (data["mean"] - data["ci_low"]).fillna(0.0)
        high = (data["ci_high"] - data["mean"]).fillna(0.0)
        axes.errorbar(data["depth"], data["mean"], yerr=[low, high], marker="o", capsize=3,
                      **style)
        theory = predicted[predicted["arm"] == arm].sort_values("depth")
        if not theory.empty:
            axes.plot(theory["depth"], theory["predicted"], color=style["color"], linestyle="--",
                      marker="x", linewidth=1.0)
    axes.axhline(1.0, color="grey", linewidth=0.9)
    if not predicted.empty:
        axes.add_line(Line2D([], [], color="grey", linestyle="--", marker="x",
                             label="theory's prediction"))
    axes.set_xticks(sorted(set(shift["depth"].tolist())))
    return _finish(figure, axes, arms, path, xlabel="BatchNorm depth (forward order)",
                   ylabel="eval_var / train_var (1 = no shift)",
                   title="Measured variance shift per BatchNorm layer (mean over seeds, 95% CI)")
