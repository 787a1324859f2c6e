"""``varshift.checkpoints`` for today's models: ``torchvision:NAME`` and ``timm:NAME`` specs with
keyword arguments (randomly initialised, never downloading weights), keyword arguments for a
plain factory, and ``.safetensors`` checkpoints, each error on one line naming what to fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from varshift.checkpoints import (
    SAFETENSORS_SUFFIX,
    load_checkpoint,
    load_model,
    read_state_dict,
    save_state_dict,
)


def _one_line(caught: pytest.ExceptionInfo[Exception]) -> str:
    text = str(caught.value)
    assert "\n" not in text
    return text


# --- model zoos ----------------------------------------------------------------------------------


def test_torchvision_model_by_name_takes_keyword_arguments() -> None:
    pytest.importorskip("torchvision")
    model = load_model("torchvision:resnet18", num_classes=3)
    assert type(model).__name__ == "ResNet"
    assert model.fc.out_features == 3  # type: ignore[union-attr]


def test_timm_model_by_name_takes_keyword_arguments() -> None:
    timm = pytest.importorskip("timm")
    model = load_model("timm:efficientnet_b0", drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates
    assert max(rates) > 0
    plain = load_model("timm:efficientnet_b0")
    assert not any(isinstance(m, timm.layers.DropPath) for m in plain.modules())


@pytest.mark.parametrize(
    ("zoo", "spec", "close"),
    [
        ("torchvision", "torchvision:resnet19", "resnet18"),
        ("timm", "timm:efficentnet_b0", "efficientnet_b0"),
    ],
)
def test_an_unknown_model_name_lists_close_matches(zoo: str, spec: str, close: str) -> None:
    pytest.importorskip(zoo)
    with pytest.raises(
        ValueError, match=f"--model {spec}: no model .* did you mean {close}"
    ) as caught:
        load_model(spec, argument="--model")
    _one_line(caught)


@pytest.mark.parametrize(
    ("zoo", "spec", "kwargs", "argument"),
    [
        ("timm", "timm:efficientnet_b0", {"drop_path_rat": 0.2}, "drop_path_rat"),
        ("torchvision", "torchvision:resnet18", {"num_class": 3}, "num_class"),
    ],
)
def test_a_keyword_the_model_does_not_take_is_named(
    zoo: str, spec: str, kwargs: dict[str, object], argument: str
) -> None:
    pytest.importorskip(zoo)
    with pytest.raises(TypeError, match=f"{spec} takes no keyword argument '{argument}'") as caught:
        load_model(spec, argument="--model", **kwargs)
    _one_line(caught)


@pytest.mark.parametrize(
    ("zoo", "spec", "kwargs"),
    [
        ("timm", "timm:resnet18", {"pretrained": True}),
        ("torchvision", "torchvision:resnet18", {"weights": "DEFAULT"}),
        ("torchvision", "torchvision:resnet18", {"weights_backbone": "DEFAULT"}),
    ],
)
def test_asking_for_trained_weights_is_refused_before_any_download(
    zoo: str, spec: str, kwargs: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    library = pytest.importorskip(zoo)
    builder = "create_model" if zoo == "timm" else "models.get_model"
    owner = library if zoo == "timm" else library.models

    def must_not_be_called(*args: object, **kw: object) -> None:
        raise AssertionError("the zoo was asked to build the model")

    monkeypatch.setattr(owner, builder.rpartition(".")[2], must_not_be_called)
    with pytest.raises(ValueError, match="no weights are reachable offline") as caught:
        load_model(spec, **kwargs)
    _one_line(caught)


@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_a_missing_zoo_names_the_extra_to_install(
    zoo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, zoo, None)  # as if not installed
    with pytest.raises(
        ImportError, match=rf"needs {zoo}, .*pip install 'varshift\[zoo\]'"
    ) as caught:
        load_model(f"{zoo}:resnet18", argument="--model")
    _one_line(caught)


@pytest.mark.parametrize("spec", ["timm:", "torchvision: "])
def test_a_zoo_spec_without_a_name_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="NAME needs a model name"):
        load_model(spec, argument="--model")


def test_a_plain_factory_takes_keyword_arguments_and_names_a_wrong_one() -> None:
    model = load_model("torch.nn:BatchNorm1d", num_features=5, momentum=None)
    assert isinstance(model, nn.BatchNorm1d)
    assert model.num_features == 5
    assert model.momentum is None
    with pytest.raises(TypeError, match="takes no keyword argument 'num_feature'") as caught:
        load_model("torch.nn:BatchNorm1d", argument="--model", num_feature=5)
    assert _one_line(caught).startswith("--model torch.nn:BatchNorm1d")


# --- safetensors ---------------------------------------------------------------------------------


def _trained() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    with torch.no_grad():
        model[1].running_var.fill_(3.0)  # type: ignore[operator]
    return model


@pytest.mark.parametrize("suffix", [SAFETENSORS_SUFFIX, ".pt"])
def test_saved_state_dicts_load_back_equal(tmp_path: Path, suffix: str) -> None:
    if suffix == SAFETENSORS_SUFFIX:
        pytest.importorskip("safetensors")
    trained = _trained()
    path = save_state_dict(trained.state_dict(), tmp_path / "sub" / f"net{suffix}")
    fresh = _trained()
    with torch.no_grad():
        fresh[1].running_var.fill_(1.0)  # type: ignore[operator]
    load_checkpoint(fresh, path)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
        assert fresh.state_dict()[key].dtype == value.dtype, key


def test_safetensors_are_written_as_safetensors(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = _trained().state_dict()
    path = save_state_dict(state, tmp_path / "net.safetensors")
    assert set(safetensors_torch.load_file(str(path))) == set(state)


def test_tied_weights_save_as_safetensors(tmp_path: Path) -> None:
    # safetensors refuses tensors that share memory; a tied model's state_dict has them.
    pytest.importorskip("safetensors")
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    path = save_state_dict(tied.state_dict(), tmp_path / "tied.safetensors")
    state = read_state_dict(path)
    assert torch.equal(state["0.weight"], state["1.weight"])


def test_a_corrupt_safetensors_file_is_refused_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*expected a safetensors file"):
        read_state_dict(path)
    model = _trained()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        load_checkpoint(model, path)
    _one_line(caught)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_non_finite_safetensors_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    state = _trained().state_dict()
    state["1.running_var"][0] = float("nan")
    path = save_state_dict(state, tmp_path / "diverged.safetensors")
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1\.running_var"):
        load_checkpoint(_trained(), path)


def test_without_safetensors_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"varshift\[zoo\]"):
        read_state_dict(path)
    with pytest.raises(ImportError, match=r"varshift\[zoo\]"):
        save_state_dict(_trained().state_dict(), path)
