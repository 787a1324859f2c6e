"""The cost of re-estimating BatchNorm statistics during training, as a ratio to one epoch.

Model and data: the demo's :class:`varshift.demo.DemoNet` (three conv → dropout → BatchNorm →
ReLU blocks, 32 channels) on sklearn's digits (1437 training images of 8×8; quick: 256), batches
of 64, Adam, one torch thread. Two comparisons, every case timed in alternation (round after round):

1. *Per re-estimation*, against one hand-written training epoch (forward, backward, Adam step
   over the training loader): what :class:`RecalibrateBatchNorm` does at the end of ``fit`` or
   before each validation, i.e. :meth:`Recalibrator.run` over the same loader, with the
   callback's default ``measure_batches=4`` (measure first, then re-estimate), without
   measuring, and with ``samples=512``. Target: the default costs at most one epoch (it runs
   forwards only: one per sample, plus four per measured sample).
2. *Through Lightning*: ``Trainer.fit`` for 3 epochs without and with the callback (defaults:
   once, at the end of training), so that the ratio includes the callback's hooks and logging.
   The extra time divided by one epoch of that fit is printed below the table.

Runs alone: ``python benchmarks/bench_integrations.py [--quick]``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from timing import format_ratio_table, interleaved_medians

EPOCHS_IN_FIT = 3
BATCH_SIZE = 64


def main(quick: bool = False) -> str:
    import pytorch_lightning as pl

    from varshift.data import load_builtin
    from varshift.demo import DemoNet
    from varshift.integrations import Recalibrator
    from varshift.integrations.lightning import RecalibrateBatchNorm

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    rounds = 1 if quick else 7
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        digits = load_builtin("digits", seed=0)
        if quick:
            digits = digits.subset(256, 64, seed=0)
        dataset = TensorDataset(digits.x_train, digits.y_train)
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
        model = DemoNet(digits.input_shape)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def epoch() -> None:
            model.train()
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        def recalibrate(**settings: Any) -> Any:
            return lambda: Recalibrator(**settings).run(model, loader)

        per_pass = interleaved_medians(
            {
                "one training epoch": epoch,
                "re-estimate, measure_batches=4": recalibrate(measure_batches=4),
                "re-estimate, measure_batches=0": recalibrate(),
                "re-estimate, samples=512": recalibrate(samples=512),
            },
            rounds=rounds,
        )

        class Module(pl.LightningModule):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.net = DemoNet(digits.input_shape)

            def forward(self, x: Tensor) -> Tensor:
                out: Tensor = self.net(x)
                return out

            def training_step(self, batch: Any, index: int) -> Tensor:
                return F.cross_entropy(self(batch[0]), batch[1])

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.Adam(self.parameters(), lr=1e-3)

        def fit(with_callback: bool) -> Any:
            def run() -> None:
                callbacks = [RecalibrateBatchNorm()] if with_callback else []
                trainer = pl.Trainer(
                    accelerator="cpu",
                    max_epochs=EPOCHS_IN_FIT,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=callbacks,
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trainer.fit(Module(), loader)

            return run

        fits = interleaved_medians(
            {"fit, 3 epochs": fit(False), "fit, 3 epochs + callback": fit(True)},
            rounds=max(1, rounds // 2),
        )
    finally:
        torch.set_num_threads(threads)

    base = per_pass["one training epoch"]
    nan = float("nan")
    first = format_ratio_table(
        "one re-estimation vs one training epoch",
        [
            ("one training epoch", base, nan),
            # No target in quick mode: 4 batches are then the whole training set, measured.
            (
                "re-estimate, measure_batches=4",
                per_pass["re-estimate, measure_batches=4"],
                nan if quick else 1.0,
            ),
            ("re-estimate, measure_batches=0", per_pass["re-estimate, measure_batches=0"], nan),
            ("re-estimate, samples=512", per_pass["re-estimate, samples=512"], nan),
        ],
        baseline="one training epoch",
    )
    second = format_ratio_table(
        "Trainer.fit with and without the callback",
        [
            ("fit, 3 epochs", fits["fit, 3 epochs"], nan),
            ("fit, 3 epochs + callback", fits["fit, 3 epochs + callback"], nan),
        ],
        baseline="fit, 3 epochs",
    )
    extra = fits["fit, 3 epochs + callback"] - fits["fit, 3 epochs"]
    per_epoch = fits["fit, 3 epochs"] / EPOCHS_IN_FIT
    mode = "quick" if quick else "full"
    header = (
        f"# bench_integrations ({mode}): DemoNet on digits ({len(dataset)} training images, "
        f"batches of {BATCH_SIZE}), 1 thread, median of {rounds} interleaved rounds"
    )
    note = (
        f"callback overhead in fit: {extra * 1e3:.0f} ms = {extra / per_epoch:.2f} of one "
        f"Lightning epoch ({per_epoch * 1e3:.0f} ms; Trainer start-up spread over the epochs)"
    )
    return "\n\n".join([header, first, second, note])


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv[1:]))
