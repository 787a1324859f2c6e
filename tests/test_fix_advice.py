"""``varshift.fix.advice``: the fixes suggested for a linted and measured model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varshift.diagnose import ShiftReport, lint, measure
from varshift.fix import recalibrate_bn
from varshift.fix.advice import MISMATCH_TOLERANCE, RECALIBRATE_CALL, stale_layers, suggest_fixes


def _data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [3 + 2 * torch.randn(64, 2, 6, 6, generator=generator) for _ in range(4)]


def _net(*, dropout_before_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()]
    layers.insert(1 if dropout_before_bn else 3, nn.Dropout(0.5))
    return nn.Sequential(*layers)


def _shift(model: nn.Module, **kwargs: bool) -> ShiftReport:
    return measure(model, _data(), progress=False, **kwargs)


def test_dropout_before_batchnorm_gets_three_fixes() -> None:
    model = _net(dropout_before_bn=True)
    tips = suggest_fixes(lint(model), _shift(model), recalibrate="varshift recalibrate ...")
    assert len(tips) == 3
    assert tips[0] == (
        "re-estimate the BatchNorm statistics with dropout off: varshift recalibrate ..."
    )
    assert tips[1].startswith("move the noise layer(s) 1 after the last BatchNorm")
    assert "convert_dropout(model, to='uout')" in tips[2]


def test_stale_statistics_without_dropout_upstream_say_so() -> None:
    model = _net(dropout_before_bn=False)  # fresh statistics (0, 1) against data of mean 3, var 4
    shift = _shift(model)
    assert stale_layers(shift) == ["1"]
    (tip,) = suggest_fixes(lint(model), shift)
    assert tip.startswith(
        f"re-estimate the BatchNorm statistics with dropout off: {RECALIBRATE_CALL}"
    )
    assert "running statistics of 1 lag behind the weights" in tip


def test_recalibrated_statistics_leave_nothing_to_fix() -> None:
    model = recalibrate_bn(_net(dropout_before_bn=False), _data(), progress=False)
    shift = _shift(model)
    assert stale_layers(shift) == []
    assert suggest_fixes(lint(model), shift) == [
        "nothing to fix: no BatchNorm is fed by dropout and the stored statistics match the "
        "re-estimated ones within 5%"
    ]


def test_the_tolerance_decides_what_is_stale() -> None:
    shift = _shift(_net(dropout_before_bn=False))
    mismatch = shift.layers[0].inference_mismatch
    assert mismatch is not None
    off_by = abs(mismatch - 1)
    assert off_by > MISMATCH_TOLERANCE
    assert stale_layers(shift, tolerance=off_by * 1.01) == []
    assert stale_layers(shift, tolerance=off_by * 0.99) == ["1"]


def test_a_report_without_re_estimation_finds_nothing_stale() -> None:
    assert stale_layers(_shift(_net(dropout_before_bn=False), recalibrate=False)) == []


@pytest.mark.parametrize("tolerance", [-0.1, float("nan"), float("inf")])
def test_refuses_a_bad_tolerance(tolerance: float) -> None:
    shift = _shift(_net(dropout_before_bn=False))
    with pytest.raises(ValueError, match=r"tolerance must be finite and >= 0, got"):
        stale_layers(shift, tolerance)
