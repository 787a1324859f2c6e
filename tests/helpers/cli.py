"""Helpers for the CLI tests: run ``varshift`` in-process and expect one error line; a module of
model and loader factories for ``--model``/``--data``."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from varshift.cli import main


def fails_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``argv``, expect exit status 2 and return the single line written to stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = int(exit_.code or 0)
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# Factories for builtin:digits (samples Tensor[1, 8, 8], 10 classes) and loader factories, some
# of them hostile.
ZOO = """
from collections import OrderedDict

import torch
from torch import nn


def _net(channels, *, dropout_before_bn):
    layers = [
        ("conv", nn.Conv2d(1, channels, 3, padding=1)), ("bn", nn.BatchNorm2d(channels)),
        ("act", nn.ReLU()), ("flat", nn.Flatten()), ("head", nn.Linear(channels * 64, 10)),
    ]
    layers.insert(1 if dropout_before_bn else 4, ("drop", nn.Dropout(0.5)))
    return nn.Sequential(OrderedDict(layers))


def noisy():
    return _net(6, dropout_before_bn=True)


def clean():
    return _net(6, dropout_before_bn=False)


def wider():
    return _net(8, dropout_before_bn=True)


def nobn():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def for_mnist1d():
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 10), nn.BatchNorm1d(10))


def empty():
    return []


def unlabelled():
    return (torch.randn(16, 1, 8, 8) for _ in range(3))


def labelled():
    return [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]


def endless():
    def forever():
        while True:
            yield torch.randn(16, 1, 8, 8)
    return forever()


def bad_labels():
    return [(torch.randn(16, 1, 8, 8), torch.full((16,), label)) for label in (3, 12)]


def nan_inputs():
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    batches[1][0, 0, 0, 0] = float("nan")
    return batches


def huge():
    # Finite inputs that overflow float32 inside the model: the second batch only.
    return [torch.randn(16, 1, 8, 8), torch.full((16, 1, 8, 8), 3e38)]


class _Breaks:
    def __iter__(self):
        yield torch.randn(16, 1, 8, 8)
        yield torch.randn(16, 1, 8, 8)
        raise RuntimeError("disk went away")


def breaks():
    return _Breaks()
"""


def write_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Write :data:`ZOO` into ``tmp_path`` under a name unique to the test (so no earlier import
    is reused), make ``tmp_path`` the current directory with neither it nor ``""`` on
    ``sys.path`` (as for the installed script; ``sys.path`` is restored afterwards), and return
    the module's name."""
    name = f"zoo_{abs(hash(tmp_path)) % 10**9}"
    (tmp_path / f"{name}.py").write_text(ZOO)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    importlib.invalidate_caches()
    return name
