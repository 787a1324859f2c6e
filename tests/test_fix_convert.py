"""convert_dropout: a converted deep copy; only the layers lint flags with where='before_bn'."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from helpers.models_zoo import FunctionalDropoutNet
from helpers.torchscript import TO_TORCHSCRIPT, TO_TORCHSCRIPT_IDS, TorchScriptConversion
from varshift.fix import convert_dropout
from varshift.fix.convert import DEFAULT_BETA
from varshift.layers import ClassicDropout, GaussianDropout, Uout, VarianceStableDropout


def _net() -> nn.Sequential:
    """Dropout before a BN (index 1, flagged) and dropout in the classifier (index 5, not)."""
    noisy_input = [nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 8), nn.BatchNorm1d(8)]
    return nn.Sequential(*noisy_input, nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def _types(model: nn.Module) -> dict[str, type[nn.Module]]:
    return {name: type(m) for name, m in model.named_modules()}


def test_returns_a_converted_copy_and_leaves_the_original_alone() -> None:
    model = _net()
    state = copy.deepcopy(model.state_dict())
    types = _types(model)
    converted = convert_dropout(model, "gaussian")
    assert converted is not model
    assert _types(model) == types
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert converted[2].weight is not model[2].weight
    assert torch.equal(converted[2].weight, model[2].weight)


def test_before_bn_converts_only_the_flagged_layers() -> None:
    converted = convert_dropout(_net(), "uout", where="before_bn")
    changed = {name for name, cls in _types(converted).items() if _types(_net())[name] is not cls}
    assert changed == {"1"}
    assert isinstance(converted[1], Uout)
    assert isinstance(converted[5], nn.Dropout)
    everything = convert_dropout(_net(), "uout", where="all")
    assert isinstance(everything[1], Uout)
    assert isinstance(everything[5], Uout)


@pytest.mark.parametrize(
    ("to", "cls", "strength"),
    [
        ("gaussian", GaussianDropout, ("p", 0.3)),
        ("variance_stable", VarianceStableDropout, ("p", 0.3)),
        ("uout", Uout, ("beta", DEFAULT_BETA)),
        ("identity", nn.Identity, None),
    ],
)
def test_each_target_keeps_the_noise_strength_and_the_eval_function(
    to: str, cls: type[nn.Module], strength: tuple[str, float] | None
) -> None:
    model = _net()
    converted = convert_dropout(model, to)  # type: ignore[arg-type]
    assert type(converted[1]) is cls
    if strength is not None:
        assert getattr(converted[1], strength[0]) == pytest.approx(strength[1])
    x = torch.randn(16, 6)
    model.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


def test_flags_follow_the_replaced_layer_and_beta_is_honoured() -> None:
    model = _net()
    model[1].eval()
    converted = convert_dropout(model, "uout", beta=0.25)
    assert converted[1].beta == 0.25
    assert not converted[1].training
    assert converted[3].training


def test_uout_converted_to_gaussian_keeps_its_noise_variance() -> None:
    beta = 0.6
    model = nn.Sequential(nn.Linear(4, 4), Uout(beta), nn.Linear(4, 4), nn.BatchNorm1d(4))
    converted = convert_dropout(model, "gaussian")
    sigma2 = beta**2 / 3
    p = converted[1].p
    assert p / (1 - p) == pytest.approx(sigma2)


def test_a_shared_dropout_stays_shared() -> None:
    drop = nn.Dropout(0.2)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 4), drop, nn.BatchNorm1d(4))
            self.b = nn.Sequential(drop, nn.Linear(4, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.a(x))

    converted = convert_dropout(Shared(), "gaussian", where="all")
    assert isinstance(converted.a[1], GaussianDropout)
    assert converted.a[1] is converted.b[0]


def test_functional_dropout_cannot_be_converted_and_is_named_in_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"functional noise calls cannot be converted.*dropout"):
        converted = convert_dropout(FunctionalDropoutNet(), "identity")
    assert _types(converted) == _types(FunctionalDropoutNet())


def test_other_stochastic_modules_are_left_alone_with_a_warning() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4),
        ClassicDropout(0.3),
        nn.AlphaDropout(0.2),
        nn.Dropout(0.1),
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
    )
    with pytest.warns(UserWarning, match=r"left unchanged.*1 \(ClassicDropout\).*AlphaDropout"):
        converted = convert_dropout(model, "identity", where="all")
    assert isinstance(converted[1], ClassicDropout)
    assert isinstance(converted[2], nn.AlphaDropout)
    assert isinstance(converted[3], nn.Identity)


def test_a_model_without_flagged_layers_is_copied_unchanged() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_dropout(model, "uout")
    assert _types(converted) == _types(model)
    assert converted is not model


@pytest.mark.parametrize(
    ("to", "kwargs", "message"),
    [
        (
            "bernoulli",
            {},
            r"to must be one of \['uout', 'gaussian', 'variance_stable', "
            r"'identity'\], got 'bernoulli'",
        ),
        ("uout", {"where": "after_bn"}, r"where must be one of \['before_bn', 'all'\], got"),
        ("uout", {"beta": 1.5}, r"beta must be a number in \[0, 1\], got 1.5"),
        ("gaussian", {"beta": 0.1}, "beta applies only to to='uout'"),
    ],
)
def test_invalid_arguments_are_refused(to: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_dropout(_net(), to, **kwargs)  # type: ignore[arg-type]


def test_dropout_with_p_one_has_no_noise_variance_to_carry_over() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(1.0), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"cannot convert 1 \(Dropout\).*p=1.0"):
        convert_dropout(model, "gaussian")
    assert isinstance(convert_dropout(model, "identity")[1], nn.Identity)


# --- what the model is ------------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "net.pt", [nn.Dropout(0.5)]])
def test_a_non_module_is_a_type_error(model: object) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got"):
        convert_dropout(model, "uout")  # type: ignore[type-var]


@pytest.mark.parametrize("to_torchscript", TO_TORCHSCRIPT, ids=TO_TORCHSCRIPT_IDS)
@pytest.mark.parametrize("where", ["before_bn", "all"])
def test_a_torchscript_model_is_refused_with_the_fix(
    to_torchscript: TorchScriptConversion, where: str
) -> None:
    with pytest.raises(TypeError, match=r"TorchScript .* pass the original \(un-scripted\) module"):
        convert_dropout(to_torchscript(_net(), torch.randn(4, 6)), "uout", where=where)  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["before_bn", "all"])
def test_a_compiled_model_gives_a_converted_copy_of_the_module_it_wraps(where: str) -> None:
    model = _net()
    compiled = torch.compile(model, backend="eager")
    converted = convert_dropout(compiled, "identity", where=where)  # type: ignore[arg-type]
    expected = convert_dropout(model, "identity", where=where)  # type: ignore[arg-type]
    assert type(converted) is nn.Sequential  # the plain module, not compiled
    assert _types(converted) == _types(expected)
    assert isinstance(compiled._orig_mod[1], nn.Dropout)  # the original is left alone
    assert converted[0].weight is not model[0].weight
