"""MNIST and Fashion-MNIST from the IDX files the user already has.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned byte), then ``ndim`` big-endian uint32
sizes, then the data in C order. Images are ``0x00000803`` (N × rows × cols), labels
``0x00000801`` (N).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from varshift.data.dataset import SplitDataset
from varshift.data.files import data_folder, find_file, read_bytes

__all__ = ["load_mnist_idx"]

_UNSIGNED_BYTE = 0x08
_NUM_CLASSES = 10
# kind → (dataset name, torchvision's sub-folder, which holds the same files under raw/).
_KINDS = {"mnist": ("mnist", "MNIST"), "fashion": ("fashion-mnist", "FashionMNIST")}


def _read_idx(path: Path, ndim: int) -> NDArray[np.uint8]:
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions, checking every size."""
    raw = read_bytes(path)
    expected_magic = (_UNSIGNED_BYTE << 8) | ndim
    kind = "image (3-D)" if ndim == 3 else "label (1-D)"
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x}; an IDX {kind} file of unsigned bytes "
            f"starts with 0x{expected_magic:08x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if found != expected:
        problem = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: the header gives shape {dims} ({expected} bytes of data), "
            f"the file holds {found}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_split(folders: list[Path], stem: str, title: str) -> tuple[NDArray[Any], NDArray[Any]]:
    def locate(part: str, ndim: int) -> Path:
        base = f"{stem}-{part}-idx{ndim}-ubyte"
        # Also the dotted spelling ("train-images.idx3-ubyte") that some mirrors use.
        dotted = f"{stem}-{part}.idx{ndim}-ubyte"
        names = [base, base + ".gz", dotted, dotted + ".gz"]
        return find_file(folders, names, f"{title} {stem} {part}")

    images_path, labels_path = locate("images", 3), locate("labels", 1)
    images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    if 0 in images.shape:
        raise ValueError(f"{images_path}: empty image array of shape {images.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; they must match"
        )
    if labels.max() >= _NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {labels.max()} is outside 0-{_NUM_CLASSES - 1}")
    return images, labels


def load_mnist_idx(
    directory: str | os.PathLike[str], *, kind: Literal["mnist", "fashion"] = "mnist"
) -> SplitDataset:
    """MNIST (``kind="mnist"``) or Fashion-MNIST (``kind="fashion"``) from IDX files.

    Looks in ``directory`` and in torchvision's layout below it (``MNIST/raw`` or
    ``FashionMNIST/raw``) for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``. Keeps the
    official train/test split. Images become ``Tensor[N, 1, H, W]`` float32: scaled to
    ``[0, 1]``, then standardized with the mean and std of all training pixels.

    Raises ``FileNotFoundError`` naming a missing file and the folders searched, and
    ``ValueError`` naming a malformed file (magic number, truncation, counts, image sizes).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    name, torchvision_folder = _KINDS[kind]
    root = data_folder(directory, name)
    folders = [root, root / torchvision_folder / "raw"]
    x_train, y_train = _read_split(folders, "train", name)
    x_test, y_test = _read_split(folders, "t10k", name)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{name}: training images are {x_train.shape[1:]} but test images are "
            f"{x_test.shape[1:]}; they must have the same size"
        )
    return SplitDataset.from_arrays(
        name, "classification",
        x_train[:, None], y_train, x_test[:, None], y_test,
        num_classes=_NUM_CLASSES, x_scale=1 / 255,
        meta={"source": f"IDX files in {str(root)!r}", "split": "official"},
    )  # fmt: skip
