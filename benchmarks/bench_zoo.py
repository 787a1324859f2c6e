"""Cost of :func:`varshift.diagnose.measure`, :func:`varshift.fix.recalibrate_bn` and
:func:`varshift.diagnose.lint` on real architectures (the ``zoo`` extra: torchvision, timm;
random initialisation, no download), each against its natural baseline measured in the same run.

Models (full run): timm ``resnet50(drop_path_rate=0.2)``, timm
``efficientnet_b0(drop_path_rate=0.2)``, torchvision ``densenet121(drop_rate=0.2)`` and timm
``vit_tiny_patch16_224(drop_path_rate=0.2)``. The stochastic depth and dropout put noise before
BatchNorms, so ``measure`` has a variance shift to find. The ViT normalises with LayerNorm and
has no BatchNorm: ``measure`` and ``recalibrate_bn`` refuse it (there are no running statistics
to measure or re-estimate), so it is linted only; lint must then report nothing.

Per model with BatchNorms, on 4 batches of 16x3x128x128 (quick: 2 batches of 2x3x64x64):

- ``measure(recalibrate=False)`` against one training-mode plus one eval-mode forward over the
  same batches (the two passes it reports): target <= 1.5x;
- ``measure()`` (the default, which adds the fresh-statistics pass: dropout off, BatchNorms on
  batch statistics) against those two forwards plus one such fresh-statistics forward: target
  <= 1.5x. Against two forwards alone its floor is the cost of the third pass (about 1.6x on
  efficientnet_b0, where a forward with batch statistics costs 1.5x an eval forward);
- ``recalibrate_bn`` against :func:`torch.optim.swa_utils.update_bn` on the same batches (both
  one training-mode forward per batch): target <= 1.0x;
- ``lint(model, example_inputs=x)`` against one eval-mode forward of ``x`` (4x3x128x128, ViT
  4x3x224x224; quick: 2x3x64x64): reported, no target.

The data carries no labels, so ``measure`` makes no "after" evaluation pass. A library that is
not installed turns its models into one line of the report. Thread count: the current one
(``run_all.py --threads N`` sets it) unless ``threads`` is given; restored afterwards.

Run: ``python benchmarks/bench_zoo.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import format_ratio_table, interleaved_medians, intra_op_threads
from varshift.diagnose import lint, measure
from varshift.fix import recalibrate_bn

__all__ = ["main"]

TWO_PASSES = "train + eval forward"
THREE_PASSES = "train + eval + fresh-statistics forward"
EVAL_FORWARD = "eval forward"
UPDATE_BN = "swa_utils.update_bn"


class _Spec(NamedTuple):
    """One benchmarked architecture: ``build(image_size)`` makes it (random weights)."""

    label: str
    library: str
    build: Callable[[int], nn.Module]
    image_size: int  # of the full run; the quick run uses 64
    in_quick: bool


def _timm(name: str, **kwargs: object) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        timm = importlib.import_module("timm")
        model: nn.Module = timm.create_model(name, pretrained=False, **kwargs)
        return model

    return build


def _timm_vit(name: str) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        timm = importlib.import_module("timm")
        model: nn.Module = timm.create_model(
            name, pretrained=False, drop_path_rate=0.2, img_size=image_size
        )
        return model

    return build


def _torchvision(name: str, **kwargs: object) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        models = importlib.import_module("torchvision.models")
        model: nn.Module = getattr(models, name)(weights=None, **kwargs)
        return model

    return build


SPECS = (
    _Spec(
        "timm resnet50(drop_path_rate=0.2)",
        "timm",
        _timm("resnet50", drop_path_rate=0.2),
        128,
        False,
    ),
    _Spec(
        "timm efficientnet_b0(drop_path_rate=0.2)",
        "timm",
        _timm("efficientnet_b0", drop_path_rate=0.2),
        128,
        True,
    ),
    _Spec(
        "torchvision densenet121(drop_rate=0.2)",
        "torchvision",
        _torchvision("densenet121", drop_rate=0.2),
        128,
        False,
    ),
    _Spec(
        "timm vit_tiny_patch16_224(drop_path_rate=0.2)",
        "timm",
        _timm_vit("vit_tiny_patch16_224"),
        224,
        True,
    ),
)


class _Sizes(NamedTuple):
    batches: int
    batch_size: int
    lint_batch: int
    rounds: int
    warmup: int


QUICK = _Sizes(batches=2, batch_size=2, lint_batch=2, rounds=1, warmup=1)
FULL = _Sizes(batches=4, batch_size=16, lint_batch=4, rounds=3, warmup=1)


def main(quick: bool, threads: int | None = None) -> str:
    """Time every available model; return the report (ratio tables per model). ``threads``:
    ``torch.set_num_threads`` for the run (``None``: keep the current count), restored after."""
    with intra_op_threads(threads):
        return _run(quick)


def _run(quick: bool) -> str:
    sizes = QUICK if quick else FULL
    parts = [
        f"# bench_zoo ({'quick' if quick else 'full'}): torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); measure/recalibrate on {sizes.batches} batches "
        f"of {sizes.batch_size}x3xSxS, lint on {sizes.lint_batch}x3xSxS; random weights; "
        f"median of {sizes.rounds} interleaved rounds"
    ]
    summary: list[str] = []
    for spec in SPECS:
        if quick and not spec.in_quick:
            continue
        if importlib.util.find_spec(spec.library) is None:
            parts.append(f"(skipped {spec.label}: {spec.library} is not installed)")
            continue
        tables, line = _model_report(spec, sizes, 64 if quick else spec.image_size)
        parts += tables
        summary.append(line)
    if summary:
        header = (
            "## summary (ratios)\n"
            f"{'model':<48} {'measure/2':>9} {'measure/3':>9} {'recal':>6} {'lint':>6}"
        )
        parts.insert(1, "\n".join([header, *summary]))
    return "\n\n".join(parts)


def _model_report(spec: _Spec, sizes: _Sizes, image: int) -> tuple[list[str], str]:
    """The ratio tables of one model and its line of the summary table."""
    torch.manual_seed(0)
    model = spec.build(image)
    data = [torch.randn(sizes.batch_size, 3, image, image) for _ in range(sizes.batches)]
    lint_input = torch.randn(sizes.lint_batch, 3, image, image)
    has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
    if has_bn:
        _settle_running_statistics(model, data)
    cases = _lint_cases(model, lint_input)
    if has_bn:
        cases |= _statistics_cases(model, data)
    seconds = interleaved_medians(cases, rounds=sizes.rounds, warmup=sizes.warmup)
    where = f"{spec.label}, {image}x{image}"
    nan = math.nan
    lint_table = format_ratio_table(
        f"lint on {where}",
        [(EVAL_FORWARD, seconds[EVAL_FORWARD], nan), ("lint", seconds["lint"], nan)],
        EVAL_FORWARD,
    )
    lint_ratio = seconds["lint"] / seconds[EVAL_FORWARD]
    if not has_bn:
        note = f"(measure, recalibrate_bn: not applicable to {spec.label}, no BatchNorm layer)"
        line = f"{spec.label:<48} {'-':>9} {'-':>9} {'-':>6} {lint_ratio:>6.2f}"
        return [lint_table, note], line
    tables = [
        format_ratio_table(
            f"measure(recalibrate=False) on {where}",
            [
                (TWO_PASSES, seconds[TWO_PASSES], nan),
                ("measure(recalibrate=False)", seconds["measure_two"], 1.5),
            ],
            TWO_PASSES,
        ),
        format_ratio_table(
            f"measure() on {where}",
            [
                (THREE_PASSES, seconds[THREE_PASSES], nan),
                ("measure()", seconds["measure_three"], 1.5),
            ],
            THREE_PASSES,
        ),
        format_ratio_table(
            f"recalibrate_bn on {where}",
            [(UPDATE_BN, seconds[UPDATE_BN], nan), ("recalibrate_bn", seconds["recal"], 1.0)],
            UPDATE_BN,
        ),
        lint_table,
    ]
    line = (
        f"{spec.label:<48} {seconds['measure_two'] / seconds[TWO_PASSES]:>9.2f} "
        f"{seconds['measure_three'] / seconds[THREE_PASSES]:>9.2f} "
        f"{seconds['recal'] / seconds[UPDATE_BN]:>6.2f} {lint_ratio:>6.2f}"
    )
    return tables, line


def _settle_running_statistics(model: nn.Module, data: list[Tensor]) -> None:
    """Training-mode forwards, so the running statistics are those of trained BatchNorms."""
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    model.eval()


def _lint_cases(model: nn.Module, x: Tensor) -> dict[str, Callable[[], object]]:
    def eval_forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return {EVAL_FORWARD: eval_forward, "lint": lambda: lint(model, example_inputs=x)}


def _statistics_cases(model: nn.Module, data: list[Tensor]) -> dict[str, Callable[[], object]]:
    """The measure and recalibration cases and their baselines, each on its own copy of the
    model (the baselines change running statistics; measure puts them back)."""
    forwards = copy.deepcopy(model)
    norms = [m for m in forwards.modules() if isinstance(m, _BatchNorm)]

    def passes(fresh: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                forwards.train()
                for x in data:
                    forwards(x)
                forwards.eval()
                for x in data:
                    forwards(x)
                if fresh:  # noise off, BatchNorms on batch statistics
                    for norm in norms:
                        norm.train()
                    for x in data:
                        forwards(x)

        return run

    update_model, ours = copy.deepcopy(model), copy.deepcopy(model)
    return {
        TWO_PASSES: passes(False),
        "measure_two": lambda: measure(model, data, recalibrate=False, progress=False),
        THREE_PASSES: passes(True),
        "measure_three": lambda: measure(model, data, progress=False),
        UPDATE_BN: lambda: update_bn(data, update_model),
        "recal": lambda: recalibrate_bn(ours, data, progress=False),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, fewest models")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: current)")
    arguments = parser.parse_args()
    print(main(arguments.quick, arguments.threads))
