"""Tests for the parts that varshift.diagnose.lint is built from: roles, weight geometry, the
noise-path search, the predicted shift along a path, and the scoped rebinding of stochastic
functions in the user's modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import varshift.layers.functional as VF
from varshift.diagnose.channel_stats import ChannelStats, channel_stats
from varshift.diagnose.geometry import module_weight_geometry, weight_geometry
from varshift.diagnose.graph import DataflowGraph, GraphNode, noise_paths
from varshift.diagnose.namespaces import replaced_stochastic_functions
from varshift.diagnose.prediction import predict_path_shift
from varshift.diagnose.roles import Role, classify_function, classify_module
from varshift.layers import NoiseSpec

# -- roles -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "role"),
    [
        (nn.Dropout(0.1), Role.STOCHASTIC),
        (nn.BatchNorm2d(4), Role.TARGET),
        (nn.InstanceNorm2d(4, track_running_stats=True), Role.TARGET),
        (nn.BatchNorm2d(4, track_running_stats=False), Role.BARRIER),
        (nn.InstanceNorm2d(4), Role.BARRIER),
        (nn.LayerNorm(4), Role.BARRIER),
        (nn.GroupNorm(2, 4), Role.BARRIER),
        (nn.Conv2d(4, 4, 3), Role.OTHER),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
def test_module_roles(module: nn.Module, role: Role) -> None:
    assert classify_module(module) is role


def test_function_roles_read_the_call() -> None:
    x, stats = torch.randn(4, 3), torch.zeros(3)
    assert classify_function(F.dropout, (x, 0.5), {}) is Role.STOCHASTIC
    assert classify_function("bernoulli_", (x,), {}) is Role.STOCHASTIC  # an fx call_method
    assert classify_function(F.batch_norm, (x, stats, stats + 1), {}) is Role.TARGET
    assert classify_function(F.batch_norm, (x, None, None), {"training": True}) is Role.BARRIER
    assert classify_function(F.layer_norm, (x, (3,)), {}) is Role.BARRIER
    assert classify_function(torch.cat, ([x, x],), {}) is Role.OTHER


# -- weight geometry -------------------------------------------------------------------------


def test_equal_weights_are_parallel_to_the_ones_vector() -> None:
    assert weight_geometry(torch.full((3, 2, 5), 0.7)) == (10, pytest.approx(1.0))
    assert weight_geometry(torch.zeros(3, 10)) == (10, None)  # no angle to a zero vector


def test_zero_mean_random_weights_average_cos2_one_over_d() -> None:
    # The default that prediction assumes when no angle can be read: E[cos²θ] ≈ 1/d.
    # Per unit cos²θ ≈ χ²₁/d (sd √2/d); the mean of 4000 units has sd ≈ 0.022/d: 5 sd ≈ 11%.
    d = 50
    _, cos2 = weight_geometry(torch.randn(4000, d))
    assert cos2 == pytest.approx(1 / d, rel=0.12)


def test_transposed_conv_has_a_fan_in_but_no_single_angle() -> None:
    up = nn.ConvTranspose2d(8, 4, kernel_size=4, stride=2)
    assert module_weight_geometry(up) == (8 * 16 // 4, None)
    assert module_weight_geometry(nn.ReLU()) == (None, None)


# -- paths -------------------------------------------------------------------------------------


def _node(name: str, role: Role, inputs: list[int], **extra: Any) -> GraphNode:
    return GraphNode(name, role, inputs, "module", name, **extra)


def test_a_barrier_stops_the_noise_and_a_target_stops_the_search() -> None:
    graph = DataflowGraph()
    x = graph.add_input("x")
    drop = graph.add(_node("drop", Role.STOCHASTIC, [x]))
    ln = graph.add(_node("ln", Role.BARRIER, [drop]))
    bn_after_ln = graph.add(_node("bn0", Role.TARGET, [ln]))
    bn1 = graph.add(_node("bn1", Role.TARGET, [drop]))
    graph.add(_node("bn2", Role.TARGET, [bn1]))
    paths, barriers = noise_paths(graph)
    assert [(p.source, p.sink, p.nodes) for p in paths] == [(drop, bn1, (drop, bn1))]
    assert barriers == {ln: {drop}}
    assert bn_after_ln not in {p.sink for p in paths}


# -- prediction --------------------------------------------------------------------------------


def _dropout_linear_bn(fan_in: int, cos2: float | None) -> tuple[DataflowGraph, int]:
    graph = DataflowGraph()
    x = graph.add_input("x")
    drop = graph.add(
        _node("drop", Role.STOCHASTIC, [x], spec=NoiseSpec("bernoulli", {"p": 0.5}))
    )
    fc = graph.add(_node("fc", Role.OTHER, [drop], fan_in=fan_in, cos2=cos2))
    graph.add(_node("bn", Role.TARGET, [fc]))
    return graph, drop


def _stats(rho: float | None) -> ChannelStats:
    return ChannelStats(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                        100, rho)


def test_prediction_without_data_is_the_worst_case() -> None:
    graph, _ = _dropout_linear_bn(fan_in=16, cos2=0.5)
    (path,), _ = noise_paths(graph)
    blind = predict_path_shift(graph, path, None)
    assert (blind.width, blind.cos2, blind.rho) == (16, 0.5, 0.0)
    assert blind.shift == pytest.approx(0.5, abs=1e-12)  # 1 − p: the width term vanishes


def test_unknown_angle_defaults_to_one_over_d_and_rho_is_clipped_to_its_range() -> None:
    graph, _ = _dropout_linear_bn(fan_in=4, cos2=None)
    (path,), _ = noise_paths(graph)
    prediction = predict_path_shift(graph, path, _stats(rho=-0.9))
    assert prediction.cos2 == pytest.approx(1 / 4)
    # Four equicorrelated inputs cannot have ρ < −1/3: their sum would have negative variance.
    assert prediction.rho == pytest.approx(-1 / 3)
    assert prediction.shift is not None
    assert 0 < prediction.shift <= 1


def test_a_single_input_unit_has_cos2_one_and_no_correlation() -> None:
    graph, _ = _dropout_linear_bn(fan_in=1, cos2=0.3)
    (path,), _ = noise_paths(graph)
    prediction = predict_path_shift(graph, path, _stats(rho=0.8))
    assert (prediction.cos2, prediction.rho) == (1.0, 0.0)


def test_channel_stats_measure_the_correlation_between_channels() -> None:
    shared = torch.randn(20000, 1)
    stats = channel_stats(shared + torch.randn(20000, 3))  # every pair: ρ = 1/2
    assert stats.samples == 20000
    assert stats.rho == pytest.approx(0.5, abs=0.03)  # sd of a pair's estimate ≈ 0.005
    assert stats.var.tolist() == pytest.approx([2.0, 2.0, 2.0], rel=0.05)


# -- rebinding the user's stochastic functions -------------------------------------------------


class _UsesVF(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return VF.gaussian_dropout(x, 0.2, self.training)


def _replace_then_fail(model: nn.Module, replacement: Callable[..., Any]) -> None:
    with replaced_stochastic_functions(model, replacement):
        assert model(torch.ones(2)) == "replaced"
        raise RuntimeError("inside")


def test_replaced_functions_are_restored_when_the_block_raises() -> None:
    original = VF.gaussian_dropout
    seen: list[str] = []

    def replacement(fn: Callable[..., Any]) -> Callable[..., Any]:
        seen.append(fn.__name__)
        return lambda *args, **kwargs: "replaced"

    with pytest.raises(RuntimeError, match="inside"):
        _replace_then_fail(_UsesVF(), replacement)
    assert VF.gaussian_dropout is original
    assert "gaussian_dropout" in seen
