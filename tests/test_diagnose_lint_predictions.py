"""lint's predicted shifts with example inputs against brute force (tests/helpers/noise_nets.py):
exact predictions within 0.01 of the measured shift, Monte Carlo estimates within 0.05; one
combined prediction per BatchNorm; the single-path formula, marked "assumed", without data."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

import varshift.diagnose.lint_predictions as lint_predictions
from helpers.noise_nets import Dense, Mlp, Residual, StochasticDepthRow, images, measured, stem
from varshift.diagnose import Finding, LintReport, lint, predict_shifts, register_noise_grouping
from varshift.lab.trial import _predicted_shift
from varshift.layers import (
    DropBlock2d,
    DropConnectLinear,
    GaussianDropout,
    NoiseSpec,
    register_stochastic,
)
from varshift.layers import functional as VF


def check_finding(finding: Finding, truth: float, exact: bool) -> None:
    assert finding.predicted_shift is not None, finding
    assert finding.exact is exact, finding
    if exact:
        assert finding.stderr is None
        assert abs(finding.predicted_shift - truth) <= 0.01, (finding, truth)
    else:
        assert finding.stderr is not None
        assert finding.stderr > 0
        assert abs(finding.predicted_shift - truth) <= 0.05, (finding, truth)


def case(
    model: nn.Module,
    bn: str,
    switches: Callable[[nn.Module], Sequence[nn.Module]],
    exact: bool,
    inputs: Tensor | None = None,
) -> LintReport:
    """lint's one finding at ``bn`` and its per-BatchNorm prediction against brute force."""
    inputs = images() if inputs is None else inputs
    report = lint(model, example_inputs=inputs)
    (finding,) = [f for f in report.findings if f.bn == bn]
    check_finding(finding, measured(model, inputs, bn, switches(model)), exact)
    combined = report.predictions[bn]
    assert (combined.shift, combined.exact) == (finding.predicted_shift, finding.exact)
    return report


# -- the table of issue 13 ---------------------------------------------------------------------


def test_dropout_straight_into_batchnorm() -> None:
    case(nn.Sequential(stem(), nn.Dropout(0.3), nn.BatchNorm2d(8)), "2", lambda m: [m[1]], True)


def test_dropout_conv_batchnorm_is_exact_where_the_old_formula_was_off() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    report = case(net, "3", lambda m: [m[1]], exact=True)
    truth = measured(net, images(), "3", [net[1]])
    (old,) = lint(net).findings  # no data: the single-path formula, the worst case
    assert old.basis == "assumed"
    assert abs(old.predicted_shift - truth) > 0.05  # type: ignore[operator]
    assert report.findings[0].basis == "exact"


def test_dropout_avgpool_batchnorm() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.AvgPool2d(2), nn.BatchNorm2d(8))
    case(net, "3", lambda m: [m[1]], exact=True)


