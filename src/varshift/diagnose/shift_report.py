"""The records :func:`varshift.diagnose.measure` returns: one :class:`LayerShift` per BatchNorm and
a :class:`ShiftReport` that prints, serialises and plots them.

Variances are per channel of the BatchNorm *input* (every sample and spatial position is an
observation; unbiased population estimates pooled over batches by sample count), float64 CPU
``Tensor[C]``. Which forward each one comes from:

- ``train_var``: training-style forward — every module in training mode, so dropout is on and
  every BatchNorm normalises with batch statistics, but nothing is stored. The variance the
  moving average tracks during training; Li et al.'s "training" variance.
- ``eval_var``: eval forward, exactly ``model.eval()`` — dropout off, BatchNorms using their
  stored statistics. What the layer really sees at inference (the paper's ``real_var``).
- ``running_var``: the stored moving average (the paper's ``moving_var``).
- ``precise_var``: dropout off, BatchNorms normalising with batch statistics — what
  :func:`varshift.fix.recalibrate_bn` would store. ``None`` when measured without recalibration.

Ratios whose denominator is zero (a dead channel) are ``nan`` and left out of channel means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["LayerShift", "ShiftReport", "channel_mean_ratio"]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan")))


def _channel_mean(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def channel_mean_ratio(num: Tensor, den: Tensor) -> float:
    """Mean over channels of ``num / den``, dead channels (``den = 0``) and non-finite ratios
    left out; ``nan`` when none is left. The average every ratio of this report uses."""
    return _channel_mean(_ratio(num, den))


@dataclass(frozen=True, eq=False)
class LayerShift:
    """Variance statistics at the input of one BatchNorm layer (see the module docstring for
    which forward each variance comes from).

    ``depth`` is the layer's position among the BatchNorms in the order the forward first calls
    them (0 = the first). Derived figures are properties: per channel :attr:`ratio`; means over
    channels :attr:`mean_ratio`, :attr:`figure_of_merit`, :attr:`staleness`,
    :attr:`noise_shift` and :attr:`inference_mismatch`.
    """

    name: str
    depth: int
    channels: int
    train_mean: Tensor
    train_var: Tensor
    eval_mean: Tensor
    eval_var: Tensor
    running_mean: Tensor
    running_var: Tensor
    precise_mean: Tensor | None = None
    precise_var: Tensor | None = None

    @property
    def ratio(self) -> Tensor:
        """Per channel ``eval_var / train_var``: the variance shift of Li et al. (2019), below 1
        when noise upstream inflates the training-time variance."""
        return _ratio(self.eval_var, self.train_var)

    @property
    def mean_ratio(self) -> float:
        """:attr:`ratio` averaged over channels."""
        return _channel_mean(self.ratio)

    @property
    def figure_of_merit(self) -> float:
        """Li et al.'s per-layer figure: ``max(real_var/moving_var, moving_var/real_var)``
        averaged over channels, with ``real_var = eval_var`` and ``moving_var = running_var``;
        1 means the stored statistics fit what the layer sees at inference."""
        up = _ratio(self.eval_var, self.running_var)
        down = _ratio(self.running_var, self.eval_var)
        return _channel_mean(torch.maximum(up, down))

    @property
    def staleness(self) -> float:
        """Mean over channels of ``running_var / train_var``: the stored moving average against
        the precise variance *with* dropout on, i.e. against what it should have converged to.
        Away from 1 the moving average lags behind the weights (Wu & Johnson 2021)."""
        return _channel_mean(_ratio(self.running_var, self.train_var))

    @property
    def noise_shift(self) -> float | None:
        """Mean over channels of ``precise_var / train_var``: the same forward with the noise
        off and on, BatchNorms on batch statistics in both, so only the noise differs: the
        dropout-induced shift. ``None`` without recalibration."""
        if self.precise_var is None:
            return None
        return _channel_mean(_ratio(self.precise_var, self.train_var))

    @property
    def inference_mismatch(self) -> float | None:
        """Mean over channels of ``running_var / precise_var``: the stored statistics against
        the precise variance with dropout off, the error that re-estimation removes (staleness
        and noise together). ``None`` without recalibration."""
        if self.precise_var is None:
            return None
        return _channel_mean(_ratio(self.running_var, self.precise_var))

    def summary(self) -> dict[str, Any]:
        """Channel means of every figure, as plain floats (``None`` when not measured)."""
        precise = None if self.precise_var is None else _channel_mean(self.precise_var)
        return {
            "name": self.name,
            "depth": self.depth,
            "channels": self.channels,
            "train_var": _channel_mean(self.train_var),
            "eval_var": _channel_mean(self.eval_var),
            "running_var": _channel_mean(self.running_var),
            "precise_var": precise,
            "ratio": self.mean_ratio,
            "figure_of_merit": self.figure_of_merit,
            "staleness": self.staleness,
            "noise_shift": self.noise_shift,
            "inference_mismatch": self.inference_mismatch,
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus every per-channel tensor as a list of floats."""
        out = self.summary()
        for key in (
            "train_mean",
            "train_var",
            "eval_mean",
            "eval_var",
            "running_mean",
            "running_var",
            "precise_mean",
            "precise_var",
        ):
            value = getattr(self, key)
            out[f"{key}_per_channel"] = None if value is None else value.tolist()
        return out


