"""A folder of images, one sub-folder per class, as batches for a vision model.

    from varshift.data import image_folder_loader

    loader = image_folder_loader("val/", image_size=224, batch_size=64)
    for x, y in loader:  # x: Tensor[N, 3, 224, 224], y: Tensor[N] (class indices)
        ...

The folder is read by torchvision's ``ImageFolder`` (``ROOT/CLASS/IMAGE.jpg``; classes in sorted
order, index 0 first); each image is converted to RGB, resized so that its shorter side is
``image_size`` and cut to the central ``image_size x image_size`` square, then, by default,
normalised with the ImageNet mean and standard deviation that torchvision's and timm's models
expect. The images are read in one fixed random order drawn from ``seed``, the same on every
pass: ``ImageFolder`` lists them class by class, so the first few batches of an unshuffled
folder would hold a single class and bias any statistics estimated from them.

torchvision (and through it PIL) is imported only when a loader is made:
``pip install 'varshift[zoo]'``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "image_folder_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet's training images (RGB, values in [0, 1])."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet's training images (RGB, values in [0, 1])."""


def image_folder_loader(
    root: str | os.PathLike[str],
    *,
    image_size: int = 224,
    batch_size: int = 128,
    normalize: bool = True,
    seed: int = 0,
) -> DataLoader[Any]:
    """A ``torch.utils.data.DataLoader`` of ``(Tensor[N, 3, S, S], Tensor[N])`` batches (``S`` =
    ``image_size``) over the images under ``root``, one sub-folder per class.

    Args:
        root: the folder whose sub-folders are the classes.
        image_size: side ``S`` of the square each image is resized and centre-cropped to.
        batch_size: images per batch (the last batch may hold fewer).
        normalize: subtract :data:`IMAGENET_MEAN` and divide by :data:`IMAGENET_STD`
            (``False``: values stay in [0, 1]).
        seed: seed of the fixed order the images are read in.

    Raises:
        ValueError: ``image_size`` or ``batch_size`` is below 1, ``root`` has no class
            sub-folder, or its class folders hold no image.
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ImportError: torchvision is not installed.
    """
    folder = _class_root(root)
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    datasets, transforms = _torchvision()
    steps: list[Any] = [
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
    ]
    if normalize:
        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    except FileNotFoundError as exc:  # class folders that hold no file with an image suffix
        raise ValueError(
            f"image folder {root}: no images in its class folders (expected files such as "
            f"ROOT/CLASS/IMAGE.jpg): {' '.join(str(exc).split())}"
        ) from exc
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False)


def _class_root(root: str | os.PathLike[str]) -> Path:
    """``root`` checked to be a folder with at least one class sub-folder, before torchvision
    is imported (its own message for an empty folder names neither the layout nor the fix)."""
    folder = Path(root)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"image folder {root} is a file: give the folder whose sub-folders are the classes"
        )
    if not any(entry.is_dir() for entry in folder.iterdir()):
        raise ValueError(
            f"image folder {root} has no class sub-folders: expected ROOT/CLASS/IMAGE.jpg, "
            "one sub-folder per class"
        )
    return folder


def _torchvision() -> tuple[Any, Any]:
    """``torchvision.datasets`` and ``torchvision.transforms``, imported now."""
    try:  # by name: torchvision ships no type information, and is an optional dependency
        datasets = importlib.import_module("torchvision.datasets")
        transforms = importlib.import_module("torchvision.transforms")
    except ImportError as exc:
        raise ImportError(
            "image folders are read with torchvision, which is not installed: "
            "pip install 'varshift[zoo]'"
        ) from exc
    return datasets, transforms
