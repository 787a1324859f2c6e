"""How the loaders cut and scale data: seeded (stratified) index selection and standardization
with training-split statistics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["sample_indices", "split_indices", "standardize"]

IndexArray = np.ndarray[Any, np.dtype[np.int64]]


def sample_indices(
    total: int, n: int, rng: np.random.Generator, labels: NDArray[Any] | None = None
) -> IndexArray:
    """Choose ``n`` of ``range(total)`` without replacement, returned sorted.

    With ``labels`` (shape ``(total,)``) the choice is stratified: class ``c`` with ``n_c``
    members gets ``floor(n * n_c / total)`` picks, and the picks left over go to the classes
    with the largest remainders (ties to the smaller class id), so every class is within one
    sample of its exact share and a balanced source gives an exactly balanced choice.
    """
    if labels is None:
        return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / total
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n - int(take.sum())]] += 1
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False)
        for c, k in zip(classes, take)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def split_indices(
    total: int, test_fraction: float, seed: int, labels: NDArray[Any] | None = None
) -> tuple[IndexArray, IndexArray]:
    """A seeded train/test partition of ``range(total)``: ``ceil(test_fraction * total)`` test
    rows (as scikit-learn's ``train_test_split`` rounds), stratified when ``labels`` is given.
    Both index arrays are sorted, so the samples keep their source order."""
    n_test = math.ceil(test_fraction * total)
    test = sample_indices(total, n_test, np.random.default_rng(seed), labels)
    is_train = np.ones(total, dtype=bool)
    is_train[test] = False
    return np.flatnonzero(is_train).astype(np.int64), test


def standardize(
    train: NDArray[Any], test: NDArray[Any], scale: float = 1.0
) -> tuple[NDArray[np.float32], NDArray[np.float32], tuple[float, ...], tuple[float, ...]]:
    """Return ``((train·scale − μ) / σ, (test·scale − μ) / σ, μ, σ)`` as float32.

    ``μ`` and ``σ`` come from the training split only, one value per index of axis 1 (channel of
    an ``(N, C, …)`` image, feature of an ``(N, F)`` table), reduced over every other axis;
    for a 1-D array (a regression target) they are scalars, returned as 1-tuples. ``σ`` is the
    population standard deviation (``ddof = 0``), so the standardized training split has mean 0
    and population std 1 per index of axis 1 exactly (up to float32 rounding). An index whose
    training values are constant keeps ``σ = 1`` rather than dividing by zero.
    """
    axes = tuple(a for a in range(train.ndim) if a != 1)
    # float64 accumulation: float32 sums over ~10^8 pixels lose several digits.
    mean = train.mean(axis=axes, dtype=np.float64, keepdims=True) * scale
    std = train.std(axis=axes, dtype=np.float64, keepdims=True) * abs(scale)
    std = np.where(std > 0, std, 1.0)

    def apply(x: NDArray[Any]) -> NDArray[np.float32]:
        # In-place float32 arithmetic: a float64 copy of CIFAR's training split would take 1.2 GB.
        out = x.astype(np.float32)
        out *= np.float32(scale)
        out -= mean.astype(np.float32)
        out /= std.astype(np.float32)
        return out

    return apply(train), apply(test), tuple(mean.ravel().tolist()), tuple(std.ravel().tolist())
