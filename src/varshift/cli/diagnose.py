"""``varshift diagnose`` and ``varshift recalibrate``: lint and measure a model of yours on data,
and write a checkpoint whose BatchNorm statistics were re-estimated with dropout off.

    varshift diagnose --model mypkg.nets:make_net --checkpoint net.pt --data builtin:mnist1d \\
        --plot shift.png --json shift.json
    varshift recalibrate --model mypkg.nets:make_net --checkpoint net.pt \\
        --data mypkg.data:val_loader --samples 4096 --out net-recalibrated.pt

``--model pkg.module:factory`` imports the module (the current directory is on the path, as with
``python -m``) and calls ``factory()`` for an ``nn.Module``; ``--checkpoint`` loads a
``state_dict`` into it (``torch.load(..., weights_only=True)``). ``--data builtin:NAME`` is a
built-in dataset (:func:`varshift.data.load_dataset`) cut into ``(x, y)`` batches of
``--batch-size``: ``diagnose`` measures on its test split; ``recalibrate`` estimates on its
training split and evaluates before and after on its test split, so that the reported accuracy
is on samples the statistics never saw. ``--data pkg.module:loader_factory`` calls a function
that returns an iterable of batches (tensors, ``(x, y)`` tuples or dicts, see
:mod:`varshift.diagnose.batches`), used for everything; a one-shot iterator (a generator) is
read into memory once, since the commands pass over the data several times.

Whatever the user can fix (a factory that cannot be imported, a missing or mismatched
checkpoint, a model without BatchNorm, data the model cannot take, an empty loader) ends the
command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from varshift.data import SplitDataset
    from varshift.diagnose import LintReport, ShiftReport

__all__ = ["command_line", "recalibrated_path", "register"]

_BUILTIN = "builtin:"
_DEFAULT_BATCH_SIZE = 128
# A stored running variance more than 5% away from the one re-estimated with dropout off is
# worth fixing; momentum-0.1 moving averages of a converged model wander by less than that.
_TOLERANCE = 0.05
# Keys under which training scripts commonly nest the state_dict in a checkpoint dict.
_NESTED_STATE = ("state_dict", "model_state_dict", "model")
_MAX_NAMES = 3


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
        "--batches", type=_positive_int, default=None, help="measure on at most N batches"
    )
    diagnose.add_argument("--plot", metavar="FILE", help="write the shift figure (PNG) to FILE")
    diagnose.add_argument("--json", metavar="FILE", help="write lint, measurement and fixes")
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
        "--batches", type=_positive_int, default=None, help="estimate from at most N batches"
    )
    limit.add_argument(
        "--samples", type=_positive_int, default=None, help="estimate from exactly N samples"
    )
    recalibrate.add_argument(
        "--dropout", choices=("off", "on"), default="off",
        help="noise during the estimation: off (default, the fix) or on (what "
        "torch.optim.swa_utils.update_bn does; keeps the shift)",
    )
    recalibrate.add_argument(
        "--exact", action="store_true",
        help="one pass per depth level, so every BatchNorm sees its input exactly as in eval",
    )
    recalibrate.add_argument(
        "--out", metavar="FILE", required=True, help="where to save the fixed state_dict"
    )
    recalibrate.set_defaults(handler=_run_recalibrate)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the data: shared by both commands."""
    parser.add_argument(
        "--model", metavar="MODULE:FACTORY", required=True,
        help="pkg.module:factory, a function (or class) that returns the nn.Module",
    )
    parser.add_argument(
        "--checkpoint", metavar="FILE", default=None, help="a state_dict saved with torch.save"
    )
    parser.add_argument(
        "--data", metavar="SPEC", required=True,
        help="builtin:NAME (digits, mnist1d, mnist5k, ...) or pkg.module:loader_factory, a "
        "function that returns an iterable of batches",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=None,
        help=f"batch size for builtin: data (default {_DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of a built-in dataset's train/test split (digits; default 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def command_line(
    command: str,
    *,
    model: str,
    data: str,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
) -> str:
    """The shell command ``varshift COMMAND`` with these source arguments (quoted)."""
    words = ["varshift", command, "--model", model]
    if checkpoint is not None:
        words += ["--checkpoint", str(checkpoint)]
    words += ["--data", data]
    if batch_size is not None:
        words += ["--batch-size", str(batch_size)]
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


