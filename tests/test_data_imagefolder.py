"""``varshift.data.image_folder_loader``: a folder of images (one sub-folder per class) as
``(Tensor[N, 3, S, S], Tensor[N])`` batches, read in one fixed mixed order, ImageNet-normalised
by default, with one-line errors for a folder that is not one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers.images import write_image_folder
from varshift.data import IMAGENET_MEAN, IMAGENET_STD, image_folder_loader

pytest.importorskip("torchvision")


def _all(loader: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)  # type: ignore[call-overload]
    return torch.cat(xs), torch.cat(ys)


def test_batches_are_square_images_with_class_labels(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", size=(60, 40))  # not square: resize + crop
    loader = image_folder_loader(root, image_size=16, batch_size=3)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(3, 3, 16, 16), (3, 3, 16, 16), (2, 3, 16, 16)]
    _, y = _all(loader)
    assert sorted(y.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_order_is_mixed_and_the_same_on_every_pass(tmp_path: Path) -> None:
    # ImageFolder lists class by class: unshuffled, a first batch of 4 would be one class only,
    # and BatchNorm statistics estimated from --batches 1 would see one class.
    root = write_image_folder(tmp_path / "imgs")
    loader = image_folder_loader(root, image_size=8, batch_size=4, seed=0)
    first = next(iter(loader))[1]
    assert set(first.tolist()) == {0, 1}
    x1, y1 = _all(loader)
    x2, y2 = _all(loader)
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)
    _, y_other = _all(image_folder_loader(root, image_size=8, batch_size=4, seed=1))
    assert not torch.equal(y1, y_other)


def test_imagenet_normalisation_is_the_default(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs")
    raw, _ = _all(image_folder_loader(root, image_size=8, normalize=False))
    normalized, _ = _all(image_folder_loader(root, image_size=8))
    assert float(raw.min()) >= 0.0
    assert float(raw.max()) <= 1.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalized, (raw - mean) / std)


@pytest.mark.parametrize(
    ("layout", "error", "words"),
    [
        ("missing", FileNotFoundError, "not found"),
        ("file", NotADirectoryError, "is a file"),
        ("empty", ValueError, "no class sub-folders"),
        ("no images", ValueError, "no images"),
    ],
)
def test_a_folder_that_is_not_one_is_refused_in_one_line(
    tmp_path: Path, layout: str, error: type[Exception], words: str
) -> None:
    root = tmp_path / "imgs"
    if layout == "file":
        root.write_text("not a folder")
    elif layout == "empty":
        root.mkdir()
        (root / "stray.png").write_bytes(b"")
    elif layout == "no images":
        (root / "cat").mkdir(parents=True)
        (root / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(error, match=words) as caught:
        image_folder_loader(root)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("name", "value"), [("image_size", 0), ("batch_size", True)])
def test_sizes_below_one_are_refused(tmp_path: Path, name: str, value: object) -> None:
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got {value!r}"):
        image_folder_loader(root, **{name: value})  # type: ignore[arg-type]


def test_without_torchvision_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"varshift\[zoo\]"):
        image_folder_loader(root)
