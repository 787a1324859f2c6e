"""``varshift.checkpoints``: a model from a ``pkg.module:factory`` spec and a ``state_dict``
file, with one-line errors that name the spec or the file, and a model left untouched by a
checkpoint it refuses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from varshift.checkpoints import (
    NESTED_STATE_KEYS,
    call_factory,
    load_checkpoint,
    load_model,
    read_state_dict,
    resolve_factory,
    state_dict_mismatch,
)

NETS = """
import torch
from torch import nn


def net():
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


class Zoo:
    @staticmethod
    def small():
        return nn.Linear(2, 2)


def not_a_module():
    return [1, 2]


def raises():
    raise RuntimeError("no GPU here\\nsecond line")


NUMBER = 3
"""


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"nets_{abs(hash(tmp_path)) % 10**9}"
    (tmp_path / f"{name}.py").write_text(NETS)
    (tmp_path / f"broken_{name}.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    return name


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _saved(tmp_path: Path, state: object, name: str = "net.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_load_model_calls_the_factory_and_loads_the_checkpoint(
    nets: str, tmp_path: Path
) -> None:
    trained = _net()
    with torch.no_grad():
        trained[1].running_var.fill_(4.0)
    path = _saved(tmp_path, trained.state_dict())
    model = load_model(f"{nets}:net", path)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert isinstance(load_model(f"{nets}:Zoo.small"), nn.Linear)  # a dotted attribute


@pytest.mark.parametrize("key", NESTED_STATE_KEYS)
def test_a_state_dict_nested_by_a_training_script_is_found(tmp_path: Path, key: str) -> None:
    state = _net().state_dict()
    path = _saved(tmp_path, {"epoch": 3, key: state})
    assert set(read_state_dict(path)) == set(state)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("{nets}", ValueError, r"--model must be pkg\.module:function, got 'nets_\d+'"),
        (":net", ValueError, r"must be pkg\.module:function"),
        ("no_such_module_anywhere:net", ImportError, r"cannot import 'no_such_module_anywhere'"),
        ("broken_{nets}:net", ImportError, r"cannot import 'broken_nets_\d+': ZeroDivisionError"),
        ("{nets}:missing", ImportError, r"has no attribute 'missing'"),
        ("{nets}:NUMBER", TypeError, r"'NUMBER' is a int, not callable"),
        ("{nets}:raises", ValueError, r"calling it raised RuntimeError: no GPU here second line"),
        ("{nets}:not_a_module", TypeError, r"returned an object of type list, not a torch"),
    ],
)
def test_bad_specs_raise_one_line_naming_the_argument(
    nets: str, spec: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as caught:
        load_model(spec.format(nets=nets), argument="--model")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("--model")


def test_resolve_and_call_factory(nets: str) -> None:
    factory = resolve_factory(f"{nets}:Zoo.small")
    assert isinstance(factory(), nn.Linear)
    assert call_factory(f"{nets}:not_a_module") == [1, 2]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda d: d / "absent.pt", FileNotFoundError, r"checkpoint not found: .*absent\.pt"),
        (lambda d: d, IsADirectoryError, r"is a directory, not a file"),
        (lambda d: _bytes(d, b"garbage" * 20), ValueError, r"cannot read checkpoint .*: \w+"),
        (lambda d: _saved(d, [torch.zeros(2)]), ValueError, r"holds a list, not a state_dict"),
        (lambda d: _saved(d, {"0.weight": torch.zeros(3, 4)}), ValueError,
         r"does not match the model: missing keys 0\.bias, 1\.weight, 1\.bias and 3 more"),
        (lambda d: _saved(d, {**_net().state_dict(), "extra": torch.zeros(1)}), ValueError,
         r"unexpected keys extra"),
        (lambda d: _saved(d, {**_net().state_dict(), "0.weight": torch.zeros(3, 5)}), ValueError,
         r"shape mismatch: 0\.weight is \(3, 5\) in the checkpoint, \(3, 4\) in the model"),
        (lambda d: _saved(d, {**_net().state_dict(), "1.running_var": torch.full((3,), torch.inf)}),
         ValueError, r"holds NaN or infinite values in 1\.running_var"),
        (lambda d: _saved(d, {**_net().state_dict(), "0.bias": torch.tensor([0, float("nan"), 0])}),
         ValueError, r"holds NaN or infinite values in 0\.bias"),
    ],
)  # fmt: skip
def test_refused_checkpoints_leave_the_model_untouched(
    tmp_path: Path, make: object, error: type[Exception], message: str
) -> None:
    model = _net()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(error, match=message) as caught:
        load_checkpoint(model, path)
    assert "\n" not in str(caught.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_non_finite_values_load_when_allowed(tmp_path: Path) -> None:
    state = {**_net().state_dict(), "1.running_var": torch.full((3,), torch.inf)}
    model = _net()
    load_checkpoint(model, _saved(tmp_path, state), require_finite=False)
    assert torch.isinf(model[1].running_var).all()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_checkpoint_says_so(tmp_path: Path) -> None:
    path = _saved(tmp_path, _net().state_dict())
    path.chmod(0)
    with pytest.raises(PermissionError, match="permission denied"):
        read_state_dict(path)


def test_state_dict_mismatch_is_empty_for_a_match() -> None:
    assert state_dict_mismatch(_net().state_dict(), _net().state_dict()) == ""


def _bytes(directory: Path, data: bytes) -> Path:
    path = directory / "garbage.pt"
    path.write_bytes(data)
    return path
