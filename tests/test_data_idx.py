"""MNIST / Fashion-MNIST from IDX files: tiny files written here (20 train, 10 test images),
plain, gzipped and in torchvision's layout, and malformed ones that must fail clearly."""

from __future__ import annotations

import gzip
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from varshift.data import load_dataset, load_mnist_idx

FILES = {
    "train-images-idx3-ubyte": "train images",
    "train-labels-idx1-ubyte": "train labels",
    "t10k-images-idx3-ubyte": "test images",
    "t10k-labels-idx1-ubyte": "test labels",
}


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(20, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(20) % 10,
        # Test images darker than training ones, so their statistics clearly differ.
        "t10k-images-idx3-ubyte": rng.integers(0, 128, size=(10, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(10) * 3) % 10,
    }


def _write(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        content = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
    return folder


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    return _write(tmp_path / "mnist", _arrays())


def test_reads_plain_idx_files(mnist_dir: Path) -> None:
    data = load_mnist_idx(mnist_dir)
    raw = _arrays()
    assert (data.name, data.task, data.num_classes) == ("mnist", "classification", 10)
    assert data.x_train.shape == (20, 1, 28, 28)
    assert data.x_test.shape == (10, 1, 28, 28)
    assert data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64
    assert data.y_train.tolist() == raw["train-labels-idx1-ubyte"].tolist()
    assert data.y_test.tolist() == raw["t10k-labels-idx1-ubyte"].tolist()
    # Scaled to [0, 1], then standardized with one scalar from all training pixels.
    train = raw["train-images-idx3-ubyte"] / 255
    (mean,), (std,) = data.meta["x_mean"], data.meta["x_std"]
    assert (mean, std) == pytest.approx((train.mean(), train.std()), rel=1e-10)
    test = raw["t10k-images-idx3-ubyte"] / 255
    np.testing.assert_allclose(data.x_test[:, 0].numpy(), (test - mean) / std, atol=1e-5)
    assert float(data.x_train.double().mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(data.x_train.double().std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert float(data.x_test.double().mean()) < -0.5


def test_gzipped_files_give_the_same_dataset(mnist_dir: Path, tmp_path: Path) -> None:
    zipped = load_mnist_idx(_write(tmp_path / "gz", _arrays(), gz=True))
    plain = load_mnist_idx(mnist_dir)
    assert torch.equal(zipped.x_train, plain.x_train)
    assert torch.equal(zipped.y_test, plain.y_test)


@pytest.mark.parametrize(("kind", "folder", "name"), [
    ("mnist", "MNIST", "mnist"), ("fashion", "FashionMNIST", "fashion-mnist"),
])  # fmt: skip
def test_torchvision_layout(tmp_path: Path, kind: str, folder: str, name: str) -> None:
    _write(tmp_path / folder / "raw", _arrays(), gz=True)
    data = load_mnist_idx(tmp_path, kind=kind)  # type: ignore[arg-type]
    assert data.name == name
    assert len(data.x_train) == 20


def test_dotted_file_names(tmp_path: Path) -> None:
    arrays = {name.replace("-idx", ".idx"): a for name, a in _arrays().items()}
    data = load_mnist_idx(_write(tmp_path, arrays))
    assert len(data.x_test) == 10


def test_load_dataset_reads_idx_from_data_dir(mnist_dir: Path) -> None:
    assert load_dataset("mnist", data_dir=mnist_dir).name == "mnist"
    assert load_dataset("Fashion_MNIST", data_dir=str(mnist_dir)).name == "fashion-mnist"
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")


@pytest.mark.parametrize("missing", list(FILES))
def test_missing_file_is_named(mnist_dir: Path, missing: str) -> None:
    (mnist_dir / missing).unlink()
    where = re.escape(repr(str(mnist_dir)))
    with pytest.raises(FileNotFoundError, match=rf"{missing} or {missing}\.gz.* in {where}"):
        load_mnist_idx(mnist_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist_idx(tmp_path / "nowhere")


def test_bad_kind(mnist_dir: Path) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        load_mnist_idx(mnist_dir, kind="kmnist")  # type: ignore[arg-type]


def _swap_magic(folder: Path) -> None:
    labels = _arrays()["train-labels-idx1-ubyte"]
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, magic=0x00000803))


def _int32_type(folder: Path) -> None:
    images = _arrays()["t10k-images-idx3-ubyte"]
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images, magic=0x00000C03))


def _truncate(folder: Path) -> None:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def _truncate_header(folder: Path) -> None:
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:10])


def _trailing_bytes(folder: Path) -> None:
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")


def _count_mismatch(folder: Path) -> None:
    labels = _arrays()["train-labels-idx1-ubyte"][:19]
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))


def _size_mismatch(folder: Path) -> None:
    images = np.zeros((10, 27, 27))
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))


def _label_out_of_range(folder: Path) -> None:
    labels = np.full(10, 10)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))


def _bad_gzip(folder: Path) -> None:
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_swap_magic, r"train-labels-idx1-ubyte: bad magic number 0x00000803.*0x00000801"),
        (_int32_type, r"t10k-images-idx3-ubyte: bad magic number 0x00000c03.*0x00000803"),
        (_truncate, r"train-images-idx3-ubyte: truncated: .*\(20, 28, 28\)"),
        (_truncate_header, r"t10k-images-idx3-ubyte: truncated header"),
        (_trailing_bytes, r"t10k-labels-idx1-ubyte: has trailing bytes"),
        (_count_mismatch, r"holds 20 images but .*train-labels-idx1-ubyte holds 19 labels"),
        (_size_mismatch, r"training images are \(28, 28\) but test images are \(27, 27\)"),
        (_label_out_of_range, r"t10k-labels-idx1-ubyte: label 10 is outside 0-9"),
        (_bad_gzip, r"train-images-idx3-ubyte\.gz: not a valid gzip file"),
    ],
)
def test_malformed_files_fail_clearly(
    mnist_dir: Path, spoil: Callable[[Path], None], message: str
) -> None:
    spoil(mnist_dir)
    with pytest.raises(ValueError, match=message):
        load_mnist_idx(mnist_dir)
