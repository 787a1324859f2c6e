"""The registry of stochastic modules, functions and tensor methods, and NoiseSpec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varshift.layers import noise
from varshift.layers.registry import (
    NoiseSpec,
    bernoulli_spec,
    function_noise_spec,
    is_stochastic,
    is_stochastic_function,
    is_stochastic_method,
    noise_spec,
    register_stochastic,
    register_stochastic_function,
    register_stochastic_method,
    spec_from_call,
    stochastic_functions,
    stochastic_methods,
    stochastic_modules,
)
from varshift.theory import noise_variance

# NoiseSpec


def test_noise_spec_is_immutable_hashable_and_compares_by_value() -> None:
    params = {"p": 0.3}
    spec = NoiseSpec("bernoulli", params)
    params["p"] = 0.9  # the spec keeps its own copy
    assert spec.params == {"p": 0.3}
    assert spec == NoiseSpec("bernoulli", {"p": 0.3})
    assert spec != NoiseSpec("gaussian", {"p": 0.3})
    assert len({spec, NoiseSpec("bernoulli", {"p": 0.3})}) == 1
    with pytest.raises(TypeError):
        spec.params["p"] = 0.5  # type: ignore[index]
    with pytest.raises(AttributeError):
        spec.kind = "gaussian"  # type: ignore[misc]
    assert repr(spec) == "NoiseSpec(kind='bernoulli', params={'p': 0.3})"


@pytest.mark.parametrize(
    ("kind", "params"), [("bernoulli", {"p": 0.3}), ("gaussian", {"p": 0.6}), ("uout", {"beta": 1})]
)
def test_noise_spec_variance_is_theorys(kind: str, params: dict[str, float]) -> None:
    spec = NoiseSpec(kind, params)
    assert spec.variance() == noise_variance(kind, **params)
    assert isinstance(spec.params[next(iter(params))], float)


@pytest.mark.parametrize(
    ("kind", "params", "error", "message"),
    [
        ("", {"p": 0.3}, ValueError, "kind must be a non-empty"),
        ("dropout", {"p": 0.3}, ValueError, "unknown noise kind 'dropout'"),
        ("bernoulli", {"p": 1.0}, ValueError, r"p must be finite and in \[0, 1\)"),
        ("bernoulli", {"beta": 0.1}, ValueError, "missing p"),
        ("uout", {"beta": 1.5}, ValueError, "beta"),
        ("bernoulli", {"p": True}, TypeError, r"params\['p'\] must be a real number, got True"),
        ("bernoulli", {"p": "0.3"}, TypeError, r"params\['p'\] must be a real number"),
        ("bernoulli", [("p", 0.3)], TypeError, "params must be a mapping"),
    ],
)
def test_noise_spec_is_validated_through_theory(
    kind: str, params: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        NoiseSpec(kind, params)


def test_bernoulli_spec_has_no_spec_for_p_one() -> None:
    assert bernoulli_spec(0.2) == NoiseSpec("bernoulli", {"p": 0.2})
    assert bernoulli_spec(1.0) is None


# Modules


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Dropout(0.3), NoiseSpec("bernoulli", {"p": 0.3})),
        (nn.Dropout1d(0.2), NoiseSpec("bernoulli", {"p": 0.2})),
        (nn.Dropout2d(0.1), NoiseSpec("bernoulli", {"p": 0.1})),
        (nn.Dropout3d(0.4), NoiseSpec("bernoulli", {"p": 0.4})),
        (nn.Dropout(1.0), None),
        (nn.AlphaDropout(0.2), None),
        (nn.FeatureAlphaDropout(0.2), None),
        (noise.GaussianDropout(0.3), NoiseSpec("gaussian", {"p": 0.3})),
        (noise.Uout(0.2), NoiseSpec("uout", {"beta": 0.2})),
        (noise.ClassicDropout(0.4), NoiseSpec("bernoulli", {"p": 0.4})),
        (noise.ClassicDropout(1.0), None),
        (noise.VarianceStableDropout(0.4), None),
    ],
    ids=repr,
)
def test_stochastic_modules_and_their_noise(module: nn.Module, expected: NoiseSpec | None) -> None:
    assert is_stochastic(module)
    assert noise_spec(module) == expected
    assert not is_stochastic(nn.Linear(2, 2))  # the registry is no catch-all
    assert noise_spec(nn.BatchNorm1d(2)) is None


def test_spec_follows_the_modules_current_settings_not_its_mode() -> None:
    layer = nn.Dropout(0.3).eval()
    assert noise_spec(layer) == NoiseSpec("bernoulli", {"p": 0.3})
    layer.p = 0.6
    assert noise_spec(layer) == NoiseSpec("bernoulli", {"p": 0.6})


@pytest.mark.usefixtures("noise_registry")
def test_subclasses_count_and_the_most_specific_registration_wins() -> None:
    class MyDropout(nn.Dropout):
        pass

    assert is_stochastic(MyDropout(0.25))
    assert noise_spec(MyDropout(0.25)) == NoiseSpec("bernoulli", {"p": 0.25})

    @register_stochastic
    class Unmodelled(nn.Dropout):
        pass

    assert is_stochastic(Unmodelled(0.2))
    assert noise_spec(Unmodelled(0.2)) is None
    assert Unmodelled in stochastic_modules()


@pytest.mark.usefixtures("noise_registry")
def test_register_a_custom_module_with_a_spec_function() -> None:
    class Noisy(nn.Module):
        def __init__(self, beta: float) -> None:
            super().__init__()
            self.beta = beta

    assert not is_stochastic(Noisy(0.1))
    returned = register_stochastic(Noisy, lambda m: NoiseSpec("uout", {"beta": m.beta}))
    assert returned is Noisy
    assert noise_spec(Noisy(0.1)) == NoiseSpec("uout", {"beta": 0.1})
    register_stochastic(Noisy)  # registering again replaces the spec function
    assert noise_spec(Noisy(0.1)) is None
    assert stochastic_modules()[-1] is Noisy


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: register_stochastic(nn.Linear(2, 2)), "cls must be a subclass of torch.nn.Module"),
        (lambda: register_stochastic(int), "cls must be a subclass of torch.nn.Module"),
        (lambda: register_stochastic(nn.Dropout, 0.5), "spec_fn must be callable or None"),
        (lambda: register_stochastic_function(0.5), "fn must be callable"),
        (lambda: register_stochastic_function(F.dropout, "p"), "spec_fn must be callable or None"),
    ],
)
def test_registration_refuses_wrong_types(call: Callable[[], object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


# Functions


BUILTIN_DROPOUT_FUNCTIONS = [
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.dropout,
    torch.dropout_,
    torch.feature_dropout,
    torch.feature_dropout_,
    torch.native_dropout,
]


@pytest.mark.parametrize("fn", BUILTIN_DROPOUT_FUNCTIONS, ids=lambda fn: fn.__name__)
def test_torch_dropout_functions_read_p_by_position_or_keyword(fn: Callable[..., Any]) -> None:
    x = torch.ones(2, 3)
    training = "train" if fn.__module__ in {None, "torch"} or fn in _ATEN_FORMS else "training"
    expected = NoiseSpec("bernoulli", {"p": 0.3})
    assert is_stochastic_function(fn)
    assert function_noise_spec(fn, (x, 0.3, True)) == expected
    assert function_noise_spec(fn, (x,), {"p": 0.3, training: True}) == expected
    assert function_noise_spec(fn, (x, 0.3), {training: False}) == NoiseSpec("bernoulli", {"p": 0})


_ATEN_FORMS = {
    torch.dropout,
    torch.dropout_,
    torch.feature_dropout,
    torch.feature_dropout_,
    torch.native_dropout,
}


def test_functional_dropout_defaults_apply() -> None:
    x = torch.ones(2)
    assert function_noise_spec(F.dropout, (x,)) == NoiseSpec("bernoulli", {"p": 0.5})
    assert function_noise_spec(torch.dropout, (x,)) is None  # no default p: unknown
    # native_dropout's train may be None, meaning "on".
    assert function_noise_spec(torch.native_dropout, (x, 0.2, None)) == NoiseSpec(
        "bernoulli", {"p": 0.2}
    )


def test_strength_that_is_not_a_number_or_out_of_range_gives_no_spec() -> None:
    graph = torch.fx.Graph()
    node = graph.placeholder("p")
    x = torch.ones(2)
    assert function_noise_spec(F.dropout, (x, node, True)) is None
    assert function_noise_spec(F.dropout, (x, True, True)) is None  # a bool is not a rate
    assert function_noise_spec(F.dropout, (x, 1.0, True)) is None  # p = 1: no finite variance


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "expected"),
    [
        (noise.gaussian_dropout, (0.3,), {}, NoiseSpec("gaussian", {"p": 0.3})),
        (
            noise.gaussian_dropout,
            (),
            {"p": 0.3, "training": True},
            NoiseSpec("gaussian", {"p": 0.3}),
        ),
        (noise.gaussian_dropout, (), {}, NoiseSpec("gaussian", {"p": 0.5})),
        (noise.uout, (), {}, NoiseSpec("uout", {"beta": 0.1})),
        (noise.uout, (0.4, False), {}, NoiseSpec("uout", {"beta": 0.0})),
        (noise.classic_dropout, (), {"p": 0.2}, NoiseSpec("bernoulli", {"p": 0.2})),
        (noise.variance_stable_dropout, (0.2,), {}, None),
    ],
)
def test_varshift_functions_are_registered(
    fn: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any], expected: Any
) -> None:
    assert is_stochastic_function(fn)
    assert function_noise_spec(fn, (torch.ones(2), *args), kwargs) == expected


@pytest.mark.parametrize(
    "fn",
    [
        F.alpha_dropout,
        F.feature_alpha_dropout,
        torch.alpha_dropout,
        torch.feature_alpha_dropout_,
        torch.bernoulli,
        torch.rand_like,
        torch.randn_like,
        torch.normal,
    ],
    ids=lambda fn: fn.__name__,
)
def test_unmodelled_stochastic_functions_have_no_spec(fn: Callable[..., Any]) -> None:
    assert is_stochastic_function(fn)
    assert function_noise_spec(fn, (torch.ones(2), 0.5, True)) is None


def test_deterministic_and_unhashable_targets_are_not_stochastic() -> None:
    assert not is_stochastic_function(torch.relu)
    assert not is_stochastic_function(F.batch_norm)
    assert not is_stochastic_function([F.dropout])  # unhashable: cannot be registered
    assert function_noise_spec(torch.relu, (torch.ones(2),)) is None


@pytest.mark.usefixtures("noise_registry")
def test_register_a_custom_function_with_spec_from_call() -> None:
    def my_noise(x: Tensor, rate: float = 0.25, active: bool = True) -> Tensor:
        return x

    spec_fn = spec_from_call(
        "gaussian", strength="rate", param="p", default=0.25, training="active"
    )
    assert register_stochastic_function(my_noise, spec_fn) is my_noise
    assert stochastic_functions()[-1] is my_noise
    x = torch.ones(1)
    assert function_noise_spec(my_noise, (x,)) == NoiseSpec("gaussian", {"p": 0.25})
    assert function_noise_spec(my_noise, (x, 0.4)) == NoiseSpec("gaussian", {"p": 0.4})
    assert function_noise_spec(my_noise, (x,), {"rate": 0.4, "active": False}) == NoiseSpec(
        "gaussian", {"p": 0.0}
    )


def test_spec_from_call_checks_kind_and_parameter_name_at_once() -> None:
    with pytest.raises(ValueError, match="unexpected rate"):
        spec_from_call("gaussian", strength="rate")  # theory's gaussian takes p
    with pytest.raises(ValueError, match="unknown noise kind 'salt'"):
        spec_from_call("salt")


def test_listing_holds_every_builtin_and_varshift_function() -> None:
    listed = stochastic_functions()
    for fn in (*BUILTIN_DROPOUT_FUNCTIONS, noise.uout, noise.variance_stable_dropout):
        assert fn in listed
    assert nn.Dropout in stochastic_modules()
    assert noise.GaussianDropout in stochastic_modules()


# Tensor methods


@pytest.mark.usefixtures("noise_registry")
def test_random_tensor_methods() -> None:
    for name in ("bernoulli", "bernoulli_", "normal_", "uniform_", "exponential_", "random_"):
        assert is_stochastic_method(name)
    for name in ("mul", "add_", "dropout", None, ["bernoulli_"]):
        assert not is_stochastic_method(name)
    register_stochastic_method("my_random_fill_")
    assert "my_random_fill_" in stochastic_methods()
    with pytest.raises(ValueError, match="name must be a non-empty method name"):
        register_stochastic_method("")


# With torch.fx, as the lint reads models


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.gauss = noise.GaussianDropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(self.linear(x), p=0.3, training=self.training)
        x = torch.dropout(x, 0.4, self.training)
        x = self.gauss(self.drop(x))
        q = 0.5
        return x * x.bernoulli(q) / q  # a hand-written dropout


@pytest.mark.parametrize("train", [True, False])
def test_every_noise_in_a_traced_model_is_found(train: bool) -> None:
    model = _Net().train(train)
    graph = torch.fx.symbolic_trace(model).graph
    found: list[tuple[str, NoiseSpec | None]] = []
    for node in graph.nodes:
        if node.op == "call_module" and is_stochastic(model.get_submodule(node.target)):
            found.append((node.target, noise_spec(model.get_submodule(node.target))))
        elif node.op == "call_function" and is_stochastic_function(node.target):
            found.append(
                (node.target.__name__, function_noise_spec(node.target, node.args, node.kwargs))
            )
        elif node.op == "call_method" and is_stochastic_method(node.target):
            found.append((node.target, None))
    # Calls recorded with training=False (traced in eval mode) apply no noise: strength 0.
    scale = 1.0 if train else 0.0
    assert found == [
        ("dropout", NoiseSpec("bernoulli", {"p": 0.3 * scale})),
        ("dropout", NoiseSpec("bernoulli", {"p": 0.4 * scale})),
        ("drop", NoiseSpec("bernoulli", {"p": 0.1})),
        ("gaussian_dropout", NoiseSpec("gaussian", {"p": 0.2 * scale})),
        ("bernoulli", None),
    ]
