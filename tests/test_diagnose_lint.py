"""Tests for varshift.diagnose.lint: which BatchNorm layers are fed by noise, found by fx and by
forward hooks, with the variance shift predicted by varshift.theory."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import varshift.layers.functional as VF
from helpers.models_zoo import (
    ZOO,
    BNDropoutBN,
    DataDependentNet,
    DenseNetTiny,
    DropoutBNConvBN,
    FunctionalDropoutNet,
    InstanceNormNet,
    Jitter,
    JitterNet,
    NoRunningStatsNet,
    PerSampleNormNet,
    PreActResNetTiny,
    RegistrationOrderNet,
    ResidualDropoutNet,
    TrainingGuardNet,
    VGGTiny,
    ZooCase,
)
from helpers.torchscript import TO_TORCHSCRIPT, TO_TORCHSCRIPT_IDS, TorchScriptConversion
from varshift.diagnose.lint import Finding, LintReport, lint
from varshift.layers import NoiseSpec, Uout, register_stochastic, register_stochastic_function


def images(batch: int = 16) -> Tensor:
    return torch.randn(batch, 3, 8, 8)


def vectors(batch: int = 32) -> Tensor:
    return torch.randn(batch, 8)


def by_bn(report: LintReport) -> dict[str, list[Finding]]:
    found: dict[str, list[Finding]] = {}
    for finding in report.findings:
        found.setdefault(finding.bn, []).append(finding)
    return found


# -- the zoo, traced both ways ---------------------------------------------------------------


@pytest.mark.parametrize("case", ZOO, ids=lambda case: case.name)
def test_zoo_flags_exactly_the_bns_fed_by_noise(case: ZooCase) -> None:
    model, x = case.build(), case.example()
    hooks = lint(model, x, method="hooks")
    assert hooks.method == "hooks"
    assert set(hooks.flagged) == case.flagged
    assert hooks.ok == (not case.flagged)
    if case.fx_traceable:
        fx = lint(model)
        assert fx.method == "fx"
        assert set(fx.flagged) == case.flagged
        assert [(f.bn, f.source) for f in fx.findings] == [
            (f.bn, f.source) for f in hooks.findings
        ]


def test_densenet_dropout_reaches_later_bns_through_concatenation() -> None:
    report = lint(DenseNetTiny(p=0.2))
    found = by_bn(report)
    assert [f.source for f in found["layers.1.bn"]] == ["layers.0.drop"]
    assert found["layers.1.bn"][0].path == ("layers.0.drop", "torch.cat@layers.0", "layers.1.bn")
    # The final BN sees both dropouts: the first one's output is carried along by both cats.
    assert {f.source for f in found["norm"]} == {"layers.0.drop", "layers.1.drop"}
    assert "layers.0.bn" not in found


def test_vgg_classifier_dropout_is_not_a_finding() -> None:
    report = lint(VGGTiny())
    assert report.ok
    assert report.findings == []
    assert [layer.name for layer in report.stochastic_layers] == ["classifier.3", "classifier.6"]
    assert not any(layer.feeds_bn for layer in report.stochastic_layers)


def test_preact_resnet_flags_the_bn_after_the_dropout_only() -> None:
    found = by_bn(lint(PreActResNetTiny()))
    assert set(found) == {"block1.bn2", "block2.bn2"}
    assert found["block1.bn2"][0].path == ("block1.drop", "block1.bn2")
    assert found["block1.bn2"][0].rate == pytest.approx(0.3)


def test_residual_addition_carries_the_noise() -> None:
    (finding,) = lint(ResidualDropoutNet()).findings
    assert finding.path == ("drop", "add@<root>", "bn")


def test_bn_dropout_bn_flags_only_the_second() -> None:
    assert lint(BNDropoutBN()).flagged == ["bn2"]


def test_a_bn_in_between_stops_the_search() -> None:
    report = lint(DropoutBNConvBN())
    assert report.flagged == ["bn1"]
    assert report.stochastic_layers[0].feeds == ("bn1",)


# -- fallback to hooks, and why the data flow must be the real one ---------------------------


def test_untraceable_model_falls_back_to_hooks() -> None:
    report = lint(DataDependentNet(), vectors().abs())
    assert report.method == "hooks"
    assert report.flagged == ["bn_pos"]
    assert any("could not trace" in note for note in report.notes)


def test_untraceable_model_without_inputs_explains_itself() -> None:
    expected = r"torch\.fx could not trace.*control flow.*example_inputs"
    with pytest.raises(ValueError, match=expected):
        lint(DataDependentNet())


def test_registration_order_is_not_data_flow() -> None:
    model = RegistrationOrderNet()
    names = [name for name, _ in model.named_modules()]
    # What a walk over registered modules would conclude: dropout → fc → second_bn.
    assert names.index("drop") < names.index("fc") < names.index("second_bn")
    for report in (lint(model, vectors(), method="hooks"), lint(model)):
        ((finding,),) = [report.findings]
        assert (finding.bn, finding.source) == ("first_bn", "drop")
        assert finding.path == ("drop", "first_bn")


# -- functional dropout, and independence from train()/eval() --------------------------------


def _flags(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_functional_dropout_is_found_in_any_mode(mode: str, method: str) -> None:
    model = FunctionalDropoutNet(p=0.3)
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
    before = _flags(model)
    report = lint(model, vectors() if method == "hooks" else None, method=method)
    assert _flags(model) == before
    ((finding,),) = [report.findings]
    assert (finding.bn, finding.source) == ("bn", "F.dropout@<root>")
    assert finding.source_type == "function"
    assert (finding.noise, finding.rate, finding.rate_name) == ("bernoulli", 0.3, "p")


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_dropout_guarded_by_self_training_is_found_in_eval_mode(method: str) -> None:
    model = TrainingGuardNet().eval()
    report = lint(model, vectors() if method == "hooks" else None, method=method)
    assert report.flagged == ["bn"]
    assert report.findings[0].rate == pytest.approx(0.5)
    assert not any(_flags(model))


class _UsesVarshiftFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        # Through a module attribute, which neither fx.wrap nor a name lookup would catch.
        return self.bn(VF.gaussian_dropout(self.fc(x), 0.2, self.training))


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_registered_python_function_is_one_stochastic_node(method: str) -> None:
    original = VF.gaussian_dropout
    report = lint(_UsesVarshiftFunctional(), vectors(), method=method)
    assert VF.gaussian_dropout is original  # the hooks tracer's patch is undone
    ((finding,),) = [report.findings]
    assert (finding.source, finding.noise, finding.rate) == (
        "gaussian_dropout@<root>", "gaussian", pytest.approx(0.2)
    )
    assert finding.path == ("gaussian_dropout@<root>", "bn")


# -- other normalizations ----------------------------------------------------------------------


def test_per_sample_norms_are_listed_as_unaffected() -> None:
    report = lint(PerSampleNormNet())
    assert report.ok
    unaffected = {u.name: u for u in report.unaffected}
    assert set(unaffected) == {"gn", "ln"}
    assert all(u.fed_by_noise for u in unaffected.values())
    assert "not affected" in str(report)


def test_bn_without_running_stats_is_unaffected_but_instance_norm_with_them_is_not() -> None:
    plain = lint(NoRunningStatsNet())
    assert plain.ok
    ((norm,),) = [plain.unaffected]
    assert norm.name == "bn"
    assert "track_running_stats=False" in norm.reason
    (finding,) = lint(InstanceNormNet()).findings
    assert (finding.bn, finding.bn_type) == ("norm", "InstanceNorm2d")


# -- user-registered noise --------------------------------------------------------------------


@pytest.mark.usefixtures("noise_registry")
def test_user_registered_stochastic_module() -> None:
    class MyJitter(Jitter):
        pass

    model = JitterNet(MyJitter(sigma=0.5))
    # Unregistered, the noise is still visible as the random call inside it, but unmodelled.
    (anonymous,) = lint(model).findings
    assert (anonymous.source, anonymous.noise, anonymous.predicted_shift) == (
        "torch.randn_like@noise", None, None
    )
    # Var[m] = σ² = 0.25 is Gaussian dropout with p/(1 − p) = 0.25, i.e. p = 0.2.
    register_stochastic(
        MyJitter, lambda m: NoiseSpec("gaussian", {"p": m.sigma**2 / (1 + m.sigma**2)})
    )
    for report in (lint(model), lint(model, vectors(), method="hooks")):
        (finding,) = report.findings
        assert (finding.source, finding.source_type) == ("noise", "module")
        assert finding.noise == "gaussian"
        assert finding.rate == pytest.approx(0.2)
    assert lint(model).findings[0].predicted_shift == pytest.approx(1 / 1.25, abs=1e-12)


# -- predicted shift ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_direct_dropout_prediction_is_one_minus_p(p: float) -> None:
    model = nn.Sequential(nn.Dropout(p), nn.BatchNorm1d(16))
    (formula,) = lint(model).findings
    assert formula.predicted_shift == pytest.approx(1 - p, abs=1e-12)
    assert not formula.measured
    (measured,) = lint(model, torch.randn(4096, 16)).findings
    assert measured.measured
    # Per-channel sample means of 4096 N(0, 1) draws are ~0.016: c² barely moves Δ.
    assert measured.predicted_shift == pytest.approx(1 - p, abs=0.01)


class _TwoFunctionalDropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(x, 0.5, self.training)
        return self.bn(F.dropout(x, 0.3, self.training))


@pytest.mark.parametrize("method", ["fx", "hooks"])
@pytest.mark.parametrize("functional", [False, True])
def test_measured_prediction_uses_the_input_moments_with_all_noise_off(
    method: str, functional: bool
) -> None:
    model: nn.Module = (
        _TwoFunctionalDropouts()
        if functional
        else nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.3), nn.BatchNorm1d(16))
    )
    second = "F.dropout@<root>#2" if functional else "1"
    report = lint(model, 2.0 + torch.randn(4096, 16), method=method)
    (finding,) = [f for f in report.findings if f.source == second]
    # The second dropout's input has c = 2, v = 1 when the first dropout is off, as at test
    # time: Δ = v / (v + σ²(c² + v)) with σ² = 0.3/0.7. Measured with the first dropout on,
    # v would read 1 + 5 = 6 and the prediction 0.58.
    assert finding.predicted_shift == pytest.approx(1 / (1 + 5 * 0.3 / 0.7), abs=0.01)


def test_uout_prediction() -> None:
    (finding,) = lint(nn.Sequential(Uout(0.5), nn.BatchNorm1d(4))).findings
    assert (finding.noise, finding.rate_name, finding.rate) == ("uout", "beta", 0.5)
    assert finding.predicted_shift == pytest.approx(3 / (3 + 0.25), abs=1e-12)


def _bn_input_variance(model: nn.Sequential, x: Tensor, *, noise: bool) -> Tensor:
    with torch.no_grad():
        model[0].train(noise)
        h = model[1](model[0](x))
    return h.var(dim=0, unbiased=False)


def test_width_form_matches_the_real_shift_after_a_wide_layer() -> None:
    # Inputs x_i = z + e_i: v = 2, ρ = 0.5, c = 0; positive weights: cos²θ ≈ 0.75. Li et al.'s
    # width form then predicts Δ = 49 / 51 for p = 0.5, far from the direct 1 − p = 0.5.
    p, d = 0.5, 64
    model = nn.Sequential(nn.Dropout(p), nn.Linear(d, 32, bias=False), nn.BatchNorm1d(32))
    with torch.no_grad():
        model[1].weight.uniform_(0.0, 1.0)
    x = torch.randn(4096, 1) + torch.randn(4096, d)
    (finding,) = lint(model, x).findings
    assert (finding.width, finding.path) == (d, ("0", "1", "2"))
    assert finding.cos2 == pytest.approx(0.75, abs=0.03)
    assert finding.rho == pytest.approx(0.5, abs=0.05)
    real = _bn_input_variance(model, x, noise=False) / _bn_input_variance(model, x, noise=True)
    assert finding.predicted_shift == pytest.approx(float(real.mean()), abs=0.02)
    assert finding.predicted_shift > 0.9
    # Without data: ρ = 0 is assumed and the width term vanishes (the worst case).
    (blind,) = lint(model).findings
    assert (blind.rho, blind.predicted_shift) == (0.0, pytest.approx(1 - p, abs=1e-12))


# -- state left behind -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_lint_leaves_no_trace_on_the_model(method: str) -> None:
    model = PreActResNetTiny().eval()
    x = images()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    lint(model, x, method=method)
    assert all(torch.equal(buffers[name], b) for name, b in model.named_buffers())
    assert torch.equal(rng, torch.get_rng_state())
    assert not any(_flags(model))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # fx cannot trace this; the hooks run then fails inside forward
            raise RuntimeError("boom")
        return self.bn(self.drop(x))


def test_failing_forward_still_restores_hooks_and_modes() -> None:
    model = _Broken().eval()
    # The model's own failure is named in one line; the original error is its cause.
    with pytest.raises(ValueError, match=r"training-mode forward failed.*boom") as caught:
        lint(model, torch.ones(2, 4))
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not any(_flags(model))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.25)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(x + self.drop(y))


@pytest.mark.parametrize("method", ["fx", "hooks"])
@pytest.mark.parametrize("as_dict", [False, True])
def test_several_example_inputs(method: str, as_dict: bool) -> None:
    x, y = vectors(), vectors()
    inputs = {"x": x, "y": y} if as_dict else (x, y)
    (finding,) = lint(_TwoInputs(), inputs, method=method).findings
    assert finding.path == ("drop", "add@<root>", "bn")
    assert finding.measured


# -- report ------------------------------------------------------------------------------------


def test_report_round_trips_and_prints() -> None:
    report = lint(DenseNetTiny(), images())
    assert LintReport.from_dict(report.to_dict()) == report
    assert LintReport.from_json(report.to_json()) == report
    data = json.loads(report.to_json())
    assert data["ok"] is False
    assert data["method"] == "fx"
    assert data["findings"][0]["path"] == list(report.findings[0].path)
    assert all(math.isfinite(f["predicted_shift"]) for f in data["findings"])
    text = report.format(verbose=True)
    header = text.splitlines()[1]
    assert [cell.strip() for cell in header.split("|")] == [
        "BN layer", "upstream noise", "p", "predicted shift", "path"
    ]
    for finding in report.findings:
        assert finding.bn in text
        assert " -> ".join(finding.path) in text
    assert "0.2 " in text


def test_ok_report_says_so() -> None:
    report = lint(VGGTiny())
    assert str(report).splitlines()[0] == (
        "varshift lint (fx): no BatchNorm layer is fed by a stochastic layer (2 checked)"
    )
    assert json.loads(report.to_json())["ok"] is True


# -- arguments ---------------------------------------------------------------------------------


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        lint(F.relu)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method must be one of.*'graph'"):
        lint(VGGTiny(), method="graph")
    with pytest.raises(ValueError, match="method='hooks' needs example_inputs"):
        lint(VGGTiny(), method="hooks")
    with pytest.raises(ValueError, match=r"method='fx' but torch\.fx could not trace"):
        lint(DataDependentNet(), vectors(), method="fx")


# -- compiled and scripted models -------------------------------------------------------------


def _findings(report: LintReport) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(f.bn, f.source, f.path) for f in report.findings]


def test_torch_compiled_model_is_linted_through_the_module_it_wraps() -> None:
    model = PreActResNetTiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, importing dynamo
        compiled = torch.compile(model)  # compiles lazily, on a call: lint never calls it
    assert isinstance(compiled, nn.Module)
    assert compiled is not model
    plain = lint(model)
    for report in (lint(compiled), lint(compiled, images(), method="hooks")):
        assert _findings(report) == _findings(plain)
        assert any("torch.compile" in note for note in report.notes)


@pytest.mark.parametrize("to_torchscript", TO_TORCHSCRIPT, ids=TO_TORCHSCRIPT_IDS)
@pytest.mark.parametrize("with_inputs", [False, True])
def test_torchscript_model_is_refused_with_the_fix(
    to_torchscript: TorchScriptConversion, with_inputs: bool
) -> None:
    scripted = to_torchscript(nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4)), torch.randn(4, 4))
    with pytest.raises(TypeError, match=r"TorchScript.*pass the original \(un-scripted\) module"):
        lint(scripted, torch.randn(4, 4) if with_inputs else None)


# -- what counts as "fx cannot trace" ----------------------------------------------------------


class _Untraceable(nn.Module):
    """Dropout before a BatchNorm, with a forward that fx cannot record in one of several ways."""

    def __init__(self, obstacle: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.obstacle = obstacle
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.drop(self.obstacle(x)))


_OBSTACLES: dict[str, Callable[[Tensor], Tensor]] = {
    "branch on a value": lambda x: x if x.sum() > 0 else -x,
    "len()": lambda x: x[: len(x)],
    "range() of a size": lambda x: sum((x for _ in range(x.shape[0] // x.shape[0])), x * 0),
    "float() of a value": lambda x: x * float(x.abs().mean() > -1),
    "dict key": lambda x: {8: x}[x.shape[1]],
}


@pytest.mark.parametrize("obstacle", _OBSTACLES.values(), ids=list(_OBSTACLES))
def test_each_kind_of_fx_failure_falls_back_to_hooks(obstacle: Callable[[Tensor], Tensor]) -> None:
    report = lint(_Untraceable(obstacle), vectors())
    assert report.method == "hooks"
    assert report.flagged == ["bn"]
    assert any("torch.fx could not trace" in note for note in report.notes)


class _Typo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.dorp(x))


def test_a_bug_in_forward_is_not_taken_for_an_fx_limitation() -> None:
    # Not "fx could not trace, pass example_inputs": the model's own error, as a call raises it.
    with pytest.raises(AttributeError, match="dorp"):
        lint(_Typo())


# -- user spec functions that cannot read a call ----------------------------------------------


def scaled_noise(x: Tensor, rate: Any, training: bool = True) -> Tensor:
    if not training:
        return x
    return x * (torch.rand_like(x) > rate) / (1 - rate)


class _ScaledNoiseNet(nn.Module):
    def __init__(self, rate_from_data: bool) -> None:
        super().__init__()
        self.rate_from_data = rate_from_data
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: Tensor) -> Tensor:
        rate = torch.sigmoid(x.mean()) * 0.5 if self.rate_from_data else 0.25
        return self.bn(scaled_noise(x, rate, self.training))


def _rate_spec(args: tuple[Any, ...], kwargs: Any) -> NoiseSpec:
    return NoiseSpec("bernoulli", {"p": float(args[1])})


@pytest.mark.usefixtures("noise_registry")
def test_spec_function_that_cannot_read_an_fx_node_gives_no_prediction() -> None:
    register_stochastic_function(scaled_noise, _rate_spec)
    (finding,) = lint(_ScaledNoiseNet(rate_from_data=True)).findings  # rate is an fx node
    assert (finding.source, finding.noise, finding.predicted_shift) == (
        "scaled_noise@<root>", None, None
    )
    (constant,) = lint(_ScaledNoiseNet(rate_from_data=False)).findings
    assert (constant.noise, constant.rate) == ("bernoulli", 0.25)


@pytest.mark.usefixtures("noise_registry")
def test_spec_function_that_fails_on_real_values_is_reported() -> None:
    register_stochastic_function(scaled_noise, lambda args, kwargs: kwargs["p"])
    # Formerly swallowed: the noise silently read as "not modelled".
    with pytest.raises(ValueError, match=r"spec function registered for scaled_noise.*KeyError"):
        lint(_ScaledNoiseNet(rate_from_data=False), vectors(), method="hooks")


# -- predictions from data that overflow ---------------------------------------------------------


def test_prediction_leaves_out_channels_whose_variance_is_not_finite() -> None:
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4)).double()
    x = torch.randn(256, 4, dtype=torch.float64)
    x[:, 0] *= 1e200  # its squares overflow float64: the measured variance is inf
    (finding,) = lint(model, x).findings
    assert finding.measured
    assert finding.predicted_shift == pytest.approx(0.5, abs=0.02)
