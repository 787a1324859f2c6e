"""CIFAR-10 and CIFAR-100 from the "python version" pickles the user already has
(Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009).

Each batch is a pickled dict: ``data`` is a uint8 array ``(N, 3072)`` (1024 red, then 1024
green, then 1024 blue values, each a row-major 32 × 32 image) and ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100) a list of N ints. The files were written by Python 2, hence
``encoding="bytes"``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from varshift.data.dataset import SplitDataset
from varshift.data.files import data_folder, find_file

__all__ = ["load_cifar"]

_PIXELS = 3 * 32 * 32

# which → (dataset name, the archive's sub-folder, training files, test file, label key).
_LAYOUTS = {
    10: (
        "cifar10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
    ),
    100: ("cifar100", "cifar-100-python", ("train",), "test", "fine_labels"),
}

# Everything a CIFAR batch needs to rebuild numpy arrays, across pickle protocols and numpy
# versions; nothing else. Unpickling can call any importable function, so a file from an
# untrusted source must not get to choose which.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists and strings"
            )
        return super().find_class(module, name)


def _unpickle(handle: BinaryIO, path: Path) -> Any:
    try:
        return _BatchUnpickler(handle, encoding="bytes").load()
    # A damaged pickle fails in many ways (UnpicklingError, EOFError, ValueError, TypeError,
    # IndexError, ...); all of them mean the same thing here.
    except Exception as err:
        raise ValueError(f"{path}: not a readable CIFAR batch pickle ({err})") from err


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[NDArray[Any], NDArray[Any]]:
    with path.open("rb") as handle:
        batch = _unpickle(handle, path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    # Python 2 wrote the keys as byte strings; accept str keys from re-pickled copies too.
    fields = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = fields.get("data"), fields.get(label_key)
    if data is None or labels is None:
        raise ValueError(
            f"{path}: expected keys 'data' and {label_key!r}, found {sorted(map(str, fields))}"
        )
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(
            f"{path}: 'data' must be a uint8 array of shape (N, {_PIXELS}), got "
            f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        )
    if data.shape[1] != _PIXELS:
        raise ValueError(f"{path}: 'data' rows hold {data.shape[1]} values, expected {_PIXELS}")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: {label_key!r} must be {len(data)} integers (one per row of 'data'), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: {label_key!r} values must lie in 0-{num_classes - 1}, "
            f"got {labels.min()}-{labels.max()}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(directory: str | os.PathLike[str], *, which: int = 10) -> SplitDataset:
    """CIFAR-10 (``which=10``) or CIFAR-100 (``which=100``, the 100 fine labels).

    ``directory`` is the folder that holds ``cifar-10-batches-py`` / ``cifar-100-python`` (as
    the official archive unpacks) or that folder itself. Keeps the official split (50,000 /
    10,000). Images become ``Tensor[N, 3, 32, 32]`` float32: scaled to ``[0, 1]``, then
    standardized per channel with the training split's mean and std.

    Only numpy arrays, lists and strings are unpickled (any other object in the file is refused),
    so a tampered file cannot run code. Raises ``FileNotFoundError`` naming a missing file and
    ``ValueError`` naming a malformed one.
    """
    if isinstance(which, bool) or not isinstance(which, int) or which not in _LAYOUTS:
        raise ValueError(f"which must be 10 or 100, got {which!r}")
    name, archive_folder, train_files, test_file, label_key = _LAYOUTS[which]
    root = data_folder(directory, name)
    folders = [root / archive_folder, root]

    def read(files: tuple[str, ...]) -> tuple[NDArray[Any], NDArray[Any]]:
        batches = [
            _read_batch(find_file(folders, [f], f"{name} batch"), label_key, which) for f in files
        ]
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    x_train, y_train = read(train_files)
    x_test, y_test = read((test_file,))
    return SplitDataset.from_arrays(
        name, "classification", x_train, y_train, x_test, y_test,
        num_classes=which, x_scale=1 / 255,
        meta={"source": f"CIFAR python pickles in {str(root)!r}", "split": "official"},
    )  # fmt: skip
