"""The lab's trial runner against a hand-written PyTorch loop training the same model on the
same data for the same epochs with the same seed.

The compared part is training plus the per-epoch test evaluation, which both do; the lab's
end-of-trial measurements (per-BN variance shift, BatchNorm recalibration and re-evaluation) are
reported on their own line. A third loop batches through ``DataLoader(TensorDataset)`` instead
of indexing in-memory tensors with a permutation, to show what per-sample collation costs.

Run: ``.venv/bin/python benchmarks/bench_trial.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import format_ratio_table, median_seconds
from varshift.lab.config import TrialConfig
from varshift.lab.models import build_model
from varshift.lab.trial import load_trial_data, run_trial

__all__ = ["main"]

SEED = 0


def _configs(quick: bool) -> dict[str, TrialConfig]:
    """A small CNN, where compute dominates, and an MLP, where batching overhead shows."""
    common = {"data": {"dataset": "digits"}, "dropout": {"rate": 0.3},
              "train": {"epochs": 1 if quick else 3, "batch_size": 32, "lr": 0.001}}
    models = {
        "CNN 16-32 + dense 64": {"order": "conv-bn-act-drop-pool", "widths": [16, 32],
                                 "padding": "same", "head_hidden": [64]},
        "MLP 64-64": {"order": "linear-bn-act-drop", "widths": [64, 64]},
    }
    return {name: TrialConfig.from_dict({**common, "model": model})
            for name, model in models.items()}


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = float(F.cross_entropy(out, y))
        accuracy = float((out.argmax(1) == y).float().mean())
    model.train()
    return loss, accuracy


def _plain_loop(config: TrialConfig, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
                x_test: Tensor, y_test: Tensor, input_shape: tuple[int, ...]) -> float:
    """What a user would write by hand: seed, build, Adam, per epoch train then evaluate.
    Returns the seconds spent after building the model, the part the lab's ``train_s`` times."""
    torch.manual_seed(SEED)
    model = build_model(config, input_shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    start = time.perf_counter()
    for epoch in range(config.train.epochs):
        model.train()
        for xb, yb in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        _evaluate(model, x_test, y_test)
    return time.perf_counter() - start


def main(quick: bool) -> str:
    torch.set_num_threads(1)
    return "\n\n".join(_compare(name, config, quick)
                       for name, config in _configs(quick).items())


def _compare(name: str, config: TrialConfig, quick: bool) -> str:
    data = load_trial_data(config)
    x, y, batch = data.x_train, data.y_train, config.train.batch_size
    order = torch.Generator().manual_seed(SEED)

    def indexed(_: int) -> Iterable[tuple[Tensor, Tensor]]:
        perm = torch.randperm(len(x), generator=order)
        return ((x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, len(x), batch))

    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(SEED))
    repeats, warmup = (3, 1) if quick else (7, 2)
    timings: dict[str, list[float]] = {"plain": [], "loader": [], "lab": [], "measure": []}

    def lab() -> None:
        result = run_trial(config, SEED, threads=1)
        timings["lab"].append(result.meta["train_s"])
        timings["measure"].append(result.meta["measure_s"])

    def loop(name: str, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]]
             ) -> Callable[[], None]:
        def run() -> None:
            timings[name].append(_plain_loop(config, batches, data.x_test, data.y_test,
                                             data.input_shape))
        return run

    # Interleaved, so that load from other processes on a shared machine hits all three alike.
    rotation = [loop("plain", indexed), loop("loader", lambda _: loader), lab]
    median_seconds(lambda: [fn() for fn in rotation], repeats=repeats, warmup=warmup)
    plain, with_loader, lab_train, measure = (
        statistics.median(timings[name][warmup:]) for name in ("plain", "loader", "lab",
                                                               "measure"))
    rows = [
        ("hand-written loop (tensor indexing)", plain, float("nan")),
        ("run_trial: training + per-epoch eval", lab_train, 1 / 0.95),
        ("hand-written loop, DataLoader", with_loader, float("nan")),
    ]
    title = (f"trial runner vs hand-written loop: {name}, digits {len(x)} train / "
             f"{len(data.x_test)} test, {config.train.epochs} epoch(s), batch {batch}, 1 thread")
    table = format_ratio_table(title, rows, "hand-written loop (tensor indexing)")
    return (f"{table}\nend-of-trial shift measurement + BN recalibration + re-evaluation: "
            f"{measure * 1e3:.1f} ms ({measure / lab_train:.0%} of the training time)")


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv[1:]))
