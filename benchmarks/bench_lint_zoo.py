"""Cost of :func:`varshift.diagnose.lint` on real architectures, as a ratio to one eval-mode
forward of the same model on the same inputs, measured in the same run.

- **The torchvision zoo**: every classification model of
  ``torchvision.models.list_models(module=torchvision.models)``, random weights
  (``weights=None``), ``lint(model, x)`` with example inputs ``x`` of 2x3x64x64 (2x3x224x224 for
  ``vit_*``, ``swin_*`` and ``maxvit_*``, which need it; 2x3x299x299 for ``inception_v3``, built
  with ``aux_logits=False, init_weights=False``, as is ``googlenet``). Each model: one eval
  forward to warm up, the forward timed three times (median), then one lint.
  Reported: every model's ratio (lint / forward), the total, and the slowest models.
- **The hook fallback against the fx path** on models fx can trace: ``lint(model, x,
  method="hooks")`` against ``lint(model, x, method="fx")``, interleaved rounds: target <= 2x.
  Both give the same findings and predictions (``tests/test_lint_paths.py``).

No target for the zoo ratio: lint runs the model a few times (the tracer, the measurement pass,
the exact second-moment pass) and ``draws`` Monte Carlo forwards where noise reaches a
BatchNorm through a non-linear path, of which only the part the noise changes is recomputed.

Run: ``python benchmarks/bench_lint_zoo.py [--quick]`` (one intra-op thread; needs torchvision,
and timm for one hooks-vs-fx row). ``--quick``: three small models at 32x32 and one hooks-vs-fx
pair, seconds. Full: 80 models and five hooks-vs-fx pairs; 70 minutes on one thread of a 2-core
machine under a load average of 7 to 13 (then with three lints per model, now one): expect 20 to
30 minutes on a quiet one. The largest models (``vit_h_14``, ``regnet_y_128gf``) need a few GiB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import format_ratio_table, interleaved_medians, intra_op_threads
from varshift.diagnose import lint

__all__ = ["main"]

_QUICK_ZOO = ("mobilenet_v3_small", "squeezenet1_1", "efficientnet_b0")
_LARGE_INPUT = ("vit_", "swin_", "maxvit_")
_SLOWEST = 10


@dataclass(frozen=True)
class _Case:
    """One model and its example inputs, built on demand (the zoo is too large to hold)."""

    name: str
    build: Callable[[], nn.Module]
    size: int

    def inputs(self) -> Tensor:
        return torch.randn(2, 3, self.size, self.size, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class _Timing:
    name: str
    forward: float
    lint: float
    method: str
    findings: int

    @property
    def ratio(self) -> float:
        return self.lint / self.forward


def main(quick: bool) -> str:
    """Time the zoo and the hooks-vs-fx comparison on one intra-op thread (the thread count is
    restored afterwards); return the report text."""
    with intra_op_threads(1):
        return _run(quick)


def _run(quick: bool) -> str:
    import torchvision  # the zoo extra; imported here so that the module loads without it

    rounds = 2 if quick else 3
    zoo = _zoo(torchvision, quick)
    pairs = _path_cases(torchvision, quick)
    mode = "quick" if quick else "full"
    lines = [
        f"# bench_lint_zoo ({mode}): {len(zoo)} torchvision classifiers, random weights, "
        f"batch 2, 1 thread; forward median of 3, one lint; hooks vs fx median of {rounds} "
        "interleaved rounds",
        "",
    ]
    lines += _zoo_report(zoo)
    for case in pairs:
        lines += ["", _path_table(case, rounds)]
    return "\n".join(lines)


def _zoo(torchvision: object, quick: bool) -> list[_Case]:
    models = torchvision.models  # type: ignore[attr-defined]
    names = list(_QUICK_ZOO) if quick else models.list_models(module=models)
    return [_zoo_case(models, name, 32 if quick else _input_size(name)) for name in names]


def _input_size(name: str) -> int:
    if name.startswith(_LARGE_INPUT):
        return 224
    return 299 if name == "inception_v3" else 64


def _zoo_case(models: object, name: str, size: int) -> _Case:
    kwargs: dict[str, object] = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    return _Case(name, lambda: models.get_model(name, **kwargs), size)  # type: ignore[attr-defined]


def _path_cases(torchvision: object, quick: bool) -> list[_Case]:
    """Models both tracers follow; noise that reaches BatchNorms through non-linear paths
    (Monte Carlo), through linear ones (exact), or none at all (the tracers alone)."""
    models = torchvision.models  # type: ignore[attr-defined]
    effnet = _Case(
        "tv efficientnet_b0 (stochastic depth 0.2)",
        lambda: models.efficientnet_b0(stochastic_depth_prob=0.2),
        32 if quick else 64,
    )
    if quick:
        return [effnet]
    cases = [
        _Case("tv resnet50 (no noise)", lambda: models.resnet50(), 64),
        effnet,
        _Case("tv densenet121 (dropout 0.2)", lambda: models.densenet121(drop_rate=0.2), 64),
        _Case("tv maxvit_t (stochastic depth 0.2)", lambda: models.maxvit_t(), 224),
    ]
    try:
        import timm
    except ImportError:
        return cases
    build = lambda: timm.create_model("resnet50", drop_path_rate=0.1)  # noqa: E731
    return [*cases, _Case("timm resnet50 (drop path 0.1)", build, 64)]


def _time_one(case: _Case) -> _Timing | str:
    """The case's forward and lint times, or why it could not be timed."""
    try:
        model, x = case.build().eval(), case.inputs()
    except Exception as error:  # a model this torchvision cannot build: reported, not fatal
        return f"{case.name}: build failed ({type(error).__name__}: {error})"
    try:
        _forward(model, x)  # warm-up: allocator, lazy initialisation
        forward = statistics.median(_seconds(lambda: _forward(model, x)) for _ in range(3))
        start = time.perf_counter()
        report = lint(model, x)
        seconds = time.perf_counter() - start
    except Exception as error:  # reported in the table, the other models still run
        return f"{case.name}: failed ({type(error).__name__}: {str(error).splitlines()[0]})"
    return _Timing(case.name, forward, seconds, report.method, len(report.findings))


