"""The lint report as a person reads it in a terminal: :meth:`LintReport.format`.

A summary line first, one row per flagged BatchNorm, no line over ``width``, a few lines when
nothing is flagged; ``verbose=True`` keeps every (BatchNorm, source) pair and full path. Zoo
models where torchvision/timm are installed, varshift's own small nets otherwise.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from helpers.models_zoo import DenseNetTiny, PerSampleNormNet, VGGTiny
from varshift.diagnose import LintReport, lint


def images() -> torch.Tensor:
    return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class LongNames(nn.Module):
    """Deeply nested module paths: each BatchNorm fed by two dropouts."""

    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        inner: nn.Module = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.2), nn.Dropout(0.1), nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1), nn.Dropout(0.3), nn.BatchNorm2d(4),
        )
        for level in range(depth):
            inner = nn.ModuleDict({f"a_rather_long_stage_name_{level}": inner})
        self.body = inner
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module: nn.Module = self.body
        for level in reversed(range(self.depth)):
            module = module[f"a_rather_long_stage_name_{level}"]  # type: ignore[index]
        out: torch.Tensor = module(x)
        return out


def _rows(text: str) -> list[str]:
    """The table rows (below the header and its rule)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) <= set("-+"))
    return [line for line in lines[rule + 1 :] if " | " in line]


@pytest.mark.parametrize("width", [80, 100, 120])
def test_no_line_is_longer_than_width_and_each_flagged_batchnorm_has_one_row(width: int) -> None:
    report = lint(LongNames(), images())
    assert len(report.flagged) == 2
    assert len(report.findings) == 3
    text = report.format(width=width)
    assert max(map(len, text.splitlines())) <= width
    rows = _rows(text)
    assert len(rows) == len(report.flagged)
    assert "…" in text  # the long paths were shortened in the middle
    for row, bn in zip(rows, report.flagged):
        shown = row.split(" | ")[0].strip()
        head, _, tail = shown.partition("…")
        assert bn.startswith(head)
        assert bn.endswith(tail)


def test_rows_show_source_count_nearest_rate_and_combined_shift() -> None:
    report = lint(LongNames(), images())
    rows = [[cell.strip() for cell in row.split(" | ")] for row in _rows(report.format(width=400))]
    for row, bn in zip(rows, report.flagged):
        prediction = report.predictions[bn]
        assert row[0] == bn
        assert row[1] == str(len(prediction.sources))
        assert row[2] == prediction.nearest
        nearest = next(f for f in report.findings if (f.bn, f.source) == (bn, prediction.nearest))
        assert row[3] == f"p={nearest.rate:g}"
        assert row[4].split()[0] in (f"{prediction.shift:.4f}", "≈")


def test_summary_line_counts_flagged_of_checked_and_names_the_worst_shift() -> None:
    report = lint(LongNames(), images())
    summary = report.format(width=400).splitlines()[0]
    worst = min(report.predictions.values(), key=lambda p: p.shift or 1.0)
    assert re.search(r"2 BatchNorm layers are fed by a stochastic layer, of 2\b", summary)
    assert summary.endswith(f"at {worst.bn}")
    assert f"{worst.shift:.4f}" in summary or f"{worst.shift:.3f}" in summary


def test_nothing_flagged_takes_a_few_lines_however_many_noise_layers() -> None:
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.LayerNorm(8)) for _ in range(40)]
    report = lint(nn.Sequential(*blocks))
    assert report.ok
    assert len(report.stochastic_layers) == 40
    lines = report.format().splitlines()
    assert len(lines) <= 5
    assert lines[0].startswith("varshift lint (fx): no BatchNorm layer is fed")
    assert "40 (40 Dropout)" in lines[1]
    assert "none feeds a BatchNorm" in lines[1]
    assert len(report.format(verbose=True).splitlines()) > 80


def test_verbose_keeps_every_pair_with_its_full_path() -> None:
    report = lint(LongNames(), images())
    text = report.format(verbose=True, width=80)
    for finding in report.findings:
        assert " -> ".join(finding.path) in text
    for layer in report.stochastic_layers:
        assert layer.name in text
    data = LintReport.from_json(report.to_json())
    assert data == report
    assert len(data.findings) == 3


def test_str_is_format_and_keeps_the_old_phrases() -> None:
    report = lint(DenseNetTiny(), images())
    assert str(report) == report.format()
    assert "BatchNorm layers are fed by a stochastic layer" in str(report)
    assert "not affected" in str(lint(PerSampleNormNet()))
    assert str(lint(VGGTiny())).splitlines()[0].startswith(
        "varshift lint (fx): no BatchNorm layer is fed by a stochastic layer"
    )


def test_width_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="width must be at least 80, got 10"):
        lint(VGGTiny()).format(width=10)


# -- a model whose training-mode forward fails -------------------------------------------------


class TrainOnlyHead(nn.Module):
    """Its training-mode forward needs a larger input than its eval-mode forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.aux = nn.Conv2d(4, 4, 7)  # 7x7 kernel: needs inputs of at least 7x7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.training:
            y = y + self.aux(y).mean()
        return y


class AlwaysFails(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom\nsecond line")


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_a_failing_training_forward_is_one_line_with_the_shape_and_a_hint(method: str) -> None:
    with pytest.raises(ValueError) as caught:
        lint(TrainOnlyHead(), torch.randn(2, 3, 4, 4), method=method)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "the model's training-mode forward failed on example_inputs of shape (2, 3, 4, 4): "
        "RuntimeError: "
    )
    assert "TrainOnlyHead's eval-mode forward succeeds" in message
    assert message.endswith("pass a larger example input")


def test_a_forward_failing_in_every_mode_gets_no_eval_hint() -> None:
    with pytest.raises(ValueError) as caught:
        lint(AlwaysFails(), (torch.randn(2, 3), torch.randn(2)), method="hooks")
    message = str(caught.value)
    assert "of shape [(2, 3), (2,)]: RuntimeError: boom — lint runs" in message
    assert "eval-mode" not in message
    assert "\n" not in message


# -- zoo models ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_densenet121_report_fits_the_terminal() -> None:
    tvm = pytest.importorskip("torchvision.models")
    report = lint(tvm.densenet121(drop_rate=0.2), torch.randn(2, 3, 32, 32))
    lines = report.format().splitlines()
    assert max(map(len, lines)) <= 120
    assert len(_rows(report.format())) == len(report.flagged) == 58
    assert len(lines) < len(report.flagged) + 12
    assert len(report.format(verbose=True).splitlines()) > len(report.findings)


def test_convnext_nano_report_is_a_few_lines() -> None:
    timm = pytest.importorskip("timm")
    report = lint(timm.create_model("convnext_nano", drop_path_rate=0.1))
    assert report.ok
    lines = report.format().splitlines()
    assert len(lines) <= 6
    assert max(map(len, lines)) <= 120
