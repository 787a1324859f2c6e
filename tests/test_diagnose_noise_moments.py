"""predict_shifts against brute force: the same example inputs through the model with many mask
draws, every BatchNorm in eval, per-channel Var(noise off)/Var(noise on) averaged over channels.
Exact predictions must land within 0.01 of that, estimates within 0.05 and a few standard errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from helpers.noise_nets import (
    Dense,
    Mlp,
    Residual,
    StochasticDepthRow,
    check,
    images,
    measured,
    stem,
)
from varshift.diagnose.noise_moments import NoiseSource, ShiftPrediction, predict_shifts


def case(
    model: nn.Module,
    bn: str,
    switches: Callable[[nn.Module], Sequence[nn.Module]],
    exact: bool,
    inputs: Tensor | None = None,
    **kwargs: object,
) -> ShiftPrediction:
    inputs = images() if inputs is None else inputs
    prediction = predict_shifts(
        model, inputs, generator=torch.Generator().manual_seed(0), **kwargs
    )[bn]  # type: ignore[arg-type]
    check(prediction, measured(model, inputs, bn, switches(model)), exact)
    return prediction


# -- the table of issue 13 ---------------------------------------------------------------------


def test_dropout_straight_into_batchnorm() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.BatchNorm2d(8))
    prediction = case(net, "2", lambda m: [m[1]], exact=True)
    assert prediction.sources == ("1",)
    assert prediction.ratio < 1 / (1 + 0.3 / 0.7) - 0.02  # the mean adds s²·c² to Var_train


def test_dropout_conv_batchnorm() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    case(net, "3", lambda m: [m[1]], exact=True)


def test_dropout_avgpool_batchnorm() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.AvgPool2d(2), nn.BatchNorm2d(8))
    case(net, "3", lambda m: [m[1]], exact=True)


def test_dropout_maxpool_conv_batchnorm_is_estimated() -> None:
    net = nn.Sequential(
        stem(), nn.Dropout(0.3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    prediction = case(net, "4", lambda m: [m[1]], exact=False)
    assert "MaxPool2d" in prediction.note


def test_dropout2d_conv_batchnorm() -> None:
    net = nn.Sequential(stem(), nn.Dropout2d(0.3), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    case(net, "3", lambda m: [m[1]], exact=True)


def test_stochastic_depth_row_residual() -> None:
    net = Residual(StochasticDepthRow(0.3))
    source = NoiseSource.dropout("drop", 0.3, "sample")
    prediction = case(net, "bn", lambda m: [m.drop], exact=True, sources=[source])
    assert prediction.sources == ("drop",)


def test_dropped_residual_branch() -> None:
    case(Residual(nn.Dropout(0.3)), "bn", lambda m: [m.drop], exact=True)


def test_reconvergent_routes_are_still_exact() -> None:
    case(Residual(nn.Dropout(0.3), reconverge=True), "bn", lambda m: [m.drop], exact=True)
    case(Residual(nn.Dropout2d(0.3), reconverge=True), "bn", lambda m: [m.drop], exact=True)


def test_two_convs_exact_by_groups_estimated_without_budget() -> None:
    net = nn.Sequential(
        stem(),
        nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    case(net, "4", lambda m: [m[1]], exact=True)
    prediction = case(net, "4", lambda m: [m[1]], exact=False, max_groups=0)
    assert "second summing layer" in prediction.note


def test_conv1d_and_avgpool1d_with_partial_windows() -> None:
    x = torch.randn(64, 1, 11, generator=torch.Generator().manual_seed(2))
    net = nn.Sequential(
        stem(4, dims=1), nn.Dropout(0.4), nn.Conv1d(4, 6, 3, stride=2), nn.BatchNorm1d(6)
    )
    case(net, "3", lambda m: [m[1]], exact=True, inputs=x)
    pool = nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    net = nn.Sequential(stem(4, dims=1), nn.Dropout(0.4), pool, nn.BatchNorm1d(4))
    case(net, "3", lambda m: [m[1]], exact=True, inputs=x)


def test_densenet_concat() -> None:
    prediction = case(Dense(), "bn", lambda m: [m.drop], exact=True)
    assert prediction.ratio > 0.5  # the 8 concatenated clean channels count as ratio 1


def test_linear_mlp_with_functional_dropout() -> None:
    prediction = case(Mlp(), "bn", lambda m: [m], exact=True)
    assert prediction.sources == ("dropout",)


class TwoSources(nn.Module):
    def __init__(self, chained: bool = False) -> None:
        super().__init__()
        self.stem = stem()
        self.drop_a, self.drop_b = nn.Dropout(0.2), nn.Dropout2d(0.4)
        self.conv_a, self.conv_b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.chained = chained
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if self.chained:  # drop_b lies on drop_a's path
            return self.bn(self.conv_b(self.drop_b(self.conv_a(self.drop_a(h)))))  # type: ignore[no-any-return]
        return self.bn(self.conv_a(self.drop_a(h)) + self.conv_b(self.drop_b(h)))  # type: ignore[no-any-return]


def test_two_independent_sources_add() -> None:
    prediction = case(TwoSources(), "bn", lambda m: [m.drop_a, m.drop_b], exact=True)
    assert set(prediction.sources) == {"drop_a", "drop_b"}


def test_source_on_another_sources_path_is_estimated() -> None:
    prediction = case(TwoSources(chained=True), "bn", lambda m: [m.drop_a, m.drop_b], exact=False)
    assert "another noise source" in prediction.note


def test_only_the_chosen_sources_are_on() -> None:
    net = TwoSources()
    prediction = case(
        net,
        "bn",
        lambda m: [m.drop_b],
        exact=True,
        sources=[NoiseSource.dropout("drop_b", 0.4, "channel")],
    )
    assert prediction.sources == ("drop_b",)


class Scaled(nn.Module):
    """A LayerScale-like parameter, a constant divisor and a trunk around a dropped branch; or,
    with ``square``, the dropped value times itself (not linear)."""

    def __init__(self, square: bool = False) -> None:
        super().__init__()
        self.stem, self.drop, self.bn = stem(), nn.Dropout(0.3), nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 8).view(1, 8, 1, 1))
        self.square = square

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        d = self.drop(h)
        if self.square:
            return self.bn(d * d)  # type: ignore[no-any-return]
        return self.bn(h - self.gamma * self.conv(d) / 2)  # type: ignore[no-any-return]


def test_scaling_by_parameters_and_constants() -> None:
    case(Scaled(), "bn", lambda m: [m.drop], exact=True)


def test_product_of_noisy_values_is_estimated() -> None:
    prediction = case(Scaled(square=True), "bn", lambda m: [m.drop], exact=False)
    assert "multiplies two noisy values" in prediction.note


class BatchCentred(nn.Module):
    """Dropout2d, then the batch mean subtracted: linear, but it mixes samples, which the
    groups form (one group shared by all samples) cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.drop, self.bn = stem(), nn.Dropout2d(0.3), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.drop(self.stem(x))
        return self.bn(y - y.mean(0, keepdim=True))  # type: ignore[no-any-return]


