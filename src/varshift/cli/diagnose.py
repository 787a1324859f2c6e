"""``varshift diagnose`` and ``varshift recalibrate``: lint and measure a model of yours on data,
and write a checkpoint whose BatchNorm statistics were re-estimated with dropout off.

    varshift diagnose --model mypkg.nets:make_net --checkpoint net.pt --data builtin:mnist1d \\
        --plot shift.png --json shift.json
    varshift recalibrate --model mypkg.nets:make_net --checkpoint net.pt \\
        --data mypkg.data:val_loader --samples 4096 --out net-recalibrated.pt
    varshift diagnose --model timm:efficientnet_b0 --model-arg drop_path_rate=0.2 \\
        --checkpoint net.safetensors --data imagefolder:val/ --image-size 224 --batches 8

The model comes from :func:`varshift.checkpoints.load_model` (a factory, ``torchvision:NAME`` or
``timm:NAME``), the data from :mod:`varshift.cli.sources` (``builtin:NAME``,
``imagefolder:PATH`` or a loader factory), the suggested fixes from
:func:`varshift.fix.advice.suggest_fixes`; this module parses, calls and prints. Whatever the
user can fix ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.cli.arguments import figure_file, keyword_argument, output_file, positive_int

if TYPE_CHECKING:
    from torch import nn

    from varshift.cli.sources import Source

__all__ = ["command_line", "recalibrated_path", "register"]

# Repeated from varshift.cli.sources so that `varshift --help` need not import it.
_DEFAULT_BATCH_SIZE = 128
_DEFAULT_IMAGE_SIZE = 224


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``diagnose`` and ``recalibrate`` to the top-level parser."""
    diagnose = subparsers.add_parser(
        "diagnose",
        help="lint a model and measure its variance shift on data, with suggested fixes",
        description="Find the BatchNorm layers fed by dropout (lint), measure at each BatchNorm "
        "the input variance with dropout on and off against the stored running variance, and "
        "suggest fixes.",
    )
    _add_source_arguments(diagnose)
    diagnose.add_argument(
        "--batches", type=positive_int, default=None, help="measure on at most N batches"
    )
    diagnose.add_argument(
        "--plot", metavar="FILE", type=figure_file,
        help="write the shift figure to FILE (format from the suffix; none: .png is added)",
    )  # fmt: skip
    diagnose.add_argument(
        "--json", metavar="FILE", type=output_file, help="write lint, measurement and fixes"
    )
    diagnose.add_argument(
        "--verbose", action="store_true",
        help="list every (BatchNorm, dropout) pair of the lint with its full path",
    )  # fmt: skip
    diagnose.set_defaults(handler=_run_diagnose)

    recalibrate = subparsers.add_parser(
        "recalibrate",
        help="re-estimate BatchNorm statistics with dropout off and save the fixed checkpoint",
        description="Replace every BatchNorm's running mean and variance by population "
        "estimates over the data with dropout off (varshift.fix.recalibrate_bn), print the "
        "eval metrics before and after when the data has labels, and save the state_dict.",
    )
    _add_source_arguments(recalibrate)
    limit = recalibrate.add_mutually_exclusive_group()
    limit.add_argument(
        "--batches", type=positive_int, default=None, help="estimate from at most N batches"
    )
    limit.add_argument(
        "--samples", type=positive_int, default=None, help="estimate from at most N samples"
    )
    noise = recalibrate.add_mutually_exclusive_group()
    noise.add_argument(
        "--keep-noise", action="store_true",
        help="keep dropout on during the estimation, as torch.optim.swa_utils.update_bn does "
        "(keeps the shift; for comparison)",
    )  # fmt: skip
    # The flag's earlier spelling, kept so that existing scripts run: --dropout on = --keep-noise.
    noise.add_argument("--dropout", choices=("off", "on"), default=None, help=argparse.SUPPRESS)
    recalibrate.add_argument(
        "--exact", action="store_true",
        help="one pass per depth level, so every BatchNorm sees its input exactly as in eval",
    )  # fmt: skip
    recalibrate.add_argument(
        "--out", metavar="FILE", type=output_file, required=True,
        help="where to save the fixed state_dict (FILE.safetensors: as safetensors; any other "
        "name: with torch.save)",
    )  # fmt: skip
    recalibrate.set_defaults(handler=_run_recalibrate)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the data: shared by both commands."""
    parser.add_argument(
        "--model", metavar="SPEC", required=True,
        help="pkg.module:factory, a function (or class) that returns the nn.Module; or "
        "torchvision:NAME or timm:NAME, randomly initialised (no weights are downloaded)",
    )  # fmt: skip
    parser.add_argument(
        "--model-arg", metavar="KEY=VALUE", action="append", type=keyword_argument,
        default=[],
        help="a keyword argument of the model (repeatable), the value read as a Python literal "
        "or else kept as a string: --model-arg drop_path_rate=0.2",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", metavar="FILE", default=None,
        help="a state_dict saved with torch.save, or a .safetensors file",
    )  # fmt: skip
    parser.add_argument(
        "--data", metavar="SPEC", required=True,
        help="builtin:NAME (digits, mnist1d, mnist5k, ...), imagefolder:PATH (one sub-folder "
        "of images per class) or pkg.module:loader_factory, a function that returns an "
        "iterable of batches",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=None,
        help=f"batch size for builtin: and imagefolder: data (default {_DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", metavar="N", type=positive_int, default=None,
        help="imagefolder: images are resized and centre-cropped to N x N "
        f"(default {_DEFAULT_IMAGE_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--no-normalize", action="store_true",
        help="imagefolder: keep pixel values in [0, 1] (default: ImageNet mean and std)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of a built-in dataset's train/test split (digits) and of the order "
        "imagefolder: images are read in (default 0)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def command_line(
    command: str,
    *,
    model: str,
    data: str,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    model_args: Sequence[str] = (),
    image_size: int | None = None,
    normalize: bool = True,
) -> str:
    """The shell command ``varshift COMMAND`` with these source arguments (quoted);
    ``model_args`` are ``KEY=VALUE`` texts, one ``--model-arg`` each."""
    words = ["varshift", command, "--model", model]
    for pair in model_args:
        words += ["--model-arg", pair]
    if checkpoint is not None:
        words += ["--checkpoint", str(checkpoint)]
    words += ["--data", data]
    if batch_size is not None:
        words += ["--batch-size", str(batch_size)]
    if image_size is not None:
        words += ["--image-size", str(image_size)]
    if not normalize:
        words += ["--no-normalize"]
    if seed:
        words += ["--seed", str(seed)]
    if out is not None:
        words += ["--out", str(out)]
    return shlex.join(words)


def recalibrated_path(checkpoint: str | os.PathLike[str] | None) -> Path:
    """Where a suggested ``recalibrate`` writes: beside the checkpoint, ``-recalibrated`` added
    to its name (``recalibrated.pt`` without a checkpoint)."""
    if checkpoint is None:
        return Path("recalibrated.pt")
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-recalibrated{path.suffix or '.pt'}")


# --- diagnose ------------------------------------------------------------------------------------


def _run_diagnose(args: argparse.Namespace) -> int:
    from varshift.cli.sources import model_kwargs, open_source
    from varshift.diagnose import lint, measure
    from varshift.fix.advice import suggest_fixes

    source = open_source(args)
    report = lint(source.model, source.example)
    shift = measure(source.model, source.test, batches=args.batches, progress=not args.no_progress)
    recalibrate = command_line(
        "recalibrate", model=args.model, checkpoint=args.checkpoint, data=args.data,
        batch_size=args.batch_size, seed=args.seed, out=recalibrated_path(args.checkpoint),
        model_args=args.model_arg, image_size=args.image_size, normalize=not args.no_normalize,
    )  # fmt: skip
    tips = suggest_fixes(report, shift, recalibrate=recalibrate)
    print(f"{_source_header(args)}, measured on {source.test_text}")
    print()
    print(_lint_text(report, verbose=args.verbose))
    print()
    print(shift)
    print()
    print("suggested fixes:")
    for tip in tips:
        print(f"  - {tip}")
    if args.plot is not None:
        print(f"plot written to {shift.plot(args.plot)}")
    if args.json is not None:
        payload = {
            "model": args.model,
            "model_args": model_kwargs(args.model_arg),
            "checkpoint": args.checkpoint,
            "data": args.data,
            "lint": report.to_dict(),
            "measure": json.loads(shift.to_json()),
            "suggestions": tips,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"json written to {path}")
    return 0


def _lint_text(report: Any, *, verbose: bool) -> str:
    """The lint report as printed: ``report.format(verbose=...)``, or ``str(report)`` for a
    report class that does not have ``format`` yet."""
    format_report = getattr(report, "format", None)
    if format_report is None:
        return str(report)
    return str(format_report(verbose=verbose))


def _source_header(args: argparse.Namespace) -> str:
    arguments = "".join(f" {pair}" for pair in args.model_arg)
    checkpoint = f" with {args.checkpoint}" if args.checkpoint else ""
    return f"model {args.model}{arguments}{checkpoint}"


# --- recalibrate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Evaluation:
    """Eval-mode figures of the model on some batches (loss/accuracy ``None`` without targets)."""

    samples: int
    batches: int
    loss: float | None
    accuracy: float | None

    @property
    def has_metrics(self) -> bool:
        return self.loss is not None or self.accuracy is not None


def _run_recalibrate(args: argparse.Namespace) -> int:
    from varshift.checkpoints import save_state_dict
    from varshift.cli.sources import open_source
    from varshift.diagnose.bn_stats import batch_norms
    from varshift.fix import recalibrate_bn

    keep_noise = args.keep_noise or args.dropout == "on"
    source = open_source(args)
    model = source.model
    stored = {name: float(bn.running_var.mean()) for name, bn in _running(batch_norms(model))}
    before = _evaluate(model, source.test)
    recalibrate_bn(
        model, source.fit, batches=args.batches, samples=args.samples,
        keep_noise=keep_noise, exact=args.exact, progress=not args.no_progress,
    )  # fmt: skip
    after = _evaluate(model, source.test)
    # Written only now: a failure above (recalibrate_bn and measure refuse nan/inf statistics
    # and losses, a loader may break) leaves no half-fixed checkpoint behind.
    out = save_state_dict(model.state_dict(), args.out)

    how = "level by level (--exact)" if args.exact else "in one pass"
    print(_source_header(args))
    print(
        f"re-estimated {len(stored)} BatchNorm layer(s) on {source.fit_text}"
        f"{_limit_text(args, source, before)}, dropout {'on' if keep_noise else 'off'}, {how}"
    )
    print("running_var (channel mean): stored -> re-estimated")
    width = max(len(name) for name in stored)
    for name, bn in _running(batch_norms(model)):
        print(f"  {name:<{width}}  {stored[name]:.4g} -> {float(bn.running_var.mean()):.4g}")
    if not (before.has_metrics and after.has_metrics):
        print(f"no targets in {source.test_text}: no eval metrics")
    else:
        print(
            f"eval on {source.test_text}: loss {_metric_text(before.loss)} -> "
            f"{_metric_text(after.loss)}, accuracy {_metric_text(before.accuracy)} -> "
            f"{_metric_text(after.accuracy)}"
        )
    print(f"fixed checkpoint written to {out}")
    return 0


def _limit_text(args: argparse.Namespace, source: Source, evaluated: _Evaluation) -> str:
    """How much of the data the estimate used, with the real count when the data held less
    than asked. A loader that can be read again is both ``fit`` and ``test``, so its size is
    the one the evaluation counted."""
    for asked, unit, known in (
        (args.samples, "samples", source.fit_samples),
        (args.batches, "batches", source.fit_batches),
    ):
        if asked is None:
            continue
        if known is None:
            known = evaluated.samples if unit == "samples" else evaluated.batches
        if known < asked:
            return f", using all {known} {unit} (asked for {asked})"
        return f", using the first {asked} {unit}"
    return ""


def _running(named: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    # The root module is named "" by named_modules(); show it the way measure's table does.
    for name, bn in named:
        yield name or "<root>", bn


def _evaluate(model: nn.Module, data: Iterable[Any]) -> _Evaluation:
    """Eval-mode loss and accuracy on ``data``, as :func:`~varshift.diagnose.measure` computes
    them (it refuses class labels out of range and a nan/inf loss, in one line)."""
    from varshift.diagnose import measure

    report = measure(model, data, recalibrate=False, progress=False)
    return _Evaluation(report.samples, report.batches, report.loss_before, report.accuracy_before)


def _metric_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
