"""Timing helpers shared by every benchmark: median of repeats after warm-up, and ratios
against a baseline measured in the same run (never against numbers from another run)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = ["format_ratio_table", "interleaved_medians", "intra_op_threads", "median_seconds"]


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: keep the count), restored
    afterwards: every benchmark runs in one process (see run_all.py)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def median_seconds(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_medians(
    cases: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per case over ``rounds`` rounds, every case timed once per round in turn,
    so that a change of load on a shared machine hits all cases alike (timing each case's
    repeats back to back would let one case take all of a quiet or a busy spell)."""
    for fn in cases.values():  # warm-up: allocator, lazy initialisation, caches
        median_seconds(fn, repeats=1, warmup=warmup)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(median_seconds(fn, repeats=1, warmup=0))
    return {name: statistics.median(values) for name, values in samples.items()}


def format_ratio_table(title: str, rows: list[tuple[str, float, float]], baseline: str) -> str:
    """Render ``(name, seconds, target_ratio_or_nan)`` rows as ratios to the row named
    ``baseline``; a target of ``nan`` means no target."""
    base = next(seconds for name, seconds, _ in rows if name == baseline)
    lines = [f"## {title}", f"{'case':<40} {'median ms':>10} {'ratio':>7} {'target':>7}"]
    for name, seconds, target in rows:
        ratio = seconds / base
        target_text = "" if target != target else f"<={target:.2f}"
        mark = "" if target != target else ("  ok" if ratio <= target else "  MISSED")
        lines.append(f"{name:<40} {seconds * 1e3:>10.2f} {ratio:>7.2f} {target_text:>7}{mark}")
    return "\n".join(lines)