def test_layer_mixing_samples_is_estimated() -> None:
    prediction = case(BatchCentred(), "bn", lambda m: [m.drop], exact=False)
    assert "mixes samples" in prediction.note


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.drop, self.bn = stem(), nn.Dropout(0.3), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.bn(self.drop(self.stem(x)))  # type: ignore[no-any-return]


def test_untraceable_model_falls_back_to_monte_carlo() -> None:
    prediction = case(Untraceable(), "bn", lambda m: [m.drop], exact=False)
    assert "fx could not trace" in prediction.note
    assert prediction.sources == ("drop",)


# -- contract ----------------------------------------------------------------------------------


def test_model_state_is_left_as_it_was() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.MaxPool2d(2), nn.BatchNorm2d(8))
    net.train()
    net[0].eval()
    with torch.no_grad():
        net[3].running_var.uniform_(0.5, 2.0)
    flags = [m.training for m in net.modules()]
    buffers = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    predict_shifts(net, images(), draws=4)  # exact pass and Monte Carlo both run
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


def test_unreached_batchnorm_has_no_shift() -> None:
    net = nn.Sequential(stem(), nn.BatchNorm2d(8), nn.Dropout(0.3), nn.BatchNorm2d(8))
    out = predict_shifts(net, images())
    assert out["1"] == ShiftPrediction("1", 1.0, True, None, (), "no noise source reaches it")


def test_bad_arguments_are_refused() -> None:
    net = nn.Sequential(nn.Dropout(0.3), nn.BatchNorm2d(1))
    with pytest.raises(TypeError, match="model must be"):
        predict_shifts("net", images())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="never called: \\['nope'\\]"):
        predict_shifts(net, images(), [NoiseSource("nope", 0.5)])
    with pytest.raises(ValueError, match="draws must be"):
        predict_shifts(net, images(), draws=1)
    with pytest.raises(ValueError, match="batch_norms must name"):
        predict_shifts(net, images(), batch_norms=["0"])
    with pytest.raises(ValueError, match="grouping must be"):
        NoiseSource("0", 0.5, "row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must be"):
        NoiseSource.dropout("0", 1.0)
