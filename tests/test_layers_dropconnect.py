"""DropConnect functionals, DropConnectLinear/Conv2d and convert_to_dropconnect.

For a fixed input, DropConnect's output has mean ``layer(x)`` and variance
``p / (1 − p) · layer_without_bias(x², weight²)``; the statistical tests compare both with
tolerances of K standard errors computed from the sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varshift.layers.dropconnect import (
    DropConnectConv2d,
    DropConnectLinear,
    convert_to_dropconnect,
    drop_connect_conv2d,
    drop_connect_linear,
)
from varshift.layers.registry import (
    NoiseSpec,
    function_noise_spec,
    is_stochastic,
    is_stochastic_function,
    noise_spec,
)

K = 5.0  # standard errors allowed per output unit (a few dozen units are tested at once)


def _assert_moments(draws: Tensor, mean: Tensor, var: Tensor) -> None:
    """``draws``: ``Tensor[M, *]`` of independent outputs. Sample mean and variance of every unit
    must be within K standard errors of ``mean`` and ``var``."""
    m = draws.shape[0]
    centred = draws - draws.mean(0)
    sample_var = centred.pow(2).mean(0)
    se_mean = (sample_var / m).sqrt()
    # Standard error of a sample variance: sqrt((μ4 − σ⁴) / M), from the sample's moments.
    se_var = ((centred.pow(4).mean(0) - sample_var.pow(2)).clamp_min(0) / m).sqrt()
    z_mean = ((draws.mean(0) - mean).abs() / se_mean).max().item()
    z_var = ((sample_var - var).abs() / se_var).max().item()
    assert z_mean < K, f"mean off by {z_mean:.1f} SE"
    assert z_var < K, f"variance off by {z_var:.1f} SE"


def _linear_setup() -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(1, 6, dtype=torch.float64) + 0.5
    return x, torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)


def _conv_geometry() -> dict[str, Any]:
    return {"stride": (2, 1), "padding": 1, "dilation": (1, 2), "groups": 2}


def test_linear_per_sample_mean_and_variance_match_theory() -> None:
    p, samples = 0.4, 8000
    x, weight, bias = _linear_setup()
    draws = drop_connect_linear(x.expand(samples, -1), weight, bias, p, per_sample=True)
    expected_var = p / (1 - p) * F.linear(x**2, weight**2)[0]
    _assert_moments(draws, F.linear(x, weight, bias)[0], expected_var)


def test_linear_shared_mask_mean_and_variance_match_theory() -> None:
    p, samples = 0.3, 3000
    x, weight, bias = _linear_setup()
    draws = torch.cat([drop_connect_linear(x, weight, bias, p) for _ in range(samples)])
    expected_var = p / (1 - p) * F.linear(x**2, weight**2)[0]
    _assert_moments(draws, F.linear(x, weight, bias)[0], expected_var)


@pytest.mark.parametrize("per_sample", [True, False])
def test_conv_mean_and_variance_match_theory(per_sample: bool) -> None:
    p, samples = 0.25, 3000
    geometry = _conv_geometry()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    if per_sample:
        draws = drop_connect_conv2d(
            x.expand(samples, -1, -1, -1), weight, bias, p, per_sample=True, **geometry
        )
    else:
        draws = torch.cat(
            [drop_connect_conv2d(x, weight, bias, p, **geometry) for _ in range(samples)]
        )
    expected_var = p / (1 - p) * F.conv2d(x**2, weight**2, None, **geometry)[0]
    _assert_moments(draws, F.conv2d(x, weight, bias, **geometry)[0], expected_var)


def test_shared_mask_is_shared_across_the_batch_and_per_sample_is_not() -> None:
    x = torch.randn(1, 8).expand(4, -1)
    layer = DropConnectLinear(8, 5, p=0.5)
    shared = layer(x)
    assert all(torch.equal(shared[0], row) for row in shared[1:])
    layer.per_sample = True
    own = layer(x)
    assert not all(torch.equal(own[0], row) for row in own[1:])


def test_per_sample_linear_keeps_extra_dimensions() -> None:
    layer = DropConnectLinear(3, 2, p=0.5, per_sample=True)
    x = torch.randn(4, 5, 3)
    assert layer(x).shape == (4, 5, 2)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_linear_eval_equals_the_original_layer_exactly() -> None:
    original = nn.Linear(7, 3)
    x = torch.randn(5, 7)
    converted = DropConnectLinear.from_module(original, 0.5).eval()
    assert torch.equal(converted(x), original(x))
    assert torch.equal(drop_connect_linear(x, original.weight, original.bias, 0.0), original(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 2, "padding": 2, "dilation": 2, "groups": 2},
        {"stride": (1, 2), "padding": (1, 0), "groups": 4, "bias": False},
        {"padding": "same", "dilation": 2},
        {"padding": 1, "padding_mode": "reflect", "groups": 2},
        {"padding": (2, 1), "padding_mode": "circular", "stride": 2},
        {"padding": 1, "padding_mode": "replicate"},
    ],
)
def test_conv_from_module_keeps_geometry_and_eval_is_exact(kwargs: dict[str, object]) -> None:
    original = nn.Conv2d(4, 8, 3, **kwargs)  # type: ignore[arg-type]
    converted = DropConnectConv2d.from_module(original, 0.3)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(converted, attr) == getattr(original, attr)
    assert (converted.bias is None) == (original.bias is None)
    x = torch.randn(2, 4, 9, 10)
    converted.eval()
    assert torch.equal(converted(x), original(x))
    # Training output has the original's shape too (padding mode and geometry applied).
    assert converted.train()(x).shape == original(x).shape


def test_from_module_copies_parameters_dtype_grad_flags_and_mode() -> None:
    original = nn.Linear(4, 3).double().eval()
    original.bias.requires_grad_(False)
    converted = DropConnectLinear.from_module(original, 0.2)
    assert converted.weight.dtype == torch.float64
    assert converted.weight.device == original.weight.device
    assert not converted.training
    assert converted.weight.requires_grad
    assert not converted.bias.requires_grad
    assert converted.weight is not original.weight
    assert torch.equal(converted.weight, original.weight)
    with torch.no_grad():
        converted.weight.add_(1.0)
    assert not torch.equal(converted.weight, original.weight)


@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck(per_sample: bool) -> None:
    def seeded(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Tensor) -> Tensor:
            return fn(*args, generator=torch.Generator().manual_seed(5), per_sample=per_sample)

        return run

    def conv(x: Tensor, w: Tensor, b: Tensor, **kw: object) -> Tensor:
        return drop_connect_conv2d(x, w, b, 0.3, True, 2, 1, 1, 2, **kw)  # type: ignore[arg-type]

    def linear(x: Tensor, w: Tensor, b: Tensor, **kw: object) -> Tensor:
        return drop_connect_linear(x, w, b, 0.3, **kw)  # type: ignore[arg-type]

    def make(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(seeded(linear), (make(3, 4), make(2, 4), make(2)))
    assert torch.autograd.gradcheck(seeded(conv), (make(2, 4, 5, 5), make(4, 2, 3, 3), make(4)))


def test_gradient_flows_to_the_layer_parameters() -> None:
    layer = DropConnectConv2d(2, 3, 3, p=0.5)
    layer(torch.randn(2, 2, 5, 5)).sum().backward()
    assert layer.weight.grad is not None
    # Dropped weights receive no gradient: about p of them are exactly zero.
    assert (layer.weight.grad == 0).any()
    assert layer.bias is not None
    assert layer.bias.grad is not None


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 5 * 5, 6), nn.ReLU()),
        nn.Linear(6, 2),
    )


def test_convert_returns_a_converted_copy_and_leaves_the_original() -> None:
    model = _net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_dropconnect(model, 0.4)
    assert converted is not model
    assert [type(m) for m in model.modules()] == [type(m) for m in _net().modules()]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    kinds = [type(m).__name__ for m in converted.modules()]
    assert kinds.count("DropConnectConv2d") == 1
    assert kinds.count("DropConnectLinear") == 2
    assert all(m.p == 0.4 for m in converted.modules() if hasattr(m, "per_sample"))
    x = torch.randn(3, 2, 5, 5)
    assert torch.equal(converted(x), model(x))
    assert not set(map(id, converted.parameters())) & set(map(id, model.parameters()))


def test_convert_inplace_reuses_parameters_and_shared_layers() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Conv2d(1, 1, 1))
    params = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = convert_to_dropconnect(model, 0.5, types=(nn.Linear,), inplace=True)
    assert result is model
    assert isinstance(model[0], DropConnectLinear)
    assert model[0] is model[2]
    assert type(model[3]) is nn.Conv2d
    assert [id(p) for p in model.parameters()] == params
    before = model[0].weight.detach().clone()
    model[0](torch.randn(2, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_convert_a_bare_layer_and_skip_multihead_attention() -> None:
    assert isinstance(convert_to_dropconnect(nn.Linear(2, 2), 0.1), DropConnectLinear)
    attention = nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4))
    converted = convert_to_dropconnect(attention, 0.1)
    assert type(converted.get_submodule("0.out_proj")) is not DropConnectLinear
    assert isinstance(converted.get_submodule("1"), DropConnectLinear)


def test_validation() -> None:
    x, weight, bias = _linear_setup()
    for p in (-0.1, 1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"p must be finite and in \[0, 1\) .*, got"):
            drop_connect_linear(x, weight, bias, p, training=False)
        with pytest.raises(ValueError, match="p must be"):
            DropConnectConv2d(1, 1, 1, p=p)
    for wrong in (True, "0.5", torch.tensor(0.5)):
        with pytest.raises(TypeError, match=r"p must be a real number, got"):
            drop_connect_linear(x, weight, bias, wrong, training=False)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"p must be a real number, got"):
            DropConnectLinear(2, 2, p=wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"per_sample must be a bool, got 1"):
        DropConnectLinear(2, 2, per_sample=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be a floating-point tensor, got dtype torch.int64"):
        drop_connect_linear(x.long(), weight, bias, 0.5)
    with pytest.raises(ValueError, match=r"got 1.0"):
        DropConnectLinear(2, 2, p=1.0)
    with pytest.raises(ValueError, match=r"per_sample=True needs .* got shape \(6,\)"):
        drop_connect_linear(x[0], weight, bias, 0.5, per_sample=True)
    with pytest.raises(ValueError, match=r"got shape \(2, 5, 5\)"):
        drop_connect_conv2d(
            torch.randn(2, 5, 5), torch.randn(1, 2, 1, 1), None, 0.5, per_sample=True
        )
    with pytest.raises(TypeError, match=r"nn\.Linear, got Conv2d"):
        DropConnectLinear.from_module(nn.Conv2d(1, 1, 1), 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Conv2d, got Linear"):
        DropConnectConv2d.from_module(nn.Linear(1, 1), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lazy"):
        DropConnectLinear.from_module(nn.LazyLinear(3), 0.5)
    with pytest.raises(ValueError, match="types must hold"):
        convert_to_dropconnect(nn.Linear(1, 1), 0.5, types=(nn.Conv1d,))
    with pytest.raises(ValueError, match="p must be"):
        convert_to_dropconnect(nn.Linear(1, 1), 1.5)


def test_repr_shows_p() -> None:
    assert "p=0.25" in repr(DropConnectLinear(2, 3, p=0.25))
    assert "p=0.25" in repr(DropConnectConv2d(2, 3, 3, p=0.25, groups=1))


def test_fx_symbolic_trace() -> None:
    model = convert_to_dropconnect(_net(), 0.3).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(traced(x), model(x))
    assert "drop_connect_conv2d" in traced.code


def test_standard_error_helper_can_fail() -> None:
    # Guard against a vacuous _assert_moments: a 10 % error in the variance must be caught.
    p, samples = 0.4, 8000
    x, weight, bias = _linear_setup()
    draws = drop_connect_linear(x.expand(samples, -1), weight, bias, p, per_sample=True)
    wrong_var = 1.1 * p / (1 - p) * F.linear(x**2, weight**2)[0]
    with pytest.raises(AssertionError, match="variance off"):
        _assert_moments(draws, F.linear(x, weight, bias)[0], wrong_var)
    assert math.isfinite(draws.sum().item())


def test_registered_as_bernoulli_noise() -> None:
    for layer in (DropConnectLinear(2, 2, p=0.3), DropConnectConv2d(1, 1, 1, p=0.3)):
        assert is_stochastic(layer)
        assert noise_spec(layer) == NoiseSpec("bernoulli", {"p": 0.3})
    x, weight, bias = _linear_setup()
    for fn in (drop_connect_linear, drop_connect_conv2d):
        assert is_stochastic_function(fn)
    assert function_noise_spec(drop_connect_linear, (x, weight, bias, 0.2), {}) == NoiseSpec(
        "bernoulli", {"p": 0.2}
    )
    off = function_noise_spec(drop_connect_linear, (x, weight, bias), {"p": 0.2, "training": False})
    assert off == NoiseSpec("bernoulli", {"p": 0.0})
    traced = torch.fx.symbolic_trace(convert_to_dropconnect(_net(), 0.35))
    specs = [
        function_noise_spec(node.target, node.args, node.kwargs)
        for node in traced.graph.nodes
        if is_stochastic_function(node.target)
    ]
    assert specs == [NoiseSpec("bernoulli", {"p": 0.35})] * 3


def test_torch_compile_fullgraph_keeps_the_moments() -> None:
    # Compiled random numbers differ from eager ones: compare statistics, not values.
    p, samples = 0.4, 8000
    x, weight, bias = _linear_setup()
    layer = DropConnectLinear(6, 4, p=p, per_sample=True, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        draws = compiled(x.expand(samples, -1))
    expected_var = p / (1 - p) * F.linear(x**2, weight**2)[0]
    _assert_moments(draws, F.linear(x, weight, bias)[0], expected_var)


def test_convert_copy_keeps_weights_tied_between_layers() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    converted = convert_to_dropconnect(nn.Sequential(first, second), 0.5)
    a, b = converted.get_submodule("0"), converted.get_submodule("1")
    assert isinstance(a, DropConnectLinear)
    assert isinstance(b, DropConnectLinear)
    assert a.weight is b.weight
    assert a.weight is not first.weight