def test_dropout_maxpool_conv_batchnorm_is_estimated() -> None:
    net = nn.Sequential(
        stem(), nn.Dropout(0.3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    report = case(net, "4", lambda m: [m[1]], exact=False)
    assert f"≈ {report.findings[0].predicted_shift:.3f} ± " in str(report)


def test_dropout2d_conv_batchnorm() -> None:
    net = nn.Sequential(stem(), nn.Dropout2d(0.3), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    case(net, "3", lambda m: [m[1]], exact=True)


class PerSampleDrop(StochasticDepthRow):
    """A residual branch dropped per sample (stochastic depth), registered by the test."""


@pytest.mark.usefixtures("noise_registry")
def test_residual_branch_dropped_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lint_predictions, "_GROUPINGS", dict(lint_predictions._GROUPINGS))
    register_stochastic(PerSampleDrop, lambda m: NoiseSpec("bernoulli", {"p": m.p}))
    net = Residual(PerSampleDrop(0.3))
    truth = measured(net, images(), "bn", [net.drop])
    # Read as element-wise noise, the sample-wide masks' correlation is missed.
    (wrong,) = lint(net, images()).findings
    assert wrong.exact
    assert abs(wrong.predicted_shift - truth) > 0.015  # type: ignore[operator]
    register_noise_grouping(PerSampleDrop, "sample")
    case(net, "bn", lambda m: [m.drop], exact=True)


def test_dropped_residual_branch() -> None:
    case(Residual(nn.Dropout(0.3)), "bn", lambda m: [m.drop], exact=True)


def test_two_convs() -> None:
    net = nn.Sequential(
        stem(),
        nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    case(net, "4", lambda m: [m[1]], exact=True)


def test_densenet_concat() -> None:
    case(Dense(), "bn", lambda m: [m.drop], exact=True)


def test_conv1d() -> None:
    x = torch.randn(64, 1, 11, generator=torch.Generator().manual_seed(2))
    net = nn.Sequential(
        stem(4, dims=1), nn.Dropout(0.4), nn.Conv1d(4, 6, 3, stride=2), nn.BatchNorm1d(6)
    )
    case(net, "3", lambda m: [m[1]], exact=True, inputs=x)


def test_linear_mlp_with_functional_dropout() -> None:
    report = case(Mlp(), "bn", lambda m: [m], exact=True)
    assert report.findings[0].source == "F.dropout@<root>"  # lint's name, not fx's "dropout"


def test_dropblock_is_estimated_by_monte_carlo() -> None:
    net = nn.Sequential(
        stem(), DropBlock2d(0.3, block_size=3), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    case(net, "3", lambda m: [m[1]], exact=False)


def test_dropconnect_is_estimated_by_monte_carlo() -> None:
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), DropConnectLinear(16, 16, p=0.3))
    net.append(nn.BatchNorm1d(16))
    case(net, "3", lambda m: [m[2]], exact=False, inputs=x)


class GaussianMlp(nn.Module):
    """varshift's functional Gaussian dropout, a registered function fx keeps as one call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(VF.gaussian_dropout(torch.relu(x), 0.3, self.training)))  # type: ignore[no-any-return]


def test_registered_functional_noise_is_exact() -> None:
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(4))
    report = case(GaussianMlp(), "bn", lambda m: [m], exact=True, inputs=x)
    assert report.findings[0].source == "gaussian_dropout@<root>"


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.drop = stem(), GaussianDropout(0.3)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.bn(self.conv(self.drop(self.stem(x))))  # type: ignore[no-any-return]


def test_hooks_traced_model_is_estimated_by_monte_carlo() -> None:
    report = case(Untraceable(), "bn", lambda m: [m.drop], exact=False)
    assert report.method == "hooks"


class DenseTwo(nn.Module):
    """Two dense layers: the dropped features reach ``bn2`` directly (concatenation) and also
    through ``bn1 → relu → conv``; with ``clean_branch`` the second route sees no noise."""

    def __init__(self, clean_branch: bool = False) -> None:
        super().__init__()
        self.stem, self.drop = stem(), nn.Dropout(0.3)
        self.bn1, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.clean_branch = clean_branch

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        d = self.drop(h)
        new = self.conv(torch.relu(self.bn1(h if self.clean_branch else d)))
        return self.bn2(torch.cat([d, new], 1))  # type: ignore[no-any-return]


def test_noise_is_followed_to_the_first_batchnorm_only() -> None:
    # Lint's rule: bn2's shift is the noise reaching it before any other BatchNorm (bn1 has its
    # own finding); followed through bn1 and the ReLU it would only be estimated.
    net, x = DenseTwo(), images()
    report = lint(net, x)
    (second,) = [f for f in report.findings if f.bn == "bn2"]
    reference = DenseTwo(clean_branch=True)
    reference.load_state_dict(net.state_dict())
    check_finding(second, measured(reference, x, "bn2", [reference.drop]), exact=True)


# -- one prediction per BatchNorm ----------------------------------------------------------------


class TwoSources(nn.Module):
    """Two dropouts on two branches added before one BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.drop_a, self.drop_b = nn.Dropout(0.2), nn.Dropout2d(0.4)
        self.conv_a, self.conv_b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.bn(self.conv_a(self.drop_a(h)) + self.conv_b(self.drop_b(h)))  # type: ignore[no-any-return]


def test_sources_of_one_batchnorm_combine() -> None:
    net, x = TwoSources(), images()
    report = lint(net, x)
    by_source = {f.source: f for f in report.findings}
    check_finding(by_source["drop_a"], measured(net, x, "bn", [net.drop_a]), exact=True)
    check_finding(by_source["drop_b"], measured(net, x, "bn", [net.drop_b]), exact=True)
    combined = report.predictions["bn"]
    assert (combined.sources, combined.nearest, combined.exact) == (
        ("drop_a", "drop_b"),
        "drop_a",
        True,
    )
    truth = measured(net, x, "bn", [net.drop_a, net.drop_b])
    assert combined.shift == pytest.approx(truth, abs=0.01)
    # Formerly the smaller of the two shifts stood for the BatchNorm: both noises count.
    assert combined.shift is not None
    assert combined.shift < min(f.predicted_shift for f in report.findings) - 0.02  # type: ignore[type-var]
    assert _predicted_shift(net, x) == {"bn": combined.shift}


def test_without_data_the_combined_shift_is_assumed() -> None:
    report = lint(TwoSources())
    combined = report.predictions["bn"]
    # Independent masks: 1/Δ − 1 adds up, 0.25 + 2/3 with Var[m] = p/(1 − p).
    assert combined.shift == pytest.approx(1 / (1 + 0.25 + 0.4 / 0.6))
    assert (combined.exact, combined.basis) == (None, "assumed")
    assert all(f.basis == "assumed" for f in report.findings)
    assert "assumed" in str(report)


# -- contract ------------------------------------------------------------------------------------


def test_zero_rate_noise_is_no_finding() -> None:
    net = nn.Sequential(nn.Dropout(0.0), nn.BatchNorm1d(4))
    for report in (lint(net), lint(net, torch.randn(32, 4))):
        assert report.ok
        assert report.predictions == {}
        (layer,) = report.stochastic_layers
        assert layer.feeds == ()


def test_report_round_trips_with_the_new_fields() -> None:
    net = nn.Sequential(
        stem(), nn.Dropout(0.3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    report = lint(net, images())
    data = json.loads(report.to_json())
    assert data["findings"][0]["exact"] is False
    assert data["findings"][0]["stderr"] > 0
    assert data["predictions"]["4"]["nearest"] == "1"
    assert LintReport.from_json(report.to_json()) == report
    assert all(len(line) <= 120 for line in str(report).splitlines())


def test_lint_with_predictions_leaves_the_model_as_it_was() -> None:
    net = nn.Sequential(stem(), nn.Dropout(0.3), nn.MaxPool2d(2), nn.BatchNorm2d(8)).train()
    net[0].eval()
    flags = [m.training for m in net.modules()]
    buffers = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    lint(net, images())  # Monte Carlo forwards included
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="grouping must be one of"):
        register_noise_grouping(PerSampleDrop, "row")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_example_inputs_are_one_line_errors_that_change_nothing(bad: float) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.BatchNorm1d(8)).train()
    x = torch.randn(16, 4)
    x[3, 1] = bad
    before = {name: t.clone() for name, t in net.state_dict().items()}
    for predict in (lambda: lint(net, x), lambda: predict_shifts(net, x)):
        with pytest.raises(ValueError, match=r"^example_inputs hold nan or inf values"):
            predict()
    assert net.training
    assert all(torch.equal(before[name], t) for name, t in net.state_dict().items())
