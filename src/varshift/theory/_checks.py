"""Argument checks shared by the theory functions.

Every check raises :class:`ValueError` naming the argument, the allowed range and the value
received, so that a caller (or the command line, which prints the first line of the message)
knows at once what to change.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ANY_REAL", "Interval", "check_int", "check_real", "check_reals", "is_close_to"]


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

    def requirement(self) -> str:
        bounded = self.low is not None or self.high is not None
        reason = f" ({self.why})" if self.why else ""
        return (f"finite and in {self}" if bounded else "finite") + reason


ANY_REAL = Interval()


def _is_bool(value: Any) -> bool:
    # True/False would pass as 1/0: almost always a slip, never a measured moment.
    return isinstance(value, (bool, np.bool_))


def check_reals(name: str, value: Any, interval: Interval = ANY_REAL) -> npt.NDArray[np.float64]:
    """``value`` (a real number or an array of them) as a float64 array, every entry finite and
    inside ``interval``; otherwise a ``ValueError`` that quotes the first offending entry."""
    try:
        if _is_bool(value):
            raise TypeError
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a real number or an array of them; got {value!r}"
        ) from None
    bad = interval.outside(values)
    if bad.any():
        if values.ndim == 0:
            received = f"{float(values)!r}"
        else:
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            received = f"{float(values[index])!r} at index {index}"
        raise ValueError(f"{name} must be {interval.requirement()}; got {received}")
    return values


def check_real(name: str, value: Any, interval: Interval = ANY_REAL) -> float:
    """Like :func:`check_reals` for one number (arrays refused), returned as a Python float."""
    if not isinstance(value, numbers.Real) or _is_bool(value):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    return float(check_reals(name, value, interval))


def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` as an ``int`` ``≥ low``; floats (even ``3.0``) and bools refused."""
    if not isinstance(value, numbers.Integral) or _is_bool(value):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be an integer in [{low}, inf]; got {int(value)}")
    return int(value)


def is_close_to(value: float, target: float) -> bool:
    """Equality up to rounding, for constraints met exactly in theory (``cos²θ = 1`` at d = 1)."""
    return math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-12)
