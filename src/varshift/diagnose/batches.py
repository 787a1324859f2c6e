"""Turn whatever a user iterates over into model inputs: the one place that knows batch shapes.

:func:`measure <varshift.diagnose.measure>` and :func:`recalibrate_bn
<varshift.fix.recalibrate_bn>` accept the same ``data``: any iterable whose items are

- a tensor (the input itself),
- a tuple or list ``(x, y, ...)`` (input first, target second, as a ``DataLoader`` over a
  ``TensorDataset`` yields them),
- a dict, from which the input is taken under one of the keys in :data:`INPUT_KEYS` and the
  target under one of :data:`TARGET_KEYS`.

``input_fn(item)`` and ``target_fn(item)`` override that choice. An input that is a tuple or list
is passed to the model as positional arguments, a dict as keyword arguments, anything else as the
single argument. A bare tensor given as ``data`` is one batch, not an iterable of samples.

The sample count of a batch is the leading dimension of the first tensor in its input; statistics
downstream weight each batch by it.

Batches are numbered from 0 in every message. ``data`` is streamed: an item is read only when it
is needed and never beyond the ``batches``/``samples`` budget, so an endless generator with a
budget ends; only a one-shot iterator that a caller must read twice is kept, and only within that
budget. An exception raised by ``data`` itself becomes a one-line ``ValueError`` naming the batch
it was reading, chained to the original.
"""

from __future__ import annotations

import itertools
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = [
    "INPUT_KEYS",
    "TARGET_KEYS",
    "Batch",
    "BatchStream",
    "all_finite",
    "call_model",
    "check_count",
    "is_one_shot",
    "model_device",
    "require_finite",
]

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "data")
TARGET_KEYS = ("target", "targets", "y", "label", "labels")

Keep = Literal["never", "all", "labelled"]
_RawBatch = tuple[int, Any, Any, int]  # position in data, inputs, target, size (before the move)


@dataclass(frozen=True)
class Batch:
    """One batch ready for the model: ``inputs`` on the model's device, ``target`` (or ``None``)
    and ``size``, its number of samples."""

    inputs: Any
    target: Any
    size: int


