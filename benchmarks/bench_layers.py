"""Forward+backward time of every varshift noise layer against ``nn.Dropout`` on the same
tensors, measured in the same run (ratios, median of repeats, cases timed in alternation).

Targets (``nn.Dropout(p=0.5)`` = 1.0): ``GaussianDropout`` and ``Uout`` <= 0.8 (one random fill
and one multiply; torch's CPU dropout draws a Bernoulli per element, which is slow),
``VarianceStableDropout`` <= 1.0. Each layer is also shown against a noise-free floor, ``x * 1.0``
forward+backward on the same tensor (the cost of any layer that reads and writes it once).
Backward runs twice: with a dense upstream gradient (``backward(grad)``) and with the expanded,
stride-0 one of ``out.sum().backward()``, the usual shape of a scalar loss; each against
``nn.Dropout`` given the same kind of gradient.
``DropBlock2d`` (4-D inputs) and the DropConnect layers are timed when present; DropConnect
masks a weight, so it is compared with the plain ``nn.Linear``/``nn.Conv2d`` it replaces.

Run: ``python benchmarks/bench_layers.py [--quick]`` or ``python benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
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


def _noise_layers(x: Tensor) -> dict[str, tuple[Callable[[Tensor], Tensor], float]]:
    """The layers timed on ``x``, each with its target ratio to nn.Dropout (nan: none)."""
    nan = math.nan
    layers: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
        BASELINE: (nn.Dropout(0.5), nan),
        FLOOR: (lambda t: t * 1.0, nan),
        "GaussianDropout(p=0.5)": (GaussianDropout(0.5), 0.8),
        "Uout(beta=0.1)": (Uout(0.1), 0.8),
        "ClassicDropout(p=0.5)": (ClassicDropout(0.5), nan),
        "VarianceStableDropout(p=0.5)": (VarianceStableDropout(0.5), 1.0),
    }
    drop_block = _optional_layer("DropBlock2d")
    if drop_block is not None and x.dim() == 4:
        layers["DropBlock2d(p=0.1, block_size=7)"] = (drop_block(0.1, 7), nan)
    return layers


def _noise_tables(shape: tuple[int, ...], rounds: int) -> list[str]:
    x = torch.randn(shape, requires_grad=True)
    layers = _noise_layers(x)
    cases = {name: _forward_backward(fn, x) for name, (fn, _) in layers.items()}
    for name, (fn, _) in layers.items():
        cases[f"{EXPANDED}{name}"] = _forward_sum_backward(fn, x)
    seconds = interleaved_medians(cases, rounds=rounds)
    rows = [(name, seconds[name], target) for name, (_, target) in layers.items()]
    floor_rows = [(name, s, math.nan) for name, s, _ in rows]
    expanded_rows = [
        (name, seconds[f"{EXPANDED}{name}"], target) for name, (_, target) in layers.items()
    ]
    size = "x".join(map(str, shape))
    return [
        format_ratio_table(f"{size} float32, forward+backward vs nn.Dropout", rows, BASELINE),
        format_ratio_table(
            f"{size} float32, forward+backward vs noise-free floor", floor_rows, FLOOR
        ),
        format_ratio_table(
            f"{size} float32, forward + out.sum().backward() (expanded gradient) vs nn.Dropout",
            expanded_rows,
            BASELINE,
        ),
    ]


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


def main(quick: bool) -> str:
    """Time every layer; return the report text (ratio tables per input size)."""
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
        parts += _noise_tables(shape, rounds)
    drop_connect = _drop_connect_table(quick, rounds)
    parts.append(drop_connect if drop_connect is not None else "(DropConnect layers not found)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tensors, few repeats")
    print(main(parser.parse_args().quick))
