"""Li et al.'s variance-shift figure for a :class:`~varshift.diagnose.ShiftReport`.

The figure is drawn from the report's per-layer summaries (plain dicts), so this module needs
nothing from the report's module, which imports it (lazily) to draw. matplotlib is optional
(``varshift[plot]``) and imported here only when a figure is drawn. The figure is rendered
through the Agg canvas object, never through ``pyplot``, so drawing does not change the backend
or the open figures of the calling program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_shift"]


def plot_shift(summaries: Sequence[Mapping[str, Any]], samples: int, path: Path) -> Path:
    """Two panels against BatchNorm depth: channel-mean train, eval, running (and precise)
    variance of the BN input on a log scale; the eval/train ratio (and, when measured, the
    noise-only ratio precise/train) with the no-shift line at 1. Writes ``path``; returns it.

    ``summaries`` holds one :meth:`LayerShift.summary <varshift.diagnose.LayerShift.summary>`
    per BatchNorm, in forward order; ``samples`` is the number of samples they were measured on.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "ShiftReport.plot needs matplotlib: pip install 'varshift[plot]'"
        ) from None

    depth = [s["depth"] for s in summaries]
    names = [s["name"] or "<root>" for s in summaries]

    figure = Figure(figsize=(max(6.0, 0.5 * len(depth) + 3.0), 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    styles: list[tuple[str, str, dict[str, Any]]] = [
        ("train_var", "train (dropout on)", {"marker": "o"}),
        ("eval_var", "eval (dropout off)", {"marker": "s"}),
        ("running_var", "running (stored)", {"marker": "^", "linestyle": "--"}),
        ("precise_var", "precise (dropout off)", {"marker": "x", "linestyle": ":"}),
    ]
    for key, label, style in styles:
        values = [s[key] for s in summaries]
        if all(value is not None for value in values):
            top.plot(depth, values, label=label, **style)
    top.set_yscale("log")
    top.set_ylabel("variance of BN input")
    top.legend(fontsize="small")
    top.set_title(f"Variance shift per BatchNorm ({samples} samples)")

    bottom.plot(depth, [s["ratio"] for s in summaries], marker="o", label="eval / train")
    noise = [s["noise_shift"] for s in summaries]
    if all(value is not None for value in noise):
        bottom.plot(depth, noise, marker="x", linestyle=":", label="precise / train (noise only)")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("variance ratio")
    bottom.set_xlabel("BatchNorm layer (forward order)")
    bottom.set_xticks(depth, names, rotation=45, ha="right", fontsize="small")
    bottom.legend(fontsize="small")

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
