"""One entry point that turns a dataset name, as typed on a command line, into a dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from varshift.data.builtin import builtin_names, load_builtin
from varshift.data.cifar import load_cifar
from varshift.data.dataset import SplitDataset
from varshift.data.idx import load_mnist_idx

__all__ = ["dataset_names", "load_dataset"]

_BUILTIN_PREFIX = "builtin:"

_ON_DISK: dict[str, Callable[[Path], SplitDataset]] = {
    "mnist": lambda folder: load_mnist_idx(folder, kind="mnist"),
    "fashion-mnist": lambda folder: load_mnist_idx(folder, kind="fashion"),
    "cifar10": lambda folder: load_cifar(folder, which=10),
    "cifar100": lambda folder: load_cifar(folder, which=100),
}
_ALIASES = {
    "fashion": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


def dataset_names() -> list[str]:
    """Every name :func:`load_dataset` accepts (besides aliases and the ``builtin:`` prefix):
    the built-in datasets, then those read from files in ``data_dir``."""
    return [*builtin_names(), *_ON_DISK]


def load_dataset(
    spec: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SplitDataset:
    """Load a dataset by name (case-insensitive; ``_`` and ``-`` are interchangeable).

    * built-in (no files needed): ``digits``, ``mnist1d``, ``mnist5k``, ``diabetes``,
      ``friedman1``, optionally written ``builtin:<name>``; ``seed`` and ``cache_dir`` go to
      :func:`~varshift.data.load_builtin`.
    * from files in ``data_dir``: ``mnist``, ``fashion-mnist`` (IDX files, see
      :func:`~varshift.data.load_mnist_idx`), ``cifar10``, ``cifar100`` (python pickles, see
      :func:`~varshift.data.load_cifar`). These keep their official split; ``seed`` is unused.

    Raises ``ValueError`` for an unknown name (listing the valid ones) or when an on-disk
    dataset is asked for without ``data_dir``.
    """
    key = spec.strip().lower().replace("_", "-") if isinstance(spec, str) else ""
    if key.startswith(_BUILTIN_PREFIX):
        return load_builtin(key[len(_BUILTIN_PREFIX) :], seed=seed, cache_dir=cache_dir)
    key = _ALIASES.get(key, key)
    if key in builtin_names():
        return load_builtin(key, seed=seed, cache_dir=cache_dir)
    loader = _ON_DISK.get(key)
    if loader is None:
        raise ValueError(
            f"unknown dataset {spec!r}; valid names: {', '.join(dataset_names())} "
            f"(built-ins may also be written {_BUILTIN_PREFIX}<name>)"
        )
    if data_dir is None:
        raise ValueError(
            f"dataset {key!r} is read from files you already have (nothing is downloaded): "
            "pass --data-dir (data_dir=...) with the folder that holds them"
        )
    return loader(Path(data_dir))
