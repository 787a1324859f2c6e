"""CIFAR-10 / CIFAR-100 from the python pickles: tiny batches written here in the official
layouts, and malformed or hostile files that must fail clearly without running anything."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from varshift.data import load_cifar, load_dataset

N_TRAIN, N_TEST = 20, 10


def _images(n: int, seed: int) -> np.ndarray:
    """``n`` rows of 3072 uint8 values whose three channels have different brightness."""
    rng = np.random.default_rng(seed)
    channels = [rng.integers(lo, lo + 100, size=(n, 1024)) for lo in (0, 70, 150)]
    return np.concatenate(channels, axis=1).astype(np.uint8)


def _dump(path: Path, content: Any) -> None:
    # Protocol 2 and byte-string keys, as Python 2 wrote the official files.
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def _write_cifar10(folder: Path) -> Path:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    data = _images(N_TRAIN, 0)
    for i in range(5):  # five batches of four images
        rows = slice(4 * i, 4 * i + 4)
        labels = [int(v) for v in np.arange(N_TRAIN)[rows] % 10]
        _dump(batches / f"data_batch_{i + 1}", {b"data": data[rows], b"labels": labels})
    test_labels = [int(v) for v in (np.arange(N_TEST) * 3) % 10]
    _dump(batches / "test_batch", {b"data": _images(N_TEST, 1), b"labels": test_labels})
    return folder


def _write_cifar100(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        fine = [int(v) for v in (np.arange(n) * 7) % 100]
        coarse = [v // 5 for v in fine]
        batch = {b"data": _images(n, seed), b"fine_labels": fine, b"coarse_labels": coarse}
        _dump(folder / name, batch)
    return folder


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    return _write_cifar10(tmp_path / "cifar")


def _check_standardized(data: Any) -> None:
    raw = _images(N_TRAIN, 0).reshape(-1, 3, 32, 32) / 255
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    np.testing.assert_allclose(data.meta["x_mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(data.meta["x_std"], std, rtol=1e-10)
    # Channel 0 of image 0 is the first 1024 values of its row (red plane, row-major).
    red = raw[0, 0]
    np.testing.assert_allclose(data.x_train[0, 0].numpy(), (red - mean[0]) / std[0], atol=1e-5)
    got = data.x_train.double()
    np.testing.assert_allclose(got.mean(dim=(0, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(got.std(dim=(0, 2, 3), unbiased=False), 1.0, atol=1e-6)
    test = _images(N_TEST, 1).reshape(-1, 3, 32, 32) / 255
    expected = (test - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(data.x_test.numpy(), expected, atol=1e-5)


def test_cifar10(cifar10_dir: Path) -> None:
    data = load_cifar(cifar10_dir)
    assert (data.name, data.num_classes, data.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert data.x_train.shape == (N_TRAIN, 3, 32, 32)
    assert data.x_test.shape == (N_TEST, 3, 32, 32)
    assert data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64
    # Batches concatenated in order 1..5.
    assert data.y_train.tolist() == [i % 10 for i in range(N_TRAIN)]
    assert data.y_test.tolist() == [(3 * i) % 10 for i in range(N_TEST)]
    _check_standardized(data)


def test_cifar10_folder_itself_and_load_dataset(cifar10_dir: Path) -> None:
    inner = load_cifar(cifar10_dir / "cifar-10-batches-py")
    via_spec = load_dataset("CIFAR-10", data_dir=cifar10_dir)
    assert torch.equal(inner.x_train, via_spec.x_train)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    data = load_cifar(_write_cifar100(tmp_path / "cifar-100-python"), which=100)
    assert (data.name, data.num_classes, data.num_outputs) == ("cifar100", 100, 100)
    assert data.y_train.tolist() == [(7 * i) % 100 for i in range(N_TRAIN)]
    _check_standardized(data)
    # The parent folder works too, and so does the load_dataset name.
    assert len(load_dataset("cifar100", data_dir=tmp_path).x_test) == N_TEST


def test_str_keys_are_accepted(cifar10_dir: Path) -> None:
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    _dump(path, {"data": _images(N_TEST, 1), "labels": list(range(N_TEST))})
    assert load_cifar(cifar10_dir).y_test.tolist() == list(range(N_TEST))


def test_bad_which(cifar10_dir: Path) -> None:
    with pytest.raises(ValueError, match="which must be 10 or 100, got 20"):
        load_cifar(cifar10_dir, which=20)


def test_missing_batch_is_named(cifar10_dir: Path) -> None:
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar10 batch not found: .*data_batch_3"):
        load_cifar(cifar10_dir)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_batch_1 in .*cifar-10-batches-py"):
        load_cifar(tmp_path)  # exists, but holds nothing


class _Hostile:
    """Unpickling this would create a folder: the loader must refuse before calling it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.mkdir, (str(self.target),)


def _batch_path(folder: Path) -> Path:
    return folder / "cifar-10-batches-py" / "data_batch_2"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "expected a pickled dict, got list"),
        ({b"data": _images(4, 0)}, r"expected keys 'data' and 'labels', found \['data'\]"),
        ({b"data": _images(4, 0)[:, :3071], b"labels": [0] * 4}, "rows hold 3071 values"),
        ({b"data": _images(4, 0).astype(np.float32), b"labels": [0] * 4}, "must be a uint8"),
        ({b"data": [[0] * 3072] * 4, b"labels": [0] * 4}, "must be a uint8 array"),
        ({b"data": _images(4, 0), b"labels": [0] * 3}, "must be 4 integers"),
        ({b"data": _images(4, 0), b"labels": [0.5] * 4}, "must be 4 integers"),
        ({b"data": _images(4, 0), b"labels": [0, 1, 2, 10]}, "values must lie in 0-9, got 0-10"),
    ],
)
def test_malformed_batch_fails_clearly(cifar10_dir: Path, content: Any, message: str) -> None:
    _dump(_batch_path(cifar10_dir), content)
    with pytest.raises(ValueError, match=rf"data_batch_2: .*{message}"):
        load_cifar(cifar10_dir)


def test_garbage_file_fails_clearly(cifar10_dir: Path) -> None:
    _batch_path(cifar10_dir).write_bytes(b"\x80\x02 certainly not a pickle")
    with pytest.raises(ValueError, match="data_batch_2: not a readable CIFAR batch pickle"):
        load_cifar(cifar10_dir)


def test_hostile_pickle_is_refused_without_running(cifar10_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "created-by-pickle"
    _dump(_batch_path(cifar10_dir), {b"data": _Hostile(target), b"labels": [0]})
    with pytest.raises(ValueError, match=r"refusing to load posix\.mkdir|refusing to load os\."):
        load_cifar(cifar10_dir)
    assert not target.exists()


def test_modern_pickle_protocol_is_accepted(cifar10_dir: Path) -> None:
    # Re-pickled copies (protocol 5 stores arrays through numpy's _frombuffer) must still load.
    path = _batch_path(cifar10_dir)
    with path.open("rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    with path.open("wb") as handle:
        pickle.dump(batch, handle, protocol=5)
    assert len(load_cifar(cifar10_dir).x_train) == N_TRAIN
