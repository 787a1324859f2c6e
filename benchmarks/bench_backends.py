"""The lab's backends on the same tiny trials: ``process`` (2 workers) against ``local``, and
``ray`` against ``process``, once each backend is up; start-up costs reported on their own.

Every backend runs :func:`varshift.lab.trial.run_trial` on the same configs and seeds. A batch
is timed from the first submission to the last result, through the :class:`Backend` interface
the driver uses (the store is left out: one SQLite commit per trial is well under a
millisecond). Targets: process ≥ 1.8× faster than local on 2 cores (ratio ≤ 0.56), Ray within
10% of process once started (ratio ≤ 1.10). Every trial, local ones included, runs with
cores // workers torch threads, so the first table measures how the work scales over
processes, not how torch's threads do on a small model.

Run: ``.venv/bin/python benchmarks/bench_backends.py [--quick]``.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import format_ratio_table, median_seconds
from varshift.lab.backends import (
    Backend,
    LocalBackend,
    ProcessBackend,
    RayBackend,
    TrialTask,
    default_threads,
)
from varshift.lab.config import TrialConfig
from varshift.lab.trial import run_trial

__all__ = ["main"]

WORKERS = 2


def _config(quick: bool) -> TrialConfig:
    """A small CNN on the 8x8 digits: a fraction of a second per trial."""
    return TrialConfig.from_dict({
        "data": {"dataset": "digits", "train_size": 300 if quick else 600, "test_size": 60},
        "model": {"order": "conv-bn-act-drop-pool", "widths": [8, 16], "padding": "same",
                  "head_hidden": [32]},
        "dropout": {"rate": 0.3},
        "train": {"epochs": 2 if quick else 5, "batch_size": 32},
    })


def _batch(backend: Backend, tasks: list[TrialTask]) -> None:
    """Run ``tasks`` to the end, keeping the backend full, as the driver does."""
    waiting = list(reversed(tasks))
    running = 0
    while waiting or running:
        while waiting and running < backend.capacity:
            backend.submit(waiting.pop())
            running += 1
        if backend.next_outcome().result.status != "done":
            raise RuntimeError("a benchmark trial failed")
        running -= 1


def _timed_start(make: Callable[[], Backend], warm: list[TrialTask]) -> tuple[Backend, float]:
    """Build a backend and run one trial per worker (loading torch and the data everywhere);
    returns it with the seconds that took."""
    start = time.perf_counter()
    backend = make()
    _batch(backend, warm)
    return backend, time.perf_counter() - start


def _effective_cores(workers: int) -> float:
    """How many cores ``workers`` processes really get now (``workers`` on an idle machine):
    one pure-Python loop alone against ``workers`` at once. On a shared machine this says how
    far the speed-up target can be met at all."""
    work = range(20_000_000)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        list(pool.map(sum, [range(10)] * workers))  # start every process first
        start = time.perf_counter()
        pool.submit(sum, work).result()
        alone = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(sum, [work] * workers))
        together = time.perf_counter() - start
    return workers * alone / together


def main(quick: bool) -> str:
    config = _config(quick)
    trials, repeats = (6, 1) if quick else (24, 3)
    tasks = [TrialTask(i, config, seed) for i, seed in enumerate(range(trials))]
    warm = [TrialTask(-1 - i, config, 1000 + i) for i in range(WORKERS)]

    def timed(backend: Backend) -> float:
        return median_seconds(lambda: _batch(backend, tasks), repeats=repeats, warmup=0)

    threads = default_threads(WORKERS)
    lines = [
        f"# bench_backends ({'quick' if quick else 'full'}): {trials} trials of a small CNN on "
        f"digits, {WORKERS} workers, {threads} torch threads per trial, median of {repeats}; "
        f"{_effective_cores(WORKERS):.2f} of {WORKERS} cores free at the start"
    ]
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        local, local_start = _timed_start(lambda: LocalBackend(run_trial), warm[:1])
        local_s = timed(local)
    finally:
        torch.set_num_threads(saved_threads)
    process, process_start = _timed_start(
        lambda: ProcessBackend(None, workers=WORKERS), warm
    )
    try:
        process_s = timed(process)
        lines.append(format_ratio_table(
            "process (2 workers) vs local, backends up",
            [("local", local_s, float("nan")), ("process", process_s, 1 / 1.8)],
            baseline="local",
        ))
        lines.append(_ray_section(tasks, warm, process_s, timed))
    finally:
        process.close()
    lines.append(
        f"start-up (first trial of each worker, data loading included): local "
        f"{local_start:.2f} s, process {process_start:.2f} s"
    )
    return "\n\n".join(lines)


def _ray_section(
    tasks: list[TrialTask], warm: list[TrialTask], process_s: float,
    timed: Callable[[Backend], float],
) -> str:
    try:
        import ray  # noqa: F401 - only to know whether it is there
    except ImportError:
        return "## ray vs process\nray is not installed (pip install 'varshift[ray]'): skipped"
    ray_backend, ray_start = _timed_start(
        lambda: RayBackend(run_trial, workers=WORKERS), warm
    )
    try:
        ray_s = timed(ray_backend)
    finally:
        ray_backend.close()
    table = format_ratio_table(
        f"ray vs process, {len(tasks)} trials, Ray up",
        [("process", process_s, float("nan")), ("ray", ray_s, 1.10)],
        baseline="process",
    )
    return f"{table}\nRay start-up (ray.init and one trial per worker): {ray_start:.2f} s"


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv[1:]))