def _forward(model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        model(x)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _zoo_report(cases: list[_Case]) -> list[str]:
    # lint's first call imports and registers the noise of torchvision and timm: not a model's.
    lint(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(2, 3, 8, 8))
    timings: list[_Timing] = []
    failures: list[str] = []
    for case in cases:
        print(f"bench_lint_zoo: {case.name} ({case.size}x{case.size})", file=sys.stderr)
        found = _time_one(case)
        if isinstance(found, str):
            failures.append(found)
        else:
            timings.append(found)
    lines = ["## lint vs one eval forward, per model (same inputs)", _table(timings)]
    if timings:
        total_lint = sum(t.lint for t in timings)
        total_forward = sum(t.forward for t in timings)
        lines += [
            "",
            f"total: lint {total_lint:.1f} s over {len(timings)} models, "
            f"{total_lint / total_forward:.1f}x their forwards ({total_forward:.2f} s); "
            f"median ratio {statistics.median(t.ratio for t in timings):.1f}x",
            "",
            f"## the {min(_SLOWEST, len(timings))} slowest lints",
            _table(sorted(timings, key=lambda t: t.lint, reverse=True)[:_SLOWEST]),
        ]
    if failures:
        lines += ["", "## not timed", *failures]
    return lines


def _table(timings: list[_Timing]) -> str:
    rows = [f"{'model':<34} {'forward ms':>10} {'lint ms':>10} {'ratio':>7} {'method':>6} "
            f"{'findings':>8}"]
    rows += [
        f"{t.name:<34} {t.forward * 1e3:>10.1f} {t.lint * 1e3:>10.1f} {t.ratio:>7.1f} "
        f"{t.method:>6} {t.findings:>8}"
        for t in timings
    ]
    return "\n".join(rows)


def _path_table(case: _Case, rounds: int) -> str:
    """One model: an eval forward, lint on the fx path and on the hook fallback."""
    print(f"bench_lint_zoo: hooks vs fx on {case.name}", file=sys.stderr)
    model, x = case.build().eval(), case.inputs()
    by_fx, by_hooks = lint(model, x, method="fx"), lint(model, x, method="hooks")
    pairs = [{(f.bn, f.source) for f in r.findings} for r in (by_fx, by_hooks)]
    shifts = [[(f.bn, f.source, f.predicted_shift) for f in r.findings] for r in (by_fx, by_hooks)]
    agreement = "the same findings" if pairs[0] == pairs[1] else "DIFFERENT findings"
    if shifts[0] != shifts[1]:  # functional noise calls get the formula on the hook fallback
        agreement += ", different predictions"
    seconds = interleaved_medians(
        {
            "one eval forward": lambda: _forward(model, x),
            "lint, fx path": lambda: lint(model, x, method="fx"),
            "lint, hook fallback": lambda: lint(model, x, method="hooks"),
        },
        rounds=rounds,
        warmup=0,
    )
    rows = [
        ("one eval forward", seconds["one eval forward"], float("nan")),
        ("lint, fx path", seconds["lint, fx path"], float("nan")),
        ("lint, hook fallback", seconds["lint, hook fallback"], 2.0),
    ]
    title = (
        f"hooks vs fx: {case.name}, 2x3x{case.size}x{case.size}, {len(by_fx.findings)} findings, "
        f"{agreement} on both paths"
    )
    return format_ratio_table(title, rows, baseline="lint, fx path")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three small models, seconds")
    print(main(parser.parse_args().quick))
