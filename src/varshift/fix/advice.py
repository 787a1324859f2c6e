"""What to do about a diagnosed model: the fixes ``varshift diagnose`` suggests, as a function.

    from varshift.diagnose import lint, measure
    from varshift.fix.advice import suggest_fixes

    for tip in suggest_fixes(lint(model, x), measure(model, loader)):
        print("-", tip)

The policy, in order:

1. re-estimate the BatchNorm statistics with dropout off (:func:`~varshift.fix.recalibrate_bn`)
   when dropout feeds a BatchNorm (lint found it) or when a stored running variance is off by
   more than :data:`MISMATCH_TOLERANCE` (measure found it: :func:`stale_layers`); without
   dropout upstream the statistics are stale rather than shifted (Wu & Johnson 2021);
2. when dropout feeds a BatchNorm: move it after the last BatchNorm and retrain, or convert it
   to variance-stable noise (:func:`~varshift.fix.convert_dropout`) and retrain;
3. otherwise, nothing to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from varshift.diagnose import LintReport, ShiftReport

__all__ = ["MISMATCH_TOLERANCE", "RECALIBRATE_CALL", "stale_layers", "suggest_fixes"]

MISMATCH_TOLERANCE = 0.05
"""How far (relative) a BatchNorm's stored running variance may be from the one re-estimated with
dropout off (:attr:`~varshift.diagnose.LayerShift.inference_mismatch`, channel mean) before
re-estimating is suggested: 5 %. The momentum-0.1 moving average of a converged model wanders by
less than that."""

RECALIBRATE_CALL = "varshift.fix.recalibrate_bn(model, data)"
"""How :func:`suggest_fixes` says "re-estimate" unless told otherwise (the command line passes
its ``varshift recalibrate ...`` command instead)."""

# How many layer names a tip lists before it says "and N more".
_NAMES_SHOWN = 3


def stale_layers(shift: ShiftReport, tolerance: float = MISMATCH_TOLERANCE) -> list[str]:
    """The BatchNorm layers whose stored running variance differs from the re-estimated one by
    more than ``tolerance`` (relative, channel mean). Needs a report measured with
    ``recalibrate=True``; layers without the figure (or with a NaN one) are not listed.

    Raises:
        ValueError: ``tolerance`` is negative or not finite.
    """
    if not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
    return [
        layer.name or "<root>"
        for layer in shift.layers
        if layer.inference_mismatch is not None and abs(layer.inference_mismatch - 1) > tolerance
    ]


def suggest_fixes(
    report: LintReport,
    shift: ShiftReport,
    *,
    recalibrate: str = RECALIBRATE_CALL,
    tolerance: float = MISMATCH_TOLERANCE,
) -> list[str]:
    """The suggested fixes for a model, one sentence each (never empty).

    Args:
        report: :func:`~varshift.diagnose.lint`'s report (which noise feeds which BatchNorm).
        shift: :func:`~varshift.diagnose.measure`'s report on data (with ``recalibrate=True``,
            so that stale statistics can be found).
        recalibrate: the call or command that re-estimates the statistics, quoted in the tip.
        tolerance: see :data:`MISMATCH_TOLERANCE`.
    """
    stale = stale_layers(shift, tolerance)
    sources = list(dict.fromkeys(finding.source for finding in report.findings))
    tips: list[str] = []
    if sources or stale:
        tip = f"re-estimate the BatchNorm statistics with dropout off: {recalibrate}"
        if not sources:
            tip += (
                f" (no dropout feeds a BatchNorm: the running statistics of {_some(stale)} "
                "lag behind the weights, Wu & Johnson 2021)"
            )
        tips.append(tip)
    if sources:
        tips.append(
            f"move the noise layer(s) {_some(sources)} after the last BatchNorm (e.g. just "
            "before the classifier), where dropout shifts no BatchNorm statistics, and retrain"
        )
        tips.append(
            "or make the noise variance-stable and retrain: "
            "varshift.fix.convert_dropout(model, to='uout') (Uout, beta=0.1, Li et al. 2019) "
            "or to='variance_stable'"
        )
    if not tips:
        tips.append(
            "nothing to fix: no BatchNorm is fed by dropout and the stored statistics match the "
            f"re-estimated ones within {tolerance:.0%}"
        )
    return tips


def _some(names: Sequence[str]) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