# --- loading the model and the data -----------------------------------------------------------


def _error(message: str) -> Exception:
    from varshift.cli import CommandError

    return CommandError(message)


def _one_line(exc: BaseException, *, every_line: bool = False) -> str:
    """``Type: message`` on one line: the first line of the message, or all of them joined
    (load_state_dict puts the useful part on the later lines)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines) if every_line else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _import_callable(spec: str, flag: str) -> Callable[[], Any]:
    """``pkg.module:attr`` → the attribute, the current directory on ``sys.path`` first."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        forms = "builtin:NAME or pkg.module:function" if flag == "--data" else "pkg.module:function"
        raise _error(f"{flag} must be {forms}, got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so local modules are found
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # anything the module raises at import is the user's to fix
        raise _error(f"{flag} {spec}: cannot import {module_name!r}: {_one_line(exc)}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _error(f"{flag} {spec}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _error(f"{flag} {spec}: {attribute!r} is a {type(target).__name__}, not callable")
    return target  # type: ignore[no-any-return]


def _call(spec: str, flag: str) -> Any:
    factory = _import_callable(spec, flag)
    try:
        return factory()
    except Exception as exc:
        raise _error(f"{flag} {spec}: calling it raised {_one_line(exc)}") from exc


def _load_model(args: argparse.Namespace) -> nn.Module:
    from torch import nn

    from varshift.diagnose.bn_stats import batch_norms

    model = _call(args.model, "--model")
    if not isinstance(model, nn.Module):
        raise _error(
            f"--model {args.model} returned an object of type {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    if args.checkpoint is not None:
        _load_checkpoint(model, args.checkpoint)
    if not batch_norms(model):
        raise _error(
            f"the model from --model {args.model} ({type(model).__name__}) has no BatchNorm "
            "layer with running statistics: there is no variance shift to diagnose or fix"
        )
    return model


def _load_checkpoint(model: nn.Module, path: str) -> None:
    import torch

    if not Path(path).is_file():
        raise _error(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _error(
            f"cannot read checkpoint {path} (expected a state_dict saved with torch.save): "
            f"{_one_line(exc)}"
        ) from exc
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [state[key] for key in _NESTED_STATE if isinstance(state.get(key), Mapping)]
        state = nested[0] if nested else state
    if not isinstance(state, Mapping):
        raise _error(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    problems = _mismatch(model.state_dict(), state)
    if problems:
        raise _error(f"checkpoint {path} does not match the model: {problems}")
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise _error(
            f"checkpoint {path} does not match the model: {_one_line(exc, every_line=True)}"
        ) from exc


def _mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """Missing keys, unexpected keys and shape differences, on one line ('' if none)."""
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    shapes = [
        f"{key} is {tuple(state[key].shape)} in the checkpoint, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state and hasattr(state[key], "shape") and state[key].shape != value.shape
    ]
    parts = [
        f"{label} {_names(names)}"
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch:", shapes),
        )
        if names
    ]
    return "; ".join(parts)


@dataclass
class _Source:
    """What a command runs on: the model, the batches statistics are estimated from (``fit``)
    and those it is evaluated/measured on (``test``), each with a description."""

    model: nn.Module
    fit: Iterable[Any]
    fit_text: str
    test: Iterable[Any]
    test_text: str
    example: Any  # the model input of the first test batch, for lint


def _open_source(args: argparse.Namespace) -> _Source:
    model = _load_model(args)
    if args.data.strip().lower().startswith(_BUILTIN):
        return _builtin_source(args, model)
    if args.batch_size is not None:
        raise _error(
            "--batch-size applies to builtin: data only; a loader factory makes its own batches"
        )
    loader = _call(args.data, "--data")
    loader = _replayable(loader, args.data, getattr(args, "batches", None))
    first = next(iter(loader), None)
    if first is None:
        raise _error(f"--data {args.data}: the loader yielded no batch")
    try:
        example = _first_input(first)
    except ValueError as exc:
        raise _error(f"--data {args.data}: cannot use its first batch: {exc}") from exc
    _probe(model, example, f"the first batch of --data {args.data} ({_shapes(example)})")
    text = f"--data {args.data}"
    return _Source(model, loader, text, loader, text, example)


def _replayable(loader: Any, spec: str, batches: int | None) -> Iterable[Any]:
    import torch

    if isinstance(loader, torch.Tensor):
        return [loader]  # a bare tensor is one batch, as everywhere in varshift
    if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
        raise _error(
            f"--data {spec} returned an object of type {type(loader).__name__}, "
            "not an iterable of batches"
        )
    if isinstance(loader, Iterator):
        return list(islice(loader, batches))  # several passes follow; islice(it, None) is all
    return loader


def _first_input(item: Any) -> Any:
    """The model input of one raw batch, by the rules of :mod:`varshift.diagnose.batches`."""
    from varshift.diagnose.batches import BatchStream

    return next(iter(BatchStream([item], batches=1))).inputs


def _shapes(inputs: Any) -> str:
    if hasattr(inputs, "shape"):
        return f"input of shape {tuple(inputs.shape)}"
    return f"input {type(inputs).__name__}"


def _probe(model: nn.Module, inputs: Any, what: str) -> Any:
    """One eval-mode forward, so that data the model cannot take fails here in one line rather
    than deep inside a measurement."""
    import torch

    from varshift.diagnose.batches import call_model

    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, inputs)
    except Exception as exc:
        raise _error(f"the model does not accept {what}: {_one_line(exc)}") from exc


def _builtin_source(args: argparse.Namespace, model: nn.Module) -> _Source:
    import torch

    from varshift.data import load_dataset

    dataset = load_dataset(args.data, seed=args.seed)
    size = args.batch_size or _DEFAULT_BATCH_SIZE
    name = args.data.strip()
    output = _probe(
        model,
        dataset.x_test[:size],
        f"{name}'s input: samples of shape {dataset.input_shape}, "
        f"batches of shape {(size, *dataset.input_shape)}",
    )
    classes = dataset.num_classes
    if classes is not None and not (
        isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[1] >= classes
    ):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise _error(
            f"the model's output for {name} is {shape}, but {name} has {classes} classes: "
            f"expected one of shape (batch, {classes})"
        )
    return _Source(
        model,
        _batches(dataset, "train", size),
        _describe(name, "train", dataset, size),
        _batches(dataset, "test", size),
        _describe(name, "test", dataset, size),
        dataset.x_test[:size],
    )


def _batches(dataset: SplitDataset, split: str, size: int) -> list[tuple[Any, Any]]:
    import torch

    x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
    return list(zip(torch.split(x, size), torch.split(y, size)))


def _describe(name: str, split: str, dataset: SplitDataset, size: int) -> str:
    count = len(getattr(dataset, f"x_{split}"))
    return f"{name} {split} split ({count} samples, batches of {size})"


def _source_header(args: argparse.Namespace) -> str:
    checkpoint = f" with {args.checkpoint}" if args.checkpoint else ""
    return f"model {args.model}{checkpoint}"


# --- the commands -------------------------------------------------------------------------------


def _run_diagnose(args: argparse.Namespace) -> int:
    from varshift.diagnose import lint, measure

    source = _open_source(args)
    report = lint(source.model, source.example)
    shift = measure(
        source.model, source.test, batches=args.batches, progress=not args.no_progress
    )
    tips = _suggestions(args, report, shift)
    print(f"{_source_header(args)}, measured on {source.test_text}")
    print()
    print(report)
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


def _suggestions(args: argparse.Namespace, report: LintReport, shift: ShiftReport) -> list[str]:
    """What to do about it: re-estimate (when dropout feeds a BatchNorm or the stored
    statistics are off), move or convert the dropout (when lint found it upstream of one)."""
    stale = [
        layer.name
        for layer in shift.layers
        if layer.inference_mismatch is not None and abs(layer.inference_mismatch - 1) > _TOLERANCE
    ]
    sources = list(dict.fromkeys(finding.source for finding in report.findings))
    tips: list[str] = []
    if sources or stale:
        command = command_line(
            "recalibrate", model=args.model, checkpoint=args.checkpoint, data=args.data,
            batch_size=args.batch_size, seed=args.seed, out=recalibrated_path(args.checkpoint),
        )  # fmt: skip
        tip = f"re-estimate the BatchNorm statistics with dropout off: {command}"
        if not sources:
            tip += (
                f" (no dropout feeds a BatchNorm: the running statistics of {_names(stale)} "
                "lag behind the weights, Wu & Johnson 2021)"
            )
        tips.append(tip)
    if sources:
        tips.append(
            f"move the noise layer(s) {_names(sources)} after the last BatchNorm (e.g. just "
            "before the classifier), where dropout shifts no BatchNorm statistics, and retrain"
        )
        tips.append(
            "or make the noise variance-stable and retrain: "
            "varshift.fix.convert_dropout(model, to='uout') (Uout, beta=0.1, Li et al. 2019) "
            "or to='variance_stable'"
        )
    if not tips:
        tips.append(
            "nothing to fix: no BatchNorm is fed by dropout and the stored statistics match the "
            f"re-estimated ones within {_TOLERANCE:.0%}"
        )
    return tips


def _run_recalibrate(args: argparse.Namespace) -> int:
    import torch

    from varshift.diagnose.bn_stats import batch_norms
    from varshift.fix import recalibrate_bn

    source = _open_source(args)
    model = source.model
    stored = {name: float(bn.running_var.mean()) for name, bn in _running(batch_norms(model))}
    before = _evaluate(model, source.test)
    recalibrate_bn(
        model, source.fit, batches=args.batches, samples=args.samples,
        keep_noise=args.dropout == "on", exact=args.exact, progress=not args.no_progress,
    )  # fmt: skip
    after = _evaluate(model, source.test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)

    limit = ""
    if args.batches is not None:
        limit = f", using at most {args.batches} batches"
    elif args.samples is not None:
        limit = f", using the first {args.samples} samples"
    how = "level by level (--exact)" if args.exact else "in one pass"
    print(_source_header(args))
    print(
        f"re-estimated {len(stored)} BatchNorm layer(s) on {source.fit_text}{limit}, "
        f"dropout {args.dropout}, {how}"
    )
    print("running_var (channel mean): stored -> re-estimated")
    width = max(len(name) for name in stored)
    for name, bn in _running(batch_norms(model)):
        print(f"  {name:<{width}}  {stored[name]:.4g} -> {float(bn.running_var.mean()):.4g}")
    if before is None or after is None:
        print(f"no targets in {source.test_text}: no eval metrics")
    else:
        print(
            f"eval on {source.test_text}: loss {_format(before[0])} -> {_format(after[0])}, "
            f"accuracy {_format(before[1])} -> {_format(after[1])}"
        )
    print(f"fixed checkpoint written to {out}")
    return 0


def _running(named: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    # The root module is named "" by named_modules(); show it the way measure's table does.
    for name, bn in named:
        yield name or "<root>", bn


def _evaluate(model: nn.Module, data: Iterable[Any]) -> tuple[float | None, float | None] | None:
    """Eval-mode ``(loss, accuracy)`` on ``data`` as :func:`~varshift.diagnose.measure` computes
    them; ``None`` when the data has no targets."""
    from varshift.diagnose import measure

    report = measure(model, data, recalibrate=False, progress=False)
    if report.loss_before is None and report.accuracy_before is None:
        return None
    return report.loss_before, report.accuracy_before


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
