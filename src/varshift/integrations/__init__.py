"""Re-estimate BatchNorm statistics with dropout off inside a training run.

:class:`PeriodicRecalibration` serves a hand-written loop (``maybe_recalibrate(step)``);
:class:`Recalibrator` holds the settings and runs one re-estimation, recorded as a
:class:`Recalibration`. The PyTorch Lightning callback lives in
:mod:`varshift.integrations.lightning` (imported on its own, so that ``varshift`` never needs
Lightning). Recipes, SWA and timm included: ``docs/recipes.md``.

This package sits above :mod:`varshift.fix` and :mod:`varshift.diagnose`; nothing of ours
imports it.
"""

from varshift.integrations.loop import PeriodicRecalibration, Recalibration, Recalibrator

__all__ = ["PeriodicRecalibration", "Recalibration", "Recalibrator"]
