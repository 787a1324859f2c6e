"""Argument checks shared by the theory functions and the noise layers: the one path every
argument of ``varshift.theory`` and ``varshift.layers`` is validated through.

Every message has one form, ``<name> must be <requirement>, got <value>``, so that a caller
(or the command line, which prints the first line of the message) knows at once what to change.
A value of the wrong type (a string, a bool where a number belongs, a tensor where a Python
number belongs) raises :class:`TypeError`; a number out of range or not finite raises
:class:`ValueError`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = [
    "ANY_REAL",
    "DROP_PROBABILITY",
    "UOUT_HALF_WIDTH",
    "Interval",
    "check_bool",
    "check_floating",
    "check_int",
    "check_real",
    "check_reals",
    "is_close_to",
]


@dataclass(frozen=True)
class Interval:
    """Where a real argument may lie, and why (quoted in the error message)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __str__(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"

    def outside(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Where ``values`` are non-finite or out of the interval."""
        bad = ~np.isfinite(values)
        if self.low is not None:
            bad |= values <= self.low if self.low_open else values < self.low
        if self.high is not None:
            bad |= values >= self.high if self.high_open else values > self.high
        return bad

    def admits(self, value: float) -> bool:
        """Whether one number is finite and inside; plain Python, so that ``torch.compile``
        traces a layer's checks without a graph break (numpy calls would become tensors).
        Comparisons rather than ``math.isfinite``: once dynamo has recompiled for a changed
        rate it passes the rate as a symbolic float, which ``math.isfinite`` cannot take."""
        if not -math.inf < value < math.inf:  # False for nan and ±inf
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def requirement(self) -> str:
        bounded = self.low is not None or self.high is not None
        reason = f" ({self.why})" if self.why else ""
        return (f"finite and in {self}" if bounded else "finite") + reason


ANY_REAL = Interval()

DROP_PROBABILITY = Interval(
    0.0, 1.0, high_open=True, why="the drop probability; p = 1 makes the scale 1/(1 - p) infinite"
)
"""``p`` of every inverted dropout (Bernoulli, Gaussian, DropBlock, DropConnect)."""

UOUT_HALF_WIDTH = Interval(0.0, 1.0, why="the half-width of the uniform noise")
"""``beta`` of Uout: ``1 + U(−β, β) ≥ 0``, so the noise never flips a sign."""


def _is_bool(value: Any) -> bool:
    # True/False would pass as 1/0: almost always a slip, never a measured moment.
    return isinstance(value, (bool, np.bool_))


def _is_real_number(value: Any) -> bool:
    """A Python or NumPy real scalar; bools and tensors (even 0-d ones) are not."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _refuse_out_of_range(name: str, values: npt.NDArray[np.float64], interval: Interval) -> None:
    bad = interval.outside(values)
    if not bad.any():
        return
    if values.ndim == 0:
        received = f"{float(values)!r}"
    else:
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        received = f"{float(values[index])!r} at index {index}"
    raise ValueError(f"{name} must be {interval.requirement()}, got {received}")


def check_reals(name: str, value: Any, interval: Interval = ANY_REAL) -> npt.NDArray[np.float64]:
    """``value`` (a real number or an array of them) as a float64 array, every entry finite and
    inside ``interval``; ``TypeError`` for something that is not real numbers, ``ValueError``
    quoting the first offending entry otherwise."""
    if _is_bool(value) or (isinstance(value, np.ndarray) and value.dtype == np.bool_):
        raise TypeError(f"{name} must be a real number or an array of them, got {value!r}")
    try:
        values = np.asarray(value, dtype=np.float64)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"{name} must be {interval.requirement()}, got {value!r}") from None
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a real number or an array of them, got {value!r}"
        ) from None
    _refuse_out_of_range(name, values, interval)
    return values


def check_real(name: str, value: Any, interval: Interval = ANY_REAL) -> float:
    """One real number (a Python or NumPy scalar; bools, arrays and tensors refused with
    ``TypeError``), finite and inside ``interval``, returned as a Python float."""
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {interval.requirement()}, got {value!r}") from None
    if not interval.admits(number):
        raise ValueError(f"{name} must be {interval.requirement()}, got {number!r}")
    return number


def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` as an ``int`` ``≥ low``; floats (even ``3.0``), bools and tensors refused with
    ``TypeError``."""
    if not isinstance(value, numbers.Integral) or _is_bool(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be an integer in [{low}, inf], got {int(value)}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; ``TypeError`` for anything else (``1``, ``"yes"``)."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_floating(name: str, tensor: Any) -> Tensor:
    """``tensor`` if it is a floating-point :class:`torch.Tensor`; ``TypeError`` otherwise.

    Multiplicative noise has no meaning for integers (``m`` is a real number with ``E[m] = 1``),
    and silently promoting them would hand back another dtype than went in, so integer, bool and
    complex tensors are refused in every mode, as ``torch.nn.functional.dropout`` refuses
    integers in training."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not torch.is_floating_point(tensor):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def is_close_to(value: float, target: float) -> bool:
    """Equality up to rounding, for constraints met exactly in theory (``cos²θ = 1`` at d = 1)."""
    return math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-12)
