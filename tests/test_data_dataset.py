"""SplitDataset, its construction from arrays (standardization with training statistics only),
and the seeded index selection behind every split and subset. Synthetic data only: fast."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from varshift.data import SplitDataset
from varshift.data.preprocess import sample_indices, split_indices, standardize


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 3-channel 4×4 uint8 images whose channels have clearly different means, and
    balanced labels 0-4."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, size=(n, 3, 4, 4)) + np.array([0, 60, 150])[None, :, None, None]
    return x.astype(np.uint8), np.arange(n) % 5


@pytest.fixture(scope="module")
def images() -> SplitDataset:
    x_train, y_train = _images(100, 0)
    x_test, y_test = _images(40, 1)
    return SplitDataset.from_arrays(
        "toy", "classification", x_train, y_train, x_test, y_test,
        num_classes=5, x_scale=1 / 255, meta={"train_index": np.arange(100) + 1000},
    )  # fmt: skip


def _regression_arrays(targets: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """40 rows: 4 features and ``targets`` targets, far from mean 0 / std 1."""
    rng = np.random.default_rng(2)
    y = rng.normal(-2.0, 7.0, size=(40, targets))
    return rng.normal(5.0, 3.0, size=(40, 4)), (y[:, 0] if targets == 1 else y)


def _regression(targets: int = 1) -> SplitDataset:
    x, y = _regression_arrays(targets)
    return SplitDataset.from_arrays("reg", "regression", x[:30], y[:30], x[30:], y[30:])


def test_from_arrays_standardizes_per_channel_with_training_statistics(
    images: SplitDataset,
) -> None:
    x_train, _ = _images(100, 0)
    x_test, _ = _images(40, 1)
    scaled = x_train.astype(np.float64) / 255
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    np.testing.assert_allclose(images.meta["x_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(images.meta["x_std"], std, rtol=1e-12)
    assert images.meta["x_scale"] == pytest.approx(1 / 255)
    # Training split: mean 0, population std 1, per channel.
    got = images.x_train.double()
    np.testing.assert_allclose(got.mean(dim=(0, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(got.std(dim=(0, 2, 3), unbiased=False), 1.0, atol=1e-6)
    # Test split: transformed with the *training* statistics, so it is not exactly standardized.
    expected_test = (x_test / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(images.x_test.numpy(), expected_test, atol=1e-5)
    assert abs(float(images.x_test.double().mean())) > 1e-3


def test_from_arrays_types_and_shapes(images: SplitDataset) -> None:
    assert images.x_train.dtype == torch.float32
    assert images.y_train.dtype == torch.int64
    assert images.input_shape == (3, 4, 4)
    assert images.num_outputs == 5
    assert torch.equal(images.y_test, torch.arange(40) % 5)


def test_from_arrays_does_not_alias_caller_labels() -> None:
    y = np.arange(10) % 2
    data = SplitDataset.from_arrays(
        "t", "classification", np.zeros((10, 2)), y, np.zeros((4, 2)), y[:4], num_classes=2
    )
    y[:] = 0
    assert data.y_train.sum() == 5


def test_regression_targets_are_standardized_and_invertible() -> None:
    data = _regression()
    assert data.y_train.dtype == torch.float32
    assert data.y_train.shape == (30,)
    assert data.num_classes is None
    assert data.num_outputs == 1
    assert float(data.y_train.double().mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(data.y_train.double().std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    (y_mean,), (y_std,) = data.meta["y_mean"], data.meta["y_std"]
    _, raw_y = _regression_arrays()
    np.testing.assert_allclose(data.y_test.double() * y_std + y_mean, raw_y[30:], rtol=1e-5)


def test_multi_target_regression_counts_outputs() -> None:
    data = _regression(targets=3)
    assert data.y_train.shape == (30, 3)
    assert data.num_outputs == 3
    assert len(data.meta["y_mean"]) == 3


def test_constant_feature_does_not_divide_by_zero() -> None:
    train = np.ones((5, 2))
    train[:, 1] = np.arange(5)
    got_train, got_test, _, std = standardize(train, np.full((2, 2), 3.0))
    assert std[0] == 1.0
    assert np.isfinite(got_train).all()
    assert np.isfinite(got_test).all()
    np.testing.assert_allclose(got_test[:, 0], 2.0)


def test_float_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="integers"):
        SplitDataset.from_arrays(
            "t", "classification", np.zeros((3, 2)), np.array([0.0, 1.5, 1.0]),
            np.zeros((1, 2)), np.array([0.0]), num_classes=2,
        )  # fmt: skip


def _valid_kwargs() -> dict[str, object]:
    return {
        "name": "t",
        "task": "classification",
        "x_train": torch.zeros(6, 2),
        "y_train": torch.tensor([0, 1, 2, 0, 1, 2]),
        "x_test": torch.zeros(3, 2),
        "y_test": torch.tensor([0, 1, 2]),
        "num_classes": 3,
        "input_shape": (2,),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "ranking"}, "task must be one of"),
        ({"x_train": torch.zeros(6, 2, dtype=torch.float64)}, "x_train must be float32"),
        ({"input_shape": (3,)}, "per-sample shape"),
        ({"y_test": torch.tensor([0, 1])}, "3 samples but y_test has 2"),
        ({"y_train": torch.tensor([0, 1, 2, 0, 1, 3])}, r"labels must lie in \[0, 3\)"),
        ({"y_train": torch.tensor([0, 1, 2, 0, 1, -1])}, r"labels must lie in \[0, 3\)"),
        ({"y_test": torch.tensor([0.0, 1.0, 2.0])}, "must be int64"),
        ({"num_classes": None}, "num_classes must be an int"),
        ({"task": "regression"}, "num_classes must be None"),
        (
            {"task": "regression", "num_classes": None, "y_test": torch.zeros(3, 2)},
            "must be float32",
        ),
    ],
)
def test_construction_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitDataset(**{**_valid_kwargs(), **change})  # type: ignore[arg-type]


def test_frozen_and_meta_read_only(images: SplitDataset) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        images.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        images.meta["x_mean"] = (0.0,)  # type: ignore[index]


def test_repr_is_short_and_informative(images: SplitDataset) -> None:
    text = repr(images)
    assert text == (
        "SplitDataset('toy', classification, train=100, test=40, input_shape=(3, 4, 4), "
        "num_classes=5)"
    )
    assert "num_classes" not in repr(_regression())


def test_subset_is_stratified_and_keeps_rows(images: SplitDataset) -> None:
    small = images.subset(train=50, test=10, seed=3)
    assert (len(small.x_train), len(small.x_test)) == (50, 10)
    assert torch.bincount(small.y_train).tolist() == [10] * 5
    assert torch.bincount(small.y_test).tolist() == [2] * 5
    # Each kept row is a row of the original split with its own label, in the original order.
    keep = np.asarray(small.meta["train_index"]) - 1000
    assert np.all(np.diff(keep) > 0)
    assert torch.equal(small.x_train, images.x_train[keep])
    assert torch.equal(small.y_train, images.y_train[keep])
    assert small.meta["subset"] == {"train": 50, "test": 10, "seed": 3}
    # Statistics still describe the full training split.
    assert small.meta["x_mean"] == images.meta["x_mean"]


def test_subset_is_seeded(images: SplitDataset) -> None:
    first, again = images.subset(train=20, seed=1), images.subset(train=20, seed=1)
    other = images.subset(train=20, seed=2)
    assert torch.equal(first.x_train, again.x_train)
    assert not torch.equal(first.x_train, other.x_train)
    assert torch.equal(first.x_test, images.x_test)  # test=None keeps everything


def test_subset_of_regression_is_random_without_labels() -> None:
    data = _regression()
    small = data.subset(train=7, test=3, seed=0)
    assert small.y_train.shape == (7,)
    assert small.x_test.shape == (3, 4)
    rows = {tuple(r.tolist()) for r in data.x_train}
    assert all(tuple(r.tolist()) in rows for r in small.x_train)


@pytest.mark.parametrize("bad", [0, 101, -1, 2.5, True])
def test_subset_refuses_impossible_sizes(images: SplitDataset, bad: object) -> None:
    with pytest.raises(ValueError, match=r"train must be an int in \[1, 100\]"):
        images.subset(train=bad)  # type: ignore[arg-type]


def test_sample_indices_largest_remainder() -> None:
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    picked = sample_indices(10, 5, np.random.default_rng(0), labels)
    # Exact shares 2.5, 1.5, 1.0: floors 2, 1, 1, and the one left over goes to class 0
    # (the tie between classes 0 and 1 is broken by class order).
    assert np.bincount(labels[picked]).tolist() == [3, 1, 1]
    assert len(set(picked.tolist())) == 5
    assert np.all(np.diff(picked) > 0)


def test_split_indices_partition_and_rounding() -> None:
    labels = np.arange(442) % 7
    train, test = split_indices(442, 0.2, seed=4, labels=labels)
    assert len(test) == math.ceil(0.2 * 442) == 89
    assert len(train) == 353
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(442))
    again, _ = split_indices(442, 0.2, seed=4, labels=labels)
    other, _ = split_indices(442, 0.2, seed=5, labels=labels)
    assert np.array_equal(train, again)
    assert not np.array_equal(train, other)
