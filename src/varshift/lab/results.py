"""What one trial returns: plain, picklable records shared by the trial runner, the backends,
the results store and the reports.

A worker (process or Ray) runs a trial and sends back a :class:`TrialResult`; only the driver
writes it to the store, in one transaction, so a result is recorded at most once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["EpochRecord", "LayerShiftRecord", "TrialResult", "TrialStatus", "one_line_reason"]

TrialStatus = Literal["done", "failed"]


@dataclass(frozen=True)
class EpochRecord:
    """Metrics after one training epoch (``epoch`` counts from 1).

    ``test_metric`` is accuracy for classification and mean squared error for regression and
    autoencoding; ``extra`` holds task-specific values (e.g. mean hidden activation).
    """

    epoch: int
    train_loss: float
    test_loss: float
    test_metric: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerShiftRecord:
    """Variance shift measured at one BatchNorm layer of the trained model (test data).

    ``depth`` is the layer's 0-based position among the model's BatchNorm layers in the order
    the forward pass first calls them (0 = the first BatchNorm), as
    :func:`varshift.diagnose.measure` numbers them.

    ``train_var`` / ``eval_var``: mean over channels of the BN input variance with dropout ON /
    OFF; ``running_var``: mean of the stored running variance; ``ratio``: mean over channels of
    eval_var/train_var (the paper's shift); ``predicted``: the shift predicted by
    :mod:`varshift.theory`, when one applies.
    """

    layer: str
    depth: int
    train_var: float
    eval_var: float
    running_var: float
    ratio: float
    predicted: float | None = None


@dataclass(frozen=True)
class TrialResult:
    """Everything a finished (or failed) trial reports.

    ``final`` holds at least ``test_loss`` and ``test_metric`` (eval mode, stored BN statistics)
    and, when the model has BatchNorm layers, ``recal_test_loss`` / ``recal_test_metric`` after
    re-estimating BN statistics with dropout OFF. ``metric_name`` is ``"accuracy"`` or ``"mse"``;
    ``higher_is_better`` says which way is good.
    """

    status: TrialStatus
    metric_name: str
    higher_is_better: bool
    wall_time_s: float
    epochs: tuple[EpochRecord, ...] = ()
    final: dict[str, float] = field(default_factory=dict)
    layer_shift: tuple[LayerShiftRecord, ...] = ()
    error: str | None = None
    traceback: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def one_line_reason(error: str | None, limit: int | None = 200) -> str:
    """A failed trial's error as one line for a progress or summary line: its non-empty lines
    joined with ``"; "`` (a space after a line ending in ":"), so that a message whose details
    follow a heading such as "invalid configuration (1 problem):" keeps them, cut to ``limit``
    characters with "…" (``None``: never cut)."""
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be >= 2 characters, got {limit}")
    text = ""
    for line in (error or "").splitlines():
        line = " ".join(line.split())
        if line:
            # A heading ending in ":" runs on into its first detail.
            text += (" " if text.endswith(":") else "; ") + line if text else line
    text = text or "unknown error"
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"
