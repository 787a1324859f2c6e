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
"""

from __future__ import annotations

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
    "call_model",
    "check_count",
    "model_device",
]

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "data")
TARGET_KEYS = ("target", "targets", "y", "label", "labels")

Keep = Literal["never", "one_shot", "labelled"]


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


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer; ``None`` for a model without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
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


def _cut(obj: Any, size: int) -> Any:
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


def _split(
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

    The first iteration reads ``data``; later ones read it again, or replay what the first one
    kept: ``keep="labelled"`` keeps every batch that has a target (for a caller that evaluates
    on the *same* batches again), ``"one_shot"`` every batch but only when ``data`` is an
    iterator that cannot be read twice, ``"never"`` nothing. Batches are kept before the move to
    the device, so a replay costs no accelerator memory. With ``samples``, the last batch is cut
    so that exactly that many samples are used.

    Raises ``ValueError`` when the first iteration yields no sample.
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
            raise ValueError(
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
        # An iterator (not merely an iterable) is consumed by one pass; asking a DataLoader
        # for iter() here would start its workers for nothing.
        one_shot = isinstance(data, Iterator)
        self._keep = keep == "labelled" or (keep == "one_shot" and one_shot)
        self._labelled_only = keep == "labelled"
        self._one_shot = one_shot
        self._kept: list[tuple[Any, Any, int]] | None = None
        self.samples_seen = 0
        self.batches_seen = 0

    def __iter__(self) -> Iterator[Batch]:
        if self._kept is not None:
            raw: Iterator[tuple[Any, Any, int]] = iter(self._kept)
            total: int | None = len(self._kept)
        elif self.batches_seen and self._one_shot:
            raise ValueError("data is a one-shot iterator and was already consumed")
        else:
            raw = self._read()
            total = self._expected_batches()
        keeping = self._keep and self._kept is None
        kept: list[tuple[Any, Any, int]] = []
        bar = tqdm(
            total=total,
            desc=self._desc,
            file=sys.stderr,
            disable=not self._progress or total is None,
            leave=False,
        )
        try:
            for inputs, target, size in raw:
                if keeping and not (self._labelled_only and target is None):
                    kept.append((inputs, target, size))
                bar.update(1)
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

    def _read(self) -> Iterator[tuple[Any, Any, int]]:
        """Split, size and cut the raw items; count what was used."""
        used_batches = 0
        used_samples = 0
        for item in self._data:
            if self._batches is not None and used_batches >= self._batches:
                break
            if self._samples is not None and used_samples >= self._samples:
                break
            inputs, target = _split(item, self._input_fn, self._target_fn)
            first = _first_tensor(inputs)
            if first is None or first.dim() == 0:
                raise ValueError(
                    f"cannot find a batched tensor in the model input (got "
                    f"{type(inputs).__name__}); pass input_fn to pick it"
                )
            size = int(first.shape[0])
            if self._samples is not None and used_samples + size > self._samples:
                size = self._samples - used_samples
                inputs, target = _cut(inputs, size), _cut(target, size)
            if size == 0:
                # An empty batch carries no statistics and would make BatchNorm raise.
                continue
            used_batches += 1
            used_samples += size
            self.batches_seen, self.samples_seen = used_batches, used_samples
            yield inputs, target, size
        if used_batches == 0:
            raise ValueError("data is empty: it yielded no batch with at least one sample")
