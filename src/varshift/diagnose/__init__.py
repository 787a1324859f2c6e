"""Find and measure the Dropout/BatchNorm variance shift in a model.

:func:`lint` reads the model's data flow (``torch.fx``, or forward hooks when fx cannot trace) and
names every BatchNorm layer fed by a stochastic layer; :func:`measure` runs real data through the
model and reports, per BatchNorm layer, the variance its input has with dropout on and off;
:func:`predict_shifts` predicts that ratio on example inputs before any training (exact through
linear paths, Monte Carlo otherwise), and is what :func:`lint` uses when given example inputs.
"""

from varshift.diagnose.lint import lint
from varshift.diagnose.lint_predictions import noise_grouping, register_noise_grouping
from varshift.diagnose.lint_report import (
    BnPrediction,
    Finding,
    LintReport,
    StochasticLayer,
    UnaffectedNorm,
)
from varshift.diagnose.measure import LayerShift, ShiftReport, measure
from varshift.diagnose.noise_moments import NoiseSource, ShiftPrediction, predict_shifts

__all__ = [
    "BnPrediction",
    "Finding",
    "LayerShift",
    "LintReport",
    "NoiseSource",
    "ShiftPrediction",
    "ShiftReport",
    "StochasticLayer",
    "UnaffectedNorm",
    "lint",
    "measure",
    "noise_grouping",
    "predict_shifts",
    "register_noise_grouping",
]
