"""Cost of :func:`varshift.diagnose.measure` and :func:`varshift.fix.recalibrate_bn` against the
plain forwards they are built on, measured in the same run.

- ``measure`` (no targets, ``recalibrate=False``) against one training-mode plus one eval-mode
  forward over the same batches: target <= 1.5x (the hooks add one per-channel reduction of
  each BatchNorm input per forward).
- ``recalibrate_bn`` against :func:`torch.optim.swa_utils.update_bn` on the same model and
  batches: target <= 1.05x (both are one training-mode forward per batch; ours reads the batch
  statistics the BatchNorm computes anyway).
- ``lint`` with example inputs (the exact second-moment pass of
  :mod:`varshift.diagnose.noise_moments`) against ``lint`` with the same inputs and the
  single-path formula only (the pass switched off), on torchvision's ``densenet121(drop_rate=0.2)``
  (or, without torchvision, a look-alike: growth 32, blocks 6/12/24/16, dropout 0.2 in every
  bottleneck; 58 noise sources either way; 2x3x64x64 inputs): target <= 3x.

Run: ``python benchmarks/bench_diagnose.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import format_ratio_table, interleaved_medians, intra_op_threads
from varshift.diagnose import lint, measure
from varshift.fix import recalibrate_bn

__all__ = ["main"]


def _net(channels: int, p: float = 0.2) -> nn.Sequential:
    """Four conv-BN blocks, dropout before the last three convolutions (so before their BN)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for block in range(4):
        if block:
            layers.append(nn.Dropout(p))
        layers += [
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        if block < 3:
            layers.append(nn.MaxPool2d(2))
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 bottleneck, dropout on the new features (torchvision's
    ``_DenseLayer`` with ``drop_rate``), concatenated to its input."""

    def __init__(self, channels: int, growth: int, p: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 4 * growth, 1)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.drop(self.conv2(F.relu(self.norm2(h))))], 1)


def _densenet(
    growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16), p: float = 0.2
) -> nn.Sequential:
    """A DenseNet-121-like network, for a machine without torchvision (the ``zoo`` extra)."""
    channels = 2 * growth
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False)]
    for index, count in enumerate(blocks):
        for _ in range(count):
            layers.append(_DenseLayer(channels, growth, p))
            channels += growth
        if index < len(blocks) - 1:
            layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1),
                       nn.AvgPool2d(2)]
            channels //= 2
    layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def _lint_model() -> tuple[nn.Module, str]:
    """torchvision's ``densenet121(drop_rate=0.2)`` (the issue's yardstick), else the look-alike."""
    try:
        from torchvision.models import densenet121
    except ImportError:
        return _densenet(), "a DenseNet-121-like model (torchvision not installed)"
    return densenet121(drop_rate=0.2), "torchvision densenet121(drop_rate=0.2)"


def _lint_cost(rounds: int, warmup: int) -> str:
    """``lint(model, x)`` with and without the exact pass (a private switch in lint)."""
    (model, described), x = _lint_model(), torch.randn(2, 3, 64, 64)
    # The package exports the function ``lint`` under the module's name: import the module.
    lint_module = importlib.import_module("varshift.diagnose.lint")
    names = vars(lint_module)
    exact_pass = names["_data_predictions"]

    def formula_only() -> None:
        names["_data_predictions"] = lambda *args: None
        try:
            lint(model, x)
        finally:
            names["_data_predictions"] = exact_pass

    report = lint(model, x)
    bases = sorted({f.basis for f in report.findings})
    seconds = interleaved_medians(
        {"formula": formula_only, "exact": lambda: lint(model, x)}, rounds=rounds, warmup=warmup
    )
    rows = [
        ("lint, single-path formula", seconds["formula"], math.nan),
        ("lint, exact pass", seconds["exact"], 3.0),
    ]
    title = (
        f"lint on {described}, 2x3x64x64, {len(report.findings)} findings "
        f"({'/'.join(bases)})"
    )
    return format_ratio_table(title, rows, "lint, single-path formula")


def main(quick: bool) -> str:
    """Time both comparisons on one intra-op thread (steadier on a shared machine; the thread
    count is restored afterwards); return the report text (two ratio tables)."""
    with intra_op_threads(1):
        return _run(quick)


def _run(quick: bool) -> str:
    torch.manual_seed(0)
    if quick:
        channels, size, n_batches, batch_size, repeats, warmup = 16, 16, 8, 32, 9, 2
    else:
        channels, size, n_batches, batch_size, repeats, warmup = 64, 32, 20, 64, 3, 1
    model = _net(channels)
    data = [torch.randn(batch_size, 3, size, size) for _ in range(n_batches)]
    with torch.no_grad():
        model.train()
        for x in data:  # non-trivial running statistics, as after training
            model(x)

    baseline_model = copy.deepcopy(model)

    def two_forwards() -> None:
        with torch.no_grad():
            baseline_model.train()
            for x in data:
                baseline_model(x)
            baseline_model.eval()
            for x in data:
                baseline_model(x)

    def run_measure() -> None:
        measure(model, data, recalibrate=False, progress=False)

    update_model = copy.deepcopy(model)
    ours_model = copy.deepcopy(model)

    def run_update_bn() -> None:
        update_bn(data, update_model)

    def run_recalibrate() -> None:
        recalibrate_bn(ours_model, data, progress=False)

    nan = math.nan
    seconds = interleaved_medians(
        {
            "forwards": two_forwards,
            "measure": run_measure,
            "update_bn": run_update_bn,
            "recalibrate": run_recalibrate,
        },
        rounds=repeats,
        warmup=warmup,
    )
    measure_rows = [
        ("train + eval forward", seconds["forwards"], nan),
        ("measure(recalibrate=False)", seconds["measure"], 1.5),
    ]
    recal_rows = [
        ("swa_utils.update_bn", seconds["update_bn"], nan),
        ("recalibrate_bn", seconds["recalibrate"], 1.05),
    ]
    setting = (
        f"4 conv-BN blocks, {channels} channels, {size}x{size} inputs, "
        f"{n_batches} batches of {batch_size}, {torch.get_num_threads()} thread(s)"
    )
    return "\n\n".join(
        [
            f"# bench_diagnose ({'quick' if quick else 'full'}): {setting}",
            format_ratio_table("measure", measure_rows, "train + eval forward"),
            format_ratio_table("recalibrate_bn", recal_rows, "swa_utils.update_bn"),
            _lint_cost(rounds=3 if quick else 5, warmup=1),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few batches")
    print(main(parser.parse_args().quick))
