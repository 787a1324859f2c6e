"""``varshift demo``: train a small conv net with dropout before BatchNorm on a built-in dataset,
then lint it, measure the variance shift and compare three ways of setting BatchNorm statistics.

    varshift demo
    varshift demo --data digits --epochs 30 --out demo-digits --seed 1
    varshift demo --quick

The work is :func:`varshift.demo.run_demo`; this module parses, calls it and prints its report,
the files it wrote and the commands that diagnose and fix the checkpoint it saved.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from varshift.cli.arguments import non_negative_int, output_dir

__all__ = ["register"]

# Repeated from varshift.demo so that `varshift --help` need not import torch.
_DATASETS = ("mnist1d", "digits", "mnist5k")

# --quick: one epoch on a stratified subset, a smoke test of the whole pipeline in seconds.
_QUICK_EPOCHS = 1
_QUICK_TRAIN = 512
_QUICK_TEST = 256


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``demo`` to the top-level parser."""
    demo = subparsers.add_parser(
        "demo",
        help="train a net with dropout before BatchNorm and show the shift and its fix",
        description="Train a small convolutional net (conv -> dropout(p=0.3) -> BatchNorm -> "
        "ReLU, three blocks) on a built-in dataset on the CPU, then print the lint report, the "
        "measured per-layer variance shift and the test accuracy (a) as trained, (b) after "
        "re-estimating BatchNorm statistics with dropout off, (c) with dropout on (what "
        "torch.optim.swa_utils.update_bn does). Writes figures and the checkpoint to --out.",
    )
    demo.add_argument(
        "--data", choices=_DATASETS, default="mnist1d",
        help="built-in dataset, generated or shipped locally (default mnist1d)",
    )
    demo.add_argument(
        "--epochs", type=non_negative_int, default=None,
        help="training epochs (default 20; 5 for mnist5k, whose images cost more)",
    )
    demo.add_argument(
        "--out", metavar="DIR", type=output_dir, default="varshift-demo",
        help="folder for the figures and model.pt (default ./varshift-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--quick", action="store_true",
        help=f"a smoke test: {_QUICK_EPOCHS} epoch on {_QUICK_TRAIN} training and {_QUICK_TEST} "
        "test samples (--epochs still applies)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from varshift.demo import run_demo

    epochs = args.epochs
    if args.quick and epochs is None:
        epochs = _QUICK_EPOCHS
    result = run_demo(
        data=args.data,
        epochs=epochs,
        out_dir=args.out,
        seed=args.seed,
        train_size=_QUICK_TRAIN if args.quick else None,
        test_size=_QUICK_TEST if args.quick else None,
        progress=not args.no_progress,
    )
    print(result)
    print()
    for path in result.files:
        print(f"written: {path}")
    from varshift.cli.diagnose import command_line, recalibrated_path

    source: dict[str, Any] = {
        "model": f"varshift.demo:{args.data}_net",
        "checkpoint": result.files[-1],
        "data": f"builtin:{args.data}",
        "seed": args.seed,  # the seed picks digits' train/test split
    }
    print("next:")
    print("  " + command_line("diagnose", **source))
    out = recalibrated_path(result.files[-1])
    print("  " + command_line("recalibrate", **source, out=out))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