def check_count(name: str, value: int | None) -> None:
    """Refuse a batch or sample limit that is not ``None`` or an integer >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


def is_one_shot(data: object) -> bool:
    """Whether ``data`` is consumed by one pass: an iterator (a generator, ``iter(loader)``), as
    opposed to an iterable (a list, a ``DataLoader``) that can be read again."""
    return isinstance(data, Iterator)


def all_finite(obj: Any) -> bool:
    """Whether every floating-point or complex tensor in ``obj`` (nested in tuples, lists and
    dicts) holds only finite values; integer tensors and non-tensors always do."""
    if isinstance(obj, Tensor):
        if not (obj.is_floating_point() or obj.is_complex()):
            return True
        return bool(torch.isfinite(obj).all())
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(obj, (Mapping, tuple, list)):
        return all(all_finite(value) for value in values)
    return True


def require_finite(name: str, obj: Any) -> None:
    """``ValueError`` naming ``name`` when a tensor in ``obj`` holds nan or inf (see
    :func:`all_finite`): statistics of such inputs would be nan, silently."""
    if not all_finite(obj):
        raise ValueError(f"{name} hold nan or inf values; pass finite inputs")


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer; ``None`` for a model without tensors."""
    # chain, not a tuple of both: the first tensor is enough, and a large model has thousands.
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` the way :class:`Batch` promises: tuple/list → positional, dict → keywords."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(value, fn) for value in obj)
    return obj


def _first_samples(obj: Any, size: int) -> Any:
    """The first ``size`` samples of every tensor in ``obj``."""
    return _map_tensors(obj, lambda t: t[:size])


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(obj, (Mapping, tuple, list)):
        for value in values:
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _pick_key(item: Mapping[Any, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in item:
            return item[key]
    return None


def _input_and_target(
    item: Any,
    input_fn: Callable[[Any], Any] | None,
    target_fn: Callable[[Any], Any] | None,
) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        inputs = input_fn(item) if input_fn else _pick_key(item, INPUT_KEYS)
        if inputs is None:
            raise ValueError(
                f"data yields dicts with keys {sorted(map(str, item))} and none of "
                f"{list(INPUT_KEYS)}; pass input_fn to pick the model input"
            )
        target = target_fn(item) if target_fn else _pick_key(item, TARGET_KEYS)
        return inputs, target
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("data yielded an empty tuple/list; expected (input, target, ...)")
        inputs = input_fn(item) if input_fn else item[0]
        target = target_fn(item) if target_fn else (item[1] if len(item) > 1 else None)
        return inputs, target
    return (input_fn(item) if input_fn else item), (target_fn(item) if target_fn else None)


class BatchStream:
    """Re-iterable view of ``data`` as :class:`Batch` objects, within the batch/sample limits.

    Every iteration reads ``data`` again, except for a one-shot iterator (:func:`is_one_shot`),
    which cannot be read twice: later iterations replay what the first one kept, ``keep="all"``
    every batch, ``"labelled"`` the batches that have a target (for a caller that evaluates on
    them again), ``"never"`` nothing (a second iteration then raises). Batches are kept before the
    move to the device, so a replay costs no accelerator memory; a caller that keeps should bound
    the data with ``batches``/``samples``. With ``samples``, the last batch is cut so that exactly
    that many samples are used.

    :attr:`index` is the position in ``data`` (from 0) of the batch last yielded, for messages
    about it.

    Raises ``TypeError`` when ``data`` is not iterable; ``ValueError`` when the first iteration
    yields no sample, and when reading ``data`` raises (``"reading batch N of the data raised
    <Type>: <message>"``, chained to it).
    """

    def __init__(
        self,
        data: Iterable[Any],
        *,
        batches: int | None = None,
        samples: int | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Any] | None = None,
        device: torch.device | None = None,
        progress: bool = False,
        desc: str = "",
        keep: Keep = "never",
    ) -> None:
        check_count("batches", batches)
        check_count("samples", samples)
        if isinstance(data, Tensor):
            data = [data]
        elif not isinstance(data, Iterable):
            raise TypeError(
                f"data must be an iterable of batches (tensors, (x, y) tuples or dicts), "
                f"got {type(data).__name__}"
            )
        self._data = data
        self._batches = batches
        self._samples = samples
        self._input_fn = input_fn
        self._target_fn = target_fn
        self._device = device
        self._progress = progress
        self._desc = desc
        # is_one_shot, not iter(): asking a DataLoader for an iterator here would start its
        # workers for nothing.
        self._one_shot = is_one_shot(data)
        self._keep = keep != "never" and self._one_shot
        self._labelled_only = keep == "labelled"
        self._kept: list[_RawBatch] | None = None
        self.samples_seen = 0
        self.batches_seen = 0
        self.index = -1

    def __iter__(self) -> Iterator[Batch]:
        if self._kept is not None:
            raw: Iterator[_RawBatch] = iter(self._kept)
            total: int | None = len(self._kept)
        elif self.batches_seen and self._one_shot:
            raise ValueError("data is a one-shot iterator and was already consumed")
        else:
            raw = self._read()
            total = self._expected_batches()
        keeping = self._keep and self._kept is None
        kept: list[_RawBatch] = []
        bar = tqdm(
            total=total,
            desc=self._desc,
            file=sys.stderr,
            disable=not self._progress or total is None,
            leave=False,
        )
        self.index = -1
        try:
            for index, inputs, target, size in raw:
                if keeping and not (self._labelled_only and target is None):
                    kept.append((index, inputs, target, size))
                bar.update(1)
                self.index = index
                yield Batch(self._to_device(inputs), self._to_device(target), size)
        finally:
            bar.close()
        if keeping:
            self._kept = kept

    def _expected_batches(self) -> int | None:
        try:
            length = len(self._data)  # type: ignore[arg-type]
        except TypeError:
            return None
        return length if self._batches is None else min(length, self._batches)

    def _to_device(self, obj: Any) -> Any:
        device = self._device
        if device is None:
            return obj
        return _map_tensors(obj, lambda t: t.to(device, non_blocking=True))

    def _within_budget(self, used_batches: int, used_samples: int) -> bool:
        if self._batches is not None and used_batches >= self._batches:
            return False
        return self._samples is None or used_samples < self._samples

    def _items(self) -> Iterator[tuple[int, Any]]:
        """The items of ``data`` with their positions, each read only when asked for; whatever
        reading raises becomes one line naming the batch (``KeyboardInterrupt`` passes)."""
        number = 0
        try:
            items = iter(self._data)
        except Exception as error:
            raise ValueError(_read_error(number, error)) from error
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as error:
                raise ValueError(_read_error(number, error)) from error
            yield number, item
            number += 1

    def _read(self) -> Iterator[_RawBatch]:
        """Split, size and cut the raw items; count what was used. The budget is checked
        before each read, so not one item beyond it is taken from ``data``."""
        used_batches = 0
        used_samples = 0
        items = self._items()
        while self._within_budget(used_batches, used_samples):
            numbered = next(items, None)
            if numbered is None:
                break
            number, item = numbered
            inputs, target = _input_and_target(item, self._input_fn, self._target_fn)
            first = _first_tensor(inputs)
            if first is None or first.dim() == 0:
                raise ValueError(
                    f"cannot find a batched tensor in the model input (got "
                    f"{type(inputs).__name__}); pass input_fn to pick it"
                )
            size = int(first.shape[0])
            if self._samples is not None and used_samples + size > self._samples:
                size = self._samples - used_samples
                inputs = _first_samples(inputs, size)
                target = _first_samples(target, size)
            if size == 0:
                # An empty batch carries no statistics and would make BatchNorm raise.
                continue
            used_batches += 1
            used_samples += size
            self.batches_seen, self.samples_seen = used_batches, used_samples
            yield number, inputs, target, size
        if used_batches == 0:
            raise ValueError("data is empty: it yielded no batch with at least one sample")


def _read_error(number: int, error: Exception) -> str:
    """One line: the batch being read, the exception's type and the first line of its message
    (a DataLoader worker's message carries a whole traceback)."""
    lines = str(error).strip().splitlines()
    message = f": {lines[0]}" if lines else ""
    return f"reading batch {number} of the data raised {type(error).__name__}{message}"
