"""What ``varshift diagnose`` and ``varshift recalibrate`` run on: the model of ``--model`` and
``--checkpoint`` (:func:`varshift.checkpoints.load_model`) and the batches of ``--data``.

``--model`` is any spec of :func:`~varshift.checkpoints.load_model` (``pkg.module:factory``,
``torchvision:NAME``, ``timm:NAME``), given the keyword arguments of ``--model-arg KEY=VALUE``.
``--data builtin:NAME`` is a built-in dataset cut into ``(x, y)`` batches: statistics are
estimated on its training split and everything is evaluated on its test split.
``--data imagefolder:PATH`` is a folder of images, one sub-folder per class
(:func:`varshift.data.image_folder_loader`, ``--image-size``, ``--no-normalize``), and
``--data pkg.module:loader_factory`` the user's own iterable of batches; each is used for both.
Before any work the model runs once on the first batch, so that data it cannot take fails with
the shapes involved. The user's batches then pass through :class:`NamedLoader`, which names the
loader in every error its iteration raises (NaN and labels out of range are refused, in one
line, by ``measure`` and ``recalibrate_bn`` themselves).

A one-shot iterator (a generator) cannot be read twice and may never end, so it needs a limit
(``--batches``, or ``--samples``), and only that many batches are kept in memory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from varshift.cli import CommandError

if TYPE_CHECKING:
    import argparse

    from torch import Tensor, nn

    from varshift.data import SplitDataset
    from varshift.diagnose.batches import Batch

__all__ = [
    "BUILTIN",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_IMAGE_SIZE",
    "IMAGEFOLDER",
    "NamedLoader",
    "Source",
    "model_kwargs",
    "open_source",
]

BUILTIN = "builtin:"
IMAGEFOLDER = "imagefolder:"
DEFAULT_BATCH_SIZE = 128
DEFAULT_IMAGE_SIZE = 224


@dataclass
class Source:
    """The model, the batches statistics are estimated from (``fit``) and those it is evaluated
    or measured on (``test``), each with a description; ``example`` is the model input of the
    first batch (for lint). ``fit_samples``/``fit_batches``: the size of ``fit`` when known
    without reading it (``None`` for a loader that can be read again)."""

    model: nn.Module
    fit: Iterable[Any]
    fit_text: str
    test: Iterable[Any]
    test_text: str
    example: Any
    fit_samples: int | None = None
    fit_batches: int | None = None


def open_source(args: argparse.Namespace) -> Source:
    """The model and the data that ``args`` (``--model``, ``--model-arg``, ``--checkpoint``,
    ``--data``, ``--batch-size``, ``--image-size``, ``--no-normalize``, ``--seed``, ``--batches``
    and, for recalibrate, ``--samples``) name."""
    from varshift.checkpoints import load_model
    from varshift.diagnose.bn_stats import batch_norms

    spec = args.data.strip()
    images = spec.lower().startswith(IMAGEFOLDER)
    _refuse_image_options(args, images)
    kwargs = model_kwargs(getattr(args, "model_arg", None) or [])
    _import_from_working_directory()
    model = load_model(args.model, args.checkpoint, argument="--model", **kwargs)
    if not batch_norms(model):
        raise CommandError(
            f"the model from --model {args.model} ({type(model).__name__}) has no BatchNorm "
            "layer with running statistics: there is no variance shift to diagnose or fix"
        )
    if spec.lower().startswith(BUILTIN):
        return _builtin_source(args, model)
    if images:
        return _image_folder_source(args, model, spec)
    if ":" not in spec:
        raise CommandError(
            f"--data must be builtin:NAME, imagefolder:PATH or pkg.module:function, got {spec!r}"
        )
    if args.batch_size is not None:
        raise CommandError(
            "--batch-size applies to builtin: and imagefolder: data only; a loader factory "
            "makes its own batches"
        )
    return _loader_source(args, model, spec)


def model_kwargs(pairs: Iterable[str]) -> dict[str, Any]:
    """The keyword arguments of the ``--model-arg KEY=VALUE`` options (values read by
    :func:`~varshift.cli.arguments.keyword_value`); a key given twice is refused."""
    from varshift.cli.arguments import keyword_value

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, value = keyword_value(pair)
        if key in kwargs:
            raise CommandError(
                f"--model-arg {key} is given twice ({key}={kwargs[key]!r} and {pair}): give it once"
            )
        kwargs[key] = value
    return kwargs


def _refuse_image_options(args: argparse.Namespace, images: bool) -> None:
    """``--image-size`` and ``--no-normalize`` shape images only: with other data they would be
    silently ignored."""
    given = [
        option
        for option, value in (
            ("--image-size", getattr(args, "image_size", None)),
            ("--no-normalize", getattr(args, "no_normalize", False) or None),
        )
        if value is not None
    ]
    if given and not images:
        raise CommandError(
            f"{' and '.join(given)} apply to imagefolder: data only, got --data {args.data}"
        )


def _import_from_working_directory() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` does, so that
    ``--model mymodule:net`` finds a module beside the user (the installed script does not)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


# --- built-in datasets ---------------------------------------------------------------------------


def _builtin_source(args: argparse.Namespace, model: nn.Module) -> Source:
    import torch

    from varshift.data import load_dataset

    dataset = load_dataset(args.data, seed=args.seed)
    size = args.batch_size or DEFAULT_BATCH_SIZE
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
        raise CommandError(
            f"the model's output for {name} is {shape}, but {name} has {classes} classes: "
            f"expected one of shape (batch, {classes})"
        )
    train = _split_batches(dataset, "train", size)
    return Source(
        model,
        train,
        _split_text(name, "train", dataset, size),
        _split_batches(dataset, "test", size),
        _split_text(name, "test", dataset, size),
        dataset.x_test[:size],
        fit_samples=len(dataset.x_train),
        fit_batches=len(train),
    )


def _split_batches(dataset: SplitDataset, split: str, size: int) -> list[tuple[Tensor, Tensor]]:
    import torch

    x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
    return list(zip(torch.split(x, size), torch.split(y, size)))


def _split_text(name: str, split: str, dataset: SplitDataset, size: int) -> str:
    count = len(getattr(dataset, f"x_{split}"))
    return f"{name} {split} split ({count} samples, batches of {size})"


# --- a folder of images --------------------------------------------------------------------------


def _image_folder_source(args: argparse.Namespace, model: nn.Module, spec: str) -> Source:
    from varshift.data import image_folder_loader

    path = spec[len(IMAGEFOLDER) :].strip()
    if not path:
        raise CommandError(f"--data {IMAGEFOLDER}PATH needs the folder's path, got {spec!r}")
    size = args.image_size or DEFAULT_IMAGE_SIZE
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    loader = image_folder_loader(
        path,
        image_size=size,
        batch_size=batch_size,
        normalize=not args.no_normalize,
        seed=args.seed,
    )
    images = NamedLoader(loader, spec)
    first = next(iter(images))
    example = first[0]
    normalized = "not normalized" if args.no_normalize else "ImageNet-normalized"
    _probe(model, example, f"the images of --data {spec} (input of shape {tuple(example.shape)})")
    count = len(cast(Sized, loader.dataset))
    text = f"{spec} ({count} images of {size}x{size}, {normalized}, batches of {batch_size})"
    return Source(model, images, text, images, text, example, count, len(loader))


# --- the user's loader ---------------------------------------------------------------------------


def _loader_source(args: argparse.Namespace, model: nn.Module, spec: str) -> Source:
    import torch

    from varshift.checkpoints import call_factory

    loader = call_factory(spec, argument="--data")
    text = f"--data {spec}"
    if isinstance(loader, torch.Tensor):
        loader = [loader]  # a bare tensor is one batch, as everywhere in varshift
    if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
        raise CommandError(
            f"{text} returned an object of type {type(loader).__name__}, not an iterable of batches"
        )
    one_shot = isinstance(loader, Iterator)
    batches, samples = getattr(args, "batches", None), getattr(args, "samples", None)
    if one_shot and batches is None and samples is None:
        limits = "--batches N" if not hasattr(args, "samples") else "--batches N or --samples N"
        raise CommandError(
            f"{text} returned a one-shot iterator ({type(loader).__name__}), which may never "
            f"end and cannot be read twice: give {limits} to read that much into memory, or "
            "return a re-iterable object (a list, a DataLoader)"
        )
    first = next(iter(NamedLoader(loader, spec)), None)
    if first is None:
        raise CommandError(f"{text}: the loader yielded no batch")
    example = _model_input(first, spec).inputs
    _probe(model, example, f"the first batch of {text} ({_input_text(example)})")
    if not one_shot:
        named = NamedLoader(loader, spec)
        return Source(model, named, text, named, text, example)
    # The iterator already gave up its first item: put it back in front.
    kept, kept_samples = _read_prefix(
        NamedLoader(_chain(first, iter(loader)), spec), spec, batches, samples
    )
    return Source(model, kept, text, kept, text, example, kept_samples, len(kept))


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _read_prefix(
    data: Iterable[Any], spec: str, batches: int | None, samples: int | None
) -> tuple[list[Any], int]:
    """The first items of ``data`` up to ``batches`` batches or ``samples`` samples (the last
    item is kept whole; ``recalibrate_bn`` cuts it), and the number of samples they hold."""
    kept: list[Any] = []
    count = 0
    for item in data:
        kept.append(item)
        count += _model_input(item, spec).size
        if (batches is not None and len(kept) >= batches) or (
            samples is not None and count >= samples
        ):
            break
    return kept, count


class NamedLoader:
    """The user's iterable of batches, read again on every ``iter()``, whose exceptions become
    one line naming ``--data`` and the batch (a traceback from inside the user's loader, under
    varshift's frames, would suggest a bug in varshift). ``len()`` is the loader's, when it has
    one. Bad values in the batches (NaN, labels out of range) are refused by ``measure`` and
    ``recalibrate_bn`` themselves."""

    def __init__(self, data: Iterable[Any], spec: str) -> None:
        self.data = data
        self.spec = spec

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # TypeError when it has none, as asked

    def __iter__(self) -> Iterator[Any]:
        items = iter(self.data)
        index = 0
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as exc:  # the user's loader: whatever it raises is theirs to fix
                raise CommandError(
                    f"--data {self.spec}: reading batch {index} raised {_exception_text(exc)}"
                ) from exc
            index += 1
            yield item


def _model_input(item: Any, spec: str) -> Batch:
    """One raw item as a :class:`~varshift.diagnose.batches.Batch`, by the rules of
    :mod:`varshift.diagnose.batches` (input, target, sample count)."""
    from varshift.diagnose.batches import BatchStream

    try:
        return next(iter(BatchStream([item], batches=1)))
    except ValueError as exc:
        raise CommandError(f"--data {spec}: cannot use its batch: {exc}") from exc


def _input_text(inputs: Any) -> str:
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
        raise CommandError(f"the model does not accept {what}: {_exception_text(exc)}") from exc


def _exception_text(exc: BaseException) -> str:
    """``Type: message``, the message on one line."""
    from varshift.cli import one_line

    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
