"""load_dataset: names, aliases, the builtin: prefix and its error messages (the on-disk names
are exercised in test_data_idx.py and test_data_cifar.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import varshift.data
from varshift.data import builtin_names, dataset_names, load_builtin, load_dataset


@pytest.mark.parametrize("spec", ["digits", "builtin:digits", "  DIGITS ", "Builtin:Digits"])
def test_builtin_specs(spec: str) -> None:
    data = load_dataset(spec, seed=3)
    reference = load_builtin("digits", seed=3)
    assert data.name == "digits"
    assert torch.equal(data.x_train, reference.x_train)


def test_data_dir_is_ignored_for_builtins(tmp_path: Path) -> None:
    assert load_dataset("diabetes", data_dir=tmp_path / "unused").name == "diabetes"


def test_dataset_names() -> None:
    names = dataset_names()
    assert names[: len(builtin_names())] == builtin_names()
    assert names[len(builtin_names()) :] == ["mnist", "fashion-mnist", "cifar10", "cifar100"]


@pytest.mark.parametrize("spec", ["imagenet", "builtin:mnist", "builtin:", ""])
def test_unknown_name_lists_valid_ones(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown") as caught:
        load_dataset(spec)
    assert "digits" in str(caught.value)


def test_unknown_name_lists_every_valid_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as caught:
        load_dataset("imagenet")
    assert all(name in str(caught.value) for name in dataset_names())


@pytest.mark.parametrize("spec", ["mnist", "fashion-mnist", "fashion", "cifar10", "cifar-100"])
def test_on_disk_without_data_dir_says_to_pass_it(spec: str) -> None:
    with pytest.raises(ValueError, match=r"pass --data-dir \(data_dir=\.\.\.\)"):
        load_dataset(spec)


def test_public_surface() -> None:
    # The names docs/architecture.md promises to the other packages.
    promised = "SplitDataset load_builtin builtin_names load_mnist_idx load_cifar load_dataset"
    assert set(promised.split()) <= set(varshift.data.__all__)
    assert all(hasattr(varshift.data, name) for name in varshift.data.__all__)


def test_importing_data_pulls_in_no_optional_package_or_other_varshift_package() -> None:
    code = (
        "import sys, varshift.data\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'mnist1d', 'mlxtend')"
        " or (m.startswith('varshift.') and not m.startswith('varshift.data'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
