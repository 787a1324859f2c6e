"""Find and measure the Dropout/BatchNorm variance shift in a model.

:func:`lint` reads the model's data flow (``torch.fx``, or forward hooks when fx cannot trace) and
names every BatchNorm layer fed by a stochastic layer; :func:`measure` runs real data through the
model and reports, per BatchNorm layer, the variance its input has with dropout on and off.
"""

from varshift.diagnose.lint import Finding, LintReport, StochasticLayer, UnaffectedNorm, lint
from varshift.diagnose.measure import LayerShift, ShiftReport, measure

__all__ = [
    "Finding",
    "LayerShift",
    "LintReport",
    "ShiftReport",
    "StochasticLayer",
    "UnaffectedNorm",
    "lint",
    "measure",
]
