"""The one container every loader returns: a fixed train/test split as tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from varshift.data.preprocess import sample_indices, standardize

__all__ = ["SplitDataset", "Task"]

Task = Literal["classification", "regression"]
_TASKS = ("classification", "regression")


# eq=False: dataclass equality would compare tensors element-wise and fail on `bool(...)`.
@dataclass(frozen=True, eq=False, repr=False)
class SplitDataset:
    """A dataset with a fixed train/test split, already standardized, as CPU tensors.

    Shapes and dtypes (checked on construction):

    * ``x_train``: ``Tensor[N_train, *input_shape]`` float32; ``x_test`` likewise.
    * classification: ``y_*`` is ``Tensor[N]`` int64 with values in ``[0, num_classes)``.
    * regression: ``y_*`` is ``Tensor[N]`` or ``Tensor[N, k]`` float32; ``num_classes`` is None.

    ``meta`` (read-only) records where the data came from and how it was prepared; the loaders
    put there ``x_mean``/``x_std`` (one value per index of axis 1: channel or feature, computed
    on the training split only), ``x_scale`` (factor applied to the raw values first), for
    regression ``y_mean``/``y_std``, and for split-by-us datasets ``train_index``/``test_index``
    (rows of the source data). See ``docs/data.md``.
    """

    name: str
    task: Task
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int | None
    input_shape: tuple[int, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {self.task!r}")
        # A frozen dataclass still shares the caller's dict; freeze a copy so the recorded
        # provenance cannot drift from the tensors.
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        for split in ("train", "test"):
            self._check_split(split, getattr(self, f"x_{split}"), getattr(self, f"y_{split}"))
        if self.task == "regression" and self.y_train.shape[1:] != self.y_test.shape[1:]:
            raise ValueError(
                f"y_train and y_test must have the same target shape, got "
                f"{tuple(self.y_train.shape[1:])} and {tuple(self.y_test.shape[1:])}"
            )

    def _check_split(self, split: str, x: Tensor, y: Tensor) -> None:
        if x.dtype != torch.float32:
            raise ValueError(f"x_{split} must be float32, got {x.dtype}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x_{split} has per-sample shape {tuple(x.shape[1:])}, "
                f"but input_shape is {self.input_shape}"
            )
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x_{split} has {x.shape[0]} samples but y_{split} has {y.shape[0]}")
        if self.task == "classification":
            self._check_labels(split, y)
        else:
            if self.num_classes is not None:
                raise ValueError(f"num_classes must be None for regression, got {self.num_classes}")
            if y.dtype != torch.float32 or y.ndim not in (1, 2):
                raise ValueError(
                    f"regression y_{split} must be float32 of shape (N,) or (N, k), "
                    f"got {y.dtype} of shape {tuple(y.shape)}"
                )

    def _check_labels(self, split: str, y: Tensor) -> None:
        k = self.num_classes
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"num_classes must be an int >= 2 for classification, got {k!r}")
        if y.dtype != torch.int64 or y.ndim != 1:
            raise ValueError(
                f"classification y_{split} must be int64 of shape (N,), "
                f"got {y.dtype} of shape {tuple(y.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(
                f"y_{split} labels must lie in [0, {k}), got range [{int(y.min())}, {int(y.max())}]"
            )

    @classmethod
    def from_arrays(
        cls,
        name: str,
        task: Task,
        x_train: NDArray[Any],
        y_train: NDArray[Any],
        x_test: NDArray[Any],
        y_test: NDArray[Any],
        *,
        num_classes: int | None = None,
        x_scale: float = 1.0,
        meta: Mapping[str, Any] | None = None,
    ) -> SplitDataset:
        """Build a dataset from raw numpy arrays, standardized with training statistics only.

        ``x`` is multiplied by ``x_scale`` (e.g. ``1 / 255`` for 8-bit pixels), then standardized
        per index of axis 1 (see :func:`varshift.data.preprocess.standardize`): per channel
        for ``(N, C, …)`` images, per feature for ``(N, F)`` tables. Regression targets are
        standardized the same way (one scalar per target column). The statistics are added to
        ``meta`` as ``x_scale``, ``x_mean``, ``x_std`` (and ``y_mean``, ``y_std``), so
        predictions can be mapped back to raw units: ``y_raw = y · y_std + y_mean``.
        """
        info = dict(meta or {})
        xs_train, xs_test, info["x_mean"], info["x_std"] = standardize(x_train, x_test, x_scale)
        info["x_scale"] = x_scale
        if task == "regression":
            yt_train, yt_test, info["y_mean"], info["y_std"] = standardize(y_train, y_test)
            ys_train, ys_test = torch.from_numpy(yt_train), torch.from_numpy(yt_test)
        else:
            ys_train, ys_test = _labels(y_train, "y_train"), _labels(y_test, "y_test")
        return cls(
            name=name,
            task=task,
            x_train=torch.from_numpy(xs_train),
            y_train=ys_train,
            x_test=torch.from_numpy(xs_test),
            y_test=ys_test,
            num_classes=num_classes,
            input_shape=tuple(x_train.shape[1:]),
            meta=info,
        )

    @property
    def num_outputs(self) -> int:
        """Width of the model's output: the number of classes, or of regression targets."""
        if self.num_classes is not None:
            return self.num_classes
        return 1 if self.y_train.ndim == 1 else int(self.y_train.shape[1])

    def subset(
        self, train: int | None = None, test: int | None = None, *, seed: int = 0
    ) -> SplitDataset:
        """A smaller copy: at most ``train`` training and ``test`` test samples (None keeps all).

        Classification splits are cut stratified (each class keeps its share, rounded by
        largest remainder); regression splits uniformly at random. The chosen samples keep their
        original order. The standardization is *not* redone: ``meta``'s statistics still
        describe the full training split, so the subset is on the same scale as the full data.
        Asking for more samples than a split has is an error rather than a silent no-op.
        """
        rng = np.random.default_rng(seed)
        keep_train = self._choose("train", self.y_train, train, rng)
        keep_test = self._choose("test", self.y_test, test, rng)
        meta = dict(self.meta)
        for split, keep in (("train", keep_train), ("test", keep_test)):
            source = meta.get(f"{split}_index")
            if source is not None:
                # Keep the index pointing at rows of the *source* data, not of this split.
                meta[f"{split}_index"] = np.asarray(source)[keep]
        meta["subset"] = {"train": len(keep_train), "test": len(keep_test), "seed": seed}
        return dataclasses.replace(
            self,
            x_train=self.x_train[keep_train],
            y_train=self.y_train[keep_train],
            x_test=self.x_test[keep_test],
            y_test=self.y_test[keep_test],
            meta=meta,
        )

    def as_images(self, size: int | None = None, channels: int | None = None) -> SplitDataset:
        """A copy whose images are resized to ``size × size`` and have ``channels`` channels.

        For networks built for larger colour images (torchvision and timm models want three
        channels, and five stride-2 stages leave nothing of a 28×28 map): bilinear resizing with
        antialiasing (the same interpolation for both splits, applied to the standardized
        values, so the standardization still holds up to the interpolation's smoothing), and a
        one-channel image repeated to ``channels``. ``None`` keeps the size or the channels.
        """
        if len(self.input_shape) != 3:
            raise ValueError(
                f"as_images needs images (C, H, W), but {self.name!r} has samples of shape "
                f"{self.input_shape}"
            )
        for name, value in (("size", size), ("channels", channels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        have = self.input_shape[0]
        if channels is not None and channels != have and have != 1:
            raise ValueError(
                f"channels: only a one-channel image can be repeated, {self.name!r} has {have}"
            )
        meta = dict(self.meta)
        meta["as_images"] = {"size": size, "channels": channels}
        x_train, x_test = (_reshaped(x, size, channels) for x in (self.x_train, self.x_test))
        return dataclasses.replace(self, x_train=x_train, x_test=x_test,
                                   input_shape=tuple(x_train.shape[1:]), meta=meta)

    def _choose(
        self, split: str, y: Tensor, n: int | None, rng: np.random.Generator
    ) -> np.ndarray[Any, np.dtype[np.int64]]:
        available = int(y.shape[0])
        if n is None:
            return np.arange(available)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= available:
            raise ValueError(
                f"{split} must be an int in [1, {available}] (the size of the {split} split "
                f"of {self.name!r}) or None, got {n!r}"
            )
        labels = y.numpy() if self.task == "classification" else None
        return sample_indices(available, n, rng, labels)

    def __repr__(self) -> str:
        classes = f", num_classes={self.num_classes}" if self.num_classes is not None else ""
        return (
            f"SplitDataset({self.name!r}, {self.task}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, input_shape={self.input_shape}{classes})"
        )


def _labels(y: NDArray[Any], what: str) -> Tensor:
    # Casting float labels would silently truncate 2.7 to 2; refuse instead.
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"classification {what} must hold integers, got dtype {y.dtype}")
    return torch.from_numpy(np.array(y, dtype=np.int64))  # a copy: never alias the caller's array


def _reshaped(x: Tensor, size: int | None, channels: int | None) -> Tensor:
    if size is not None and tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    if channels is not None and x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    return x.contiguous()
