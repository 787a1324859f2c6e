"""benchmarks/bench_zoo.py and bench_lint_zoo.py --quick as smoke runs: they run on real
architectures, restore the thread count, and their reports hold every table, each with a baseline
and a consistent ratio."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW = re.compile(r"^(?P<case>.+?)\s+(?P<ms>\d+\.\d+)\s+(?P<ratio>\d+\.\d+)(\s|$)")


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The benchmark file, loaded as run_all loads it; forgotten again after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import `timing` by name
    run_all = importlib.import_module("run_all")
    monkeypatch.setitem(sys.modules, name, None)  # restored (absent) after the test
    return run_all.load_benchmark(BENCHMARKS / f"{name}.py")


def _tables(report: str) -> dict[str, list[tuple[str, float, float]]]:
    """``{title: [(case, ms, ratio), ...]}`` of every ratio table in the report."""
    tables: dict[str, list[tuple[str, float, float]]] = {}
    for section in report.split("\n## ")[1:]:
        title, header, *lines = section.strip().split("\n\n", 1)[0].splitlines()
        if not header.startswith("case"):
            continue  # the summary
        rows = []
        for line in lines:
            match = ROW.match(line)
            assert match, f"unreadable row in table {title!r}: {line!r}"
            rows.append((match["case"], float(match["ms"]), float(match["ratio"])))
        tables[title] = rows
    return tables


def test_bench_zoo_quick_reports_every_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    bench = _load("bench_zoo", monkeypatch)
    threads = torch.get_num_threads()
    report = bench.main(quick=True, threads=1)
    assert torch.get_num_threads() == threads
    assert report.startswith("# bench_zoo (quick): ")
    tables = _tables(report)
    cnn = "timm efficientnet_b0(drop_path_rate=0.2), 64x64"
    vit = "timm vit_tiny_patch16_224(drop_path_rate=0.2), 64x64"
    expected = {
        f"measure(recalibrate=False) on {cnn}": (
            "train + eval forward",
            "measure(recalibrate=False)",
        ),
        f"measure() on {cnn}": ("train + eval + fresh-statistics forward", "measure()"),
        f"recalibrate_bn on {cnn}": ("swa_utils.update_bn", "recalibrate_bn"),
        f"lint on {cnn}": ("eval forward", "lint"),
        f"lint on {vit}": ("eval forward", "lint"),
    }
    assert set(tables) == set(expected)
    for title, cases in expected.items():
        rows = tables[title]
        assert tuple(case for case, _, _ in rows) == cases, title
        (_, base_ms, base_ratio), (_, ms, ratio) = rows
        assert base_ratio == 1.0
        assert base_ms > 0
        assert math.isfinite(ms)
        assert ms > 0
        # the ratio printed is the ratio of the times printed (both rounded to 2 decimals)
        assert ratio == pytest.approx(ms / base_ms, abs=0.01 + 0.01 * ratio), title
    # The ViT has LayerNorms only: linted, and said to be out of measure's reach.
    assert "not applicable to timm vit_tiny_patch16_224" in report
    summary = report.split("## summary (ratios)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[1] for line in summary[1:]] == [
        "efficientnet_b0(drop_path_rate=0.2)",
        "vit_tiny_patch16_224(drop_path_rate=0.2)",
    ]


def test_bench_zoo_refuses_a_thread_count_below_one(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load("bench_zoo", monkeypatch)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        bench.main(quick=True, threads=0)
    assert torch.get_num_threads() == threads


def test_bench_lint_zoo_quick_times_the_zoo_and_both_lint_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("torchvision")
    bench = _load("bench_lint_zoo", monkeypatch)
    threads = torch.get_num_threads()
    report = bench.main(quick=True)
    assert torch.get_num_threads() == threads
    assert report.startswith("# bench_lint_zoo (quick)")
    per_model = report.split("## lint vs one eval forward, per model (same inputs)\n", 1)[1]
    rows = per_model.split("\n\n", 1)[0].splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["mobilenet_v3_small", "squeezenet1_1",
                                                 "efficientnet_b0"]
    for row in rows:
        forward_ms, lint_ms, ratio = (float(value) for value in row.split()[1:4])
        assert ratio == pytest.approx(lint_ms / forward_ms, rel=0.05, abs=0.1)
    hooks = _tables(report)
    (title,) = [title for title in hooks if title.startswith("hooks vs fx")]
    assert "the same findings on both paths" in title
    cases = {case: ratio for case, _, ratio in hooks[title]}
    assert cases["lint, fx path"] == 1.0
    assert math.isfinite(cases["lint, hook fallback"])