_NOT_MEASURED = "-"
_NO_FINITE_VALUE = "nan"
_LEGEND = {
    _NOT_MEASURED: "- = not measured (the precise figures need recalibration)",
    _NO_FINITE_VALUE: (
        "nan = no channel gave a finite value (a zero variance in the denominator: dead "
        "channels; or non-finite variances)"
    ),
}


def _format_figure(value: float | None) -> str:
    """One figure for the text table, to 4 significant digits; a figure that was not measured
    and one that is ``nan`` are told apart, and :data:`_LEGEND` says what each means."""
    if value is None:
        return _NOT_MEASURED
    if math.isnan(value):
        return _NO_FINITE_VALUE
    return f"{value:.4g}"


@dataclass(frozen=True, eq=False)
class ShiftReport:
    """What :func:`varshift.diagnose.measure` found, layer by layer in forward order.

    ``loss_*``/``accuracy_*`` are eval-mode figures on the measured data with the stored
    statistics (``before``) and with statistics re-estimated with dropout off (``after``);
    ``None`` where there were no targets, no recalibration, or (accuracy) no class labels.
    """

    layers: tuple[LayerShift, ...]
    samples: int
    batches: int
    loss_before: float | None = None
    loss_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    def layer(self, name: str) -> LayerShift:
        """The record of the BatchNorm with qualified name ``name``."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no BatchNorm named {name!r}; measured: {[e.name for e in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data: the report's figures and every layer's :meth:`to_dict`."""
        return {
            "samples": self.samples,
            "batches": self.batches,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "layers": [entry.to_dict() for entry in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON (``nan`` written as ``null``)."""
        return json.dumps(_nan_to_none(self.to_dict()), indent=indent)

    def plot(self, path: str | Path) -> Path:
        """Draw Li et al.'s figure (per-layer train, eval, running and precise variance on a log
        scale; the eval/train ratio below) to ``path`` (format from the suffix). Needs
        matplotlib (``pip install 'varshift[plot]'``)."""
        from varshift.diagnose.plot import plot_shift

        return plot_shift([entry.summary() for entry in self.layers], self.samples, Path(path))

    def __str__(self) -> str:
        header = (
            "depth",
            "layer",
            "C",
            "train_var",
            "eval_var",
            "running_var",
            "precise_var",
            "eval/train",
            "FoM",
            "run/train",
            "precise/train",
            "run/precise",
        )
        rows: list[tuple[str, ...]] = [header]
        for entry in self.layers:
            s = entry.summary()
            rows.append(
                (
                    str(entry.depth),
                    entry.name or "<root>",
                    str(entry.channels),
                    *(
                        _format_figure(s[key])
                        for key in (
                            "train_var",
                            "eval_var",
                            "running_var",
                            "precise_var",
                            "ratio",
                            "figure_of_merit",
                            "staleness",
                            "noise_shift",
                            "inference_mismatch",
                        )
                    ),
                )
            )
        widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
        lines = [
            f"Variance shift at the input of {len(self.layers)} BatchNorm layer(s), "
            f"{self.samples} samples in {self.batches} batch(es); variances are channel means",
        ]
        for row in rows:
            cells = [
                cell.ljust(width) if k == 1 else cell.rjust(width)
                for k, (cell, width) in enumerate(zip(row, widths))
            ]
            lines.append("  ".join(cells))
        shown = {cell for row in rows[1:] for cell in row[3:]}
        lines += [legend for mark, legend in _LEGEND.items() if mark in shown]
        if self.loss_before is not None or self.accuracy_before is not None:
            lines.append(
                f"eval loss {_format_figure(self.loss_before)} -> "
                f"{_format_figure(self.loss_after)}, accuracy "
                f"{_format_figure(self.accuracy_before)} -> {_format_figure(self.accuracy_after)} "
                "(stored -> re-estimated BatchNorm statistics, dropout off)"
            )
        return "\n".join(lines)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(value) for value in obj]
    return obj
