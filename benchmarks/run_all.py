"""Run every ``benchmarks/bench_*.py`` and collect the reports in ``benchmarks/RESULTS.md``.

The convention each benchmark file follows:

* it exposes ``main(quick: bool) -> str`` and returns its report as Markdown text, opening with
  a level-1 heading ``# bench_<name> (quick|full): <setting>`` (sizes, threads, repeats), then
  one ``##`` table per comparison, built with :func:`timing.format_ratio_table`;
* every ratio compares cases measured in the same run, on the same tensors (never numbers
  from another run), median of repeats;
* ``quick=True`` finishes in seconds (small tensors, few repeats), for smoke runs on a busy
  machine; ``quick=False`` is the measurement to report, on a quiet machine;
* it may print progress to stderr, but restores any global state it changes (seed aside),
  such as ``torch.set_num_threads``, since all benchmarks run in one process;
* it also runs alone: ``python benchmarks/bench_<name>.py [--quick]``.

Usage: ``python benchmarks/run_all.py [--quick] [--only NAME ...] [--threads N] [--output PATH]``.
A benchmark that raises is reported as failed (traceback in the results) and the others still
run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["discover", "load_benchmark", "main", "run_benchmark"]

HERE = Path(__file__).resolve().parent


def discover(only: list[str] | None = None) -> list[Path]:
    """The ``bench_*.py`` files next to this one, sorted; ``only`` keeps those whose name
    (with or without the ``bench_`` prefix and ``.py`` suffix) it lists."""
    files = sorted(HERE.glob("bench_*.py"))
    if not only:
        return files
    wanted = {name.removeprefix("bench_").removesuffix(".py") for name in only}
    unknown = wanted - {path.stem.removeprefix("bench_") for path in files}
    if unknown:
        raise ValueError(f"only must name existing benchmarks, got unknown {sorted(unknown)}")
    return [path for path in files if path.stem.removeprefix("bench_") in wanted]


def load_benchmark(path: Path) -> ModuleType:
    """The benchmark file ``path`` as a module (registered in ``sys.modules`` under its stem)."""
    # The benchmark files import their neighbour `timing` by plain name.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmark file {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as `import` does: dataclasses look their module up there.
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def run_benchmark(path: Path, quick: bool) -> tuple[str, bool]:
    """``(report, ok)`` for one benchmark file; a failure becomes a report with its traceback."""
    start = time.perf_counter()
    try:
        report = load_benchmark(path).main(quick)
        if not isinstance(report, str):
            raise TypeError(f"{path.name}: main(quick) must return str, got {type(report)}")
    except Exception:
        return f"# {path.stem}: FAILED\n\n```\n{traceback.format_exc()}```", False
    return f"{report}\n\n_({time.perf_counter() - start:.1f} s)_", True


def _header(quick: bool) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"# Benchmark results ({'quick' if quick else 'full'})\n\n"
        f"{stamp}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"{platform.machine()} {platform.processor() or platform.platform()}; "
        f"Python {platform.python_version()}. Ratios compare cases timed in the same run."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every benchmark")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="report file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    reports = [_header(args.quick)]
    failed = []
    for path in discover(args.only):
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        report, ok = run_benchmark(path, args.quick)
        print(report, flush=True)
        print(flush=True)
        reports.append(report)
        if not ok:
            failed.append(path.name)
    args.output.write_text("\n\n".join(reports) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
