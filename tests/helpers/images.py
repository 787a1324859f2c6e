"""A tiny folder of images for the ``imagefolder:`` tests: random RGB pictures written with PIL,
one sub-folder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image_folder(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 4,
    size: tuple[int, int] = (40, 40),
    seed: int = 0,
) -> Path:
    """``root/CLASS/I.png``: ``per_class`` random RGB images of ``size`` (width, height) per
    class; returns ``root``. Needs PIL (installed with torchvision)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root
