"""A real (tiny) torch training run whose numbers depend only on its config and seed, and a
study of such trials that satisfies ``StudyLike``: shared by the backend, store and Ray tests."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from varshift.lab.results import EpochRecord, LayerShiftRecord, TrialResult
from varshift.lab.runner import RunSummary, run_study
from varshift.lab.store import ResultStore

# Columns that legitimately differ between two runs of the same cell.
RUN_SPECIFIC = ["wall_time_s"]


def tiny_trial(
    config: dict[str, Any], seed: int, *, data_dir: str | None = None, threads: int | None = None
) -> TrialResult:
    """Train a 2-layer MLP with BatchNorm and dropout for a few full-batch steps on synthetic
    data; ``crash`` kills the process, ``raise`` raises (with its text as the message, if it is
    one), ``interrupt`` simulates Ctrl-C."""
    if config.get("crash"):
        os._exit(3)
    if config.get("raise"):
        message = config["raise"]
        raise RuntimeError(message if isinstance(message, str) else "boom in the trial")
    if config.get("interrupt"):
        raise KeyboardInterrupt
    start = time.perf_counter()
    time.sleep(float(config.get("sleep", 0.0)))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    width = int(config.get("width", 16))
    model = nn.Sequential(
        nn.Linear(8, width),
        nn.Dropout(float(config.get("p", 0.2))),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 2),
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=0.2)
    epochs = []
    for epoch in range(1, int(config.get("epochs", 3)) + 1):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        model.eval()
        with torch.no_grad():
            logits = model(x)
            test_loss = float(nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(1) == y).float().mean())
        epochs.append(EpochRecord(epoch, loss.item(), test_loss, accuracy, {"lr": 0.2}))
    with torch.no_grad():
        hidden = model[0](x)
        train_var = float(nn.functional.dropout(hidden, 0.2, training=True).var(0).mean())
        eval_var = float(hidden.var(0).mean())
    stored = model[2].running_var
    assert isinstance(stored, torch.Tensor)
    running_var = float(stored.mean())
    ratio = eval_var / train_var
    shift = LayerShiftRecord("net.2", 0, train_var, eval_var, running_var, ratio, 0.8)
    return TrialResult(
        status="done",
        metric_name="accuracy",
        higher_is_better=True,
        wall_time_s=time.perf_counter() - start,
        epochs=tuple(epochs),
        final={"test_metric": accuracy, "test_loss": test_loss, "extra_metric": 1.5},
        layer_shift=(shift,),
    )


class SlowToStart:
    """:func:`tiny_trial` in a worker that is slow to start up: unpickling this object (what a
    process-backend worker does before it can take its first task, as a real worker imports
    torch and loads data) waits until the file ``release`` exists, at most ``limit_s``."""

    def __init__(self, release: str, limit_s: float = 60.0) -> None:
        self.release = release
        self.limit_s = limit_s

    def __call__(
        self, config: dict[str, Any], seed: int, *, data_dir: str | None = None,
        threads: int | None = None,
    ) -> TrialResult:
        return tiny_trial(config, seed, data_dir=data_dir, threads=threads)

    def __getstate__(self) -> dict[str, Any]:
        return {"release": self.release, "limit_s": self.limit_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        deadline = time.monotonic() + self.limit_s
        while not Path(self.release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass(frozen=True)
class TinySpec:
    arm: str
    axes: dict[str, Any]
    config: dict[str, Any]
    seed: int
    config_hash: str


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TinyStudy:
    """A study with arms ``name -> config`` crossed with ``seeds``; satisfies ``StudyLike``."""

    arms: dict[str, dict[str, Any]]
    seeds: Sequence[int] = (0, 1)
    name: str = "tiny"
    description: str = "a tiny study for the lab tests"
    presets: tuple[str, ...] = ("quick",)
    extra: dict[str, Any] = field(default_factory=dict)

    def expand(self, preset: str) -> list[TinySpec]:
        return [
            TinySpec(arm, {"p": cfg.get("p", 0.2)}, cfg, seed, config_hash(cfg))
            for arm, cfg in self.arms.items()
            for seed in self.seeds
        ]

    def spec(self, preset: str) -> dict[str, Any]:
        return {"arms": self.arms, "seeds": list(self.seeds), **self.extra}

    def spec_hash(self, preset: str) -> str:
        return config_hash(self.spec(preset))

    def reference_arm(self, preset: str) -> str:
        return next(iter(self.arms))


def two_arm_study(**extra_arms: dict[str, Any]) -> TinyStudy:
    return TinyStudy({"low": {"p": 0.1}, "high": {"p": 0.5}, **extra_arms})


def run_tiny(study: TinyStudy, db: Path, **options: Any) -> RunSummary:
    """Run ``study`` into ``db`` with :func:`tiny_trial`, quietly."""
    return run_study(study, db_path=db, progress=False, trial_fn=tiny_trial, **options)


def comparable(db: Path, study: str = "tiny") -> dict[str, Any]:
    """The frames of a study without the columns that differ between runs."""
    with ResultStore(db, create=False) as store:
        frames = store.frames(study)
    frames["trials"] = frames["trials"].drop(columns=RUN_SPECIFIC)
    return {name: frame.sort_values(["arm", "seed"], kind="stable").reset_index(drop=True)
            for name, frame in frames.items()}


def assert_same_results(a: dict[str, Any], b: dict[str, Any]) -> None:
    import pandas as pd

    for name in ("trials", "epochs", "layer_shift"):
        # Exact: the same cell gives the same numbers wherever it runs. (Types may differ
        # where one side's column is all NULL.)
        pd.testing.assert_frame_equal(
            a[name].drop(columns="trial_id"),
            b[name].drop(columns="trial_id"),
            check_dtype=False,
            check_exact=True,
            obj=name,
        )
