"""Argument types shared by the sub-commands: each refuses a bad value while the command line is
parsed, before any work, with argparse's one-line error (``argument --x: ...``, exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from varshift.checkpoints import keyword_value

__all__ = [
    "figure_file",
    "finite_float",
    "keyword_argument",
    "keyword_value",
    "non_negative_int",
    "output_dir",
    "output_file",
    "positive_int",
]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (``float("nan")`` parses, and would reach the
    maths as a silent NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def output_file(text: str) -> str:
    """A file to write: an existing directory (or a name ending in a separator) is refused, so
    that the command fails now rather than after its work, when it saves. An empty name is refused
    too (``Path("")`` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; name a file to write")
    return text


def output_dir(text: str) -> str:
    """A folder to write into, created if needed: an existing file of that name is refused."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def figure_file(text: str) -> str:
    """A figure to write (:func:`output_file`); a name without a suffix gets ``.png``, so that
    the name printed afterwards is the file matplotlib wrote (it adds ``.png`` by itself)."""
    path = Path(output_file(text))
    return text if path.suffix else text + ".png"


def keyword_argument(text: str) -> str:
    """``KEY=VALUE`` with ``KEY`` a Python name (``drop_path_rate=0.2``), returned as it was
    typed so that a suggested command line can repeat it; :func:`keyword_value` reads it."""
    try:
        keyword_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text
