"""Tests for the text of varshift.diagnose.ShiftReport: figures that were not measured and
figures that have no finite value are told apart, and the table says what each mark means."""

from __future__ import annotations

import math

import torch

from varshift.diagnose import LayerShift, ShiftReport


def _layer(train_var: list[float], *, recalibrated: bool) -> LayerShift:
    var = torch.tensor(train_var, dtype=torch.float64)
    ones = torch.ones_like(var)
    zeros = torch.zeros_like(var)
    return LayerShift(
        name="bn",
        depth=0,
        channels=len(train_var),
        train_mean=zeros,
        train_var=var,
        eval_mean=zeros,
        eval_var=ones,
        running_mean=zeros,
        running_var=ones,
        precise_mean=zeros if recalibrated else None,
        precise_var=ones if recalibrated else None,
    )


def _row(report: ShiftReport) -> list[str]:
    (row,) = [line for line in str(report).splitlines() if line.lstrip().startswith("0  bn")]
    return row.split()


def test_dead_channels_print_nan_and_say_why() -> None:
    # Every channel had zero variance with the noise on: eval/train divides by zero.
    report = ShiftReport((_layer([0.0, 0.0], recalibrated=True),), samples=8, batches=1)
    assert math.isnan(report.layers[0].mean_ratio)
    cells = _row(report)
    assert cells[7] == "nan"  # eval/train
    assert "-" not in cells
    text = str(report)
    assert "nan = no channel gave a finite value" in text
    assert "- = not measured" not in text


def test_unmeasured_figures_keep_the_dash_and_its_legend() -> None:
    report = ShiftReport((_layer([2.0, 2.0], recalibrated=False),), samples=8, batches=1)
    cells = _row(report)
    assert cells[6] == "-"  # precise_var: no recalibration
    assert cells[7] == "0.5"
    text = str(report)
    assert "- = not measured" in text
    assert "nan" not in text
