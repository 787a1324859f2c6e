"""Forward+backward time of every varshift noise layer against ``nn.Dropout`` and against a
noise-free floor on the same tensors, measured in the same run (ratios, median of repeats,
cases timed in alternation, round after round).

The floor is ``x * 1.0`` forward+backward: it allocates, writes and reads the output and the
input gradient once each, the least any layer that multiplies its input can do.

Targets: ``GaussianDropout`` and ``Uout`` <= 2x the floor (issue 16);
``VarianceStableDropout`` <= 1.0x ``nn.Dropout(p=0.5)``.
The layers run their CPU fast path here (eager autograd records the call, see
``varshift.layers.noise``); each is also timed as its *reference expression*
(``x * torch.empty_like(x).normal_(...)`` / ``.uniform_(...)``, what the layer computed before
the fast path and still computes under ``torch.compile`` or off CPU), and the random fill alone
(``torch.empty_like(x).normal_()`` / ``.uniform_()``, no multiply, no backward) shows how much
of the gap to the floor torch's serial CPU generator accounts for by itself.
Backward runs twice: with a dense upstream gradient (``backward(grad)``) and with the expanded,
stride-0 one of ``out.sum().backward()``, the usual shape of a scalar loss.
``--inductor`` adds ``torch.compile`` (inductor, C++; about 30 s of compilation per shape) of
``GaussianDropout`` and ``Uout``, which fuses the random numbers into the multiply with
inductor's own per-element Philox generator (a different random stream).
``DropBlock2d`` (4-D inputs) and the DropConnect layers are timed when present; DropConnect
masks a weight, so it is compared with the plain ``nn.Linear``/``nn.Conv2d`` it replaces.

Run: ``python benchmarks/bench_layers.py [--quick] [--threads N] [--inductor]`` or
``python benchmarks/run_all.py``. Timings taken on a shared machine should say so.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import format_ratio_table, interleaved_medians
from varshift.layers.noise import (
    ClassicDropout,
    GaussianDropout,
    Uout,
    VarianceStableDropout,
)

__all__ = ["main"]

BASELINE = "nn.Dropout(p=0.5)"
FLOOR = "floor: x * 1.0"
EXPANDED = "sum-backward: "
FLOOR_TARGET = 2.0  # GaussianDropout and Uout, times the floor (issue 16)
DROPOUT_TARGET = 1.0  # VarianceStableDropout, times nn.Dropout
P, BETA = 0.5, 0.1
GAUSSIAN_STD = math.sqrt(P / (1 - P))
NAN = math.nan


@dataclass(frozen=True)
class Case:
    """One timed layer: forward+backward unless ``forward_only`` (the bare random fills)."""

    layer: Callable[[Tensor], Tensor]
    vs_dropout: float = NAN  # target ratio to nn.Dropout (nan: none)
    vs_floor: float = NAN  # target ratio to the floor (nan: none)
    forward_only: bool = False


def _optional_layer(name: str) -> Any | None:
    """A layer class of another varshift area, or ``None`` while it does not exist."""
    try:
        return getattr(importlib.import_module("varshift.layers"), name)
    except (ImportError, AttributeError):
        return None


def _forward_backward(layer: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    """One forward and a backward with a dense upstream gradient."""
    grad = torch.randn_like(x)

    def step() -> None:
        torch.autograd.backward(layer(x), grad)
        x.grad = None

    return step


def _forward_sum_backward(layer: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    """One forward and ``out.sum().backward()``: the upstream gradient is an expanded
    (stride-0) tensor of ones, as from any loss that sums or averages."""

    def step() -> None:
        layer(x).sum().backward()
        x.grad = None

    return step


def _forward_only(layer: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def _noise_cases(x: Tensor, inductor: bool) -> dict[str, Case]:
    """The cases timed on ``x``, with their targets."""
    floor = FLOOR_TARGET
    cases = {
        BASELINE: Case(nn.Dropout(P)),
        FLOOR: Case(lambda t: t * 1.0),
        f"GaussianDropout(p={P})": Case(GaussianDropout(P), vs_floor=floor),
        f"Uout(beta={BETA})": Case(Uout(BETA), vs_floor=floor),
        "reference: x * normal_": Case(
            lambda t: t * torch.empty_like(t).normal_(1.0, GAUSSIAN_STD)
        ),
        "reference: x * uniform_": Case(
            lambda t: t * torch.empty_like(t).uniform_(1.0 - BETA, 1.0 + BETA)
        ),
        "fill only: normal_ (no backward)": Case(
            lambda t: torch.empty_like(t).normal_(), forward_only=True
        ),
        "fill only: uniform_ (no backward)": Case(
            lambda t: torch.empty_like(t).uniform_(), forward_only=True
        ),
        f"ClassicDropout(p={P})": Case(ClassicDropout(P)),
        f"VarianceStableDropout(p={P})": Case(VarianceStableDropout(P), vs_dropout=DROPOUT_TARGET),
    }
    drop_block = _optional_layer("DropBlock2d")
    if drop_block is not None and x.dim() == 4:
        cases["DropBlock2d(p=0.1, block_size=7)"] = Case(drop_block(0.1, 7))
    if inductor:
        cases[f"inductor: GaussianDropout(p={P})"] = Case(torch.compile(GaussianDropout(P)))
        cases[f"inductor: Uout(beta={BETA})"] = Case(torch.compile(Uout(BETA)))
    return cases


def _noise_tables(shape: tuple[int, ...], rounds: int, inductor: bool) -> list[str]:
    x = torch.randn(shape, requires_grad=True)
    cases = _noise_cases(x, inductor)
    steps: dict[str, Callable[[], None]] = {}
    for name, case in cases.items():
        if case.forward_only:
            steps[name] = _forward_only(case.layer, x)
        else:
            steps[name] = _forward_backward(case.layer, x)
            steps[f"{EXPANDED}{name}"] = _forward_sum_backward(case.layer, x)
    seconds = interleaved_medians(steps, rounds=rounds)
    size = "x".join(map(str, shape))
    tables = []
    for prefix, gradient in (("", "dense gradient"), (EXPANDED, "out.sum().backward()")):
        names = [n for n, c in cases.items() if not (prefix and c.forward_only)]

        def timed(name: str, prefix: str = prefix) -> float:
            return seconds[f"{prefix}{name}" if not cases[name].forward_only else name]

        by_dropout = [(n, timed(n), cases[n].vs_dropout) for n in names]
        by_floor = [(n, timed(n), cases[n].vs_floor) for n in names]
        tables += [
            format_ratio_table(
                f"{size} float32, forward+backward ({gradient}) vs noise-free floor",
                by_floor,
                FLOOR,
            ),
            format_ratio_table(
                f"{size} float32, forward+backward ({gradient}) vs nn.Dropout",
                by_dropout,
                BASELINE,
            ),
        ]
    return tables


def _drop_connect_table(quick: bool, rounds: int) -> str | None:
    linear_cls = _optional_layer("DropConnectLinear")
    conv_cls = _optional_layer("DropConnectConv2d")
    if linear_cls is None or conv_cls is None:
        return None
    width, batch, channels, image = (128, 256, 16, 16) if quick else (1024, 4096, 64, 32)
    linear = nn.Linear(width, width)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x_linear = torch.randn(batch, width, requires_grad=True)
    x_conv = torch.randn(batch // 128, channels, image, image, requires_grad=True)
    cases = {
        "nn.Linear": _forward_backward(linear, x_linear),
        "DropConnectLinear(p=0.5)": _forward_backward(
            linear_cls.from_module(linear, 0.5), x_linear
        ),
        "nn.Conv2d(3x3)": _forward_backward(conv, x_conv),
        "DropConnectConv2d(3x3, p=0.5)": _forward_backward(conv_cls.from_module(conv, 0.5), x_conv),
    }
    seconds = interleaved_medians(cases, rounds=rounds)
    nan = math.nan
    linear_rows = [(name, seconds[name], nan) for name in ("nn.Linear", "DropConnectLinear(p=0.5)")]
    conv_rows = [
        (name, seconds[name], nan) for name in ("nn.Conv2d(3x3)", "DropConnectConv2d(3x3, p=0.5)")
    ]
    return "\n\n".join(
        [
            format_ratio_table(
                f"DropConnect, {batch}x{width} input, forward+backward vs nn.Linear",
                linear_rows,
                "nn.Linear",
            ),
            format_ratio_table(
                f"DropConnect, {batch // 128}x{channels}x{image}x{image} input, "
                "forward+backward vs nn.Conv2d",
                conv_rows,
                "nn.Conv2d(3x3)",
            ),
        ]
    )


def main(quick: bool, *, inductor: bool = False) -> str:
    """Time every layer; return the report text (ratio tables per input size). ``inductor``
    adds the ``torch.compile`` cases (slow to compile)."""
    torch.manual_seed(0)
    shapes: list[tuple[int, ...]] = (
        [(8, 32, 16, 16), (256, 256)] if quick else [(64, 256, 32, 32), (4096, 4096)]
    )
    rounds = 5 if quick else 9
    parts = [
        f"# bench_layers ({'quick' if quick else 'full'}): torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), median of {rounds} interleaved rounds"
    ]
    for shape in shapes:
        parts += _noise_tables(shape, rounds, inductor)
    drop_connect = _drop_connect_table(quick, rounds)
    parts.append(drop_connect if drop_connect is not None else "(DropConnect layers not found)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tensors, few repeats")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run")
    parser.add_argument(
        "--inductor", action="store_true", help="also time torch.compile (inductor) cases"
    )
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(main(args.quick, inductor=args.inductor))
