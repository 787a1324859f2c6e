"""torchvision's and timm's noise layers in the registry (varshift.layers.zoo): registered once
the user imports the library, never imported by us; specs, rates and mask groupings read per
module and per call; lint sees them, sizes them and predicts their shift."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers.noise_nets import Residual, images, measured
from varshift.diagnose import lint, noise_grouping, register_noise_grouping
from varshift.layers import registry
from varshift.layers.registry import (
    NoiseSpec,
    function_mask_grouping,
    function_noise_spec,
    is_stochastic,
    is_stochastic_function,
    mask_grouping,
    noise_spec,
    register_stochastic,
)

tv_ops = pytest.importorskip("torchvision.ops")
tv_models = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")
from timm.layers import DropBlock2d, DropPath, drop_block_2d, drop_path  # noqa: E402

SAMPLE = (2, 3, 64, 64)


def bernoulli(p: float) -> NoiseSpec:
    return NoiseSpec("bernoulli", {"p": p})


# -- specs, rates and groupings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "spec", "grouping"),
    [
        (tv_ops.StochasticDepth(0.2, "row"), bernoulli(0.2), "sample"),
        (tv_ops.StochasticDepth(0.3, "batch"), bernoulli(0.3), "structured"),
        (tv_ops.StochasticDepth(0.0, "row"), bernoulli(0.0), "sample"),
        (DropPath(0.1), bernoulli(0.1), "sample"),
        (DropPath(0.1, scale_by_keep=False), None, "sample"),  # E[m] = 0.9: not modelled
        (DropPath(0.0, scale_by_keep=False), bernoulli(0.0), "sample"),  # the identity
        (DropBlock2d(0.2, 3), bernoulli(0.2), "structured"),
        (DropBlock2d(0.2, 5, gamma_scale=0.25), bernoulli(0.05), "structured"),
        (DropBlock2d(0.2, 3, with_noise=True), None, "structured"),
        (DropBlock2d(0.2, 3, scale_by_keep=False), None, "structured"),
        (DropBlock2d(0.0, 3, with_noise=True), bernoulli(0.0), "structured"),
    ],
    ids=repr,
)
def test_module_specs_rates_and_groupings(
    module: nn.Module, spec: NoiseSpec | None, grouping: str
) -> None:
    assert is_stochastic(module)
    assert noise_spec(module) == spec
    assert mask_grouping(module) == grouping
    assert noise_grouping(module) == grouping  # lint reads the registry's declaration


def test_rates_are_read_from_the_module_as_it_is_now() -> None:
    layer = DropPath(0.1)
    layer.drop_prob = 0.25
    assert noise_spec(layer) == bernoulli(0.25)
    depth = tv_ops.StochasticDepth(0.2, "row")
    depth.mode = "batch"
    assert mask_grouping(depth) == "structured"


x = torch.ones(2, 3)


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "spec", "grouping"),
    [
        (tv_ops.stochastic_depth, (x, 0.2, "row"), {}, bernoulli(0.2), "sample"),
        (tv_ops.stochastic_depth, (x,), {"p": 0.2, "mode": "row"}, bernoulli(0.2), "sample"),
        (tv_ops.stochastic_depth, (x, 0.2, "batch", True), {}, bernoulli(0.2), "structured"),
        (tv_ops.stochastic_depth, (x, 0.2, "row", False), {}, bernoulli(0.0), "sample"),
        (drop_path, (x, 0.1, True), {}, bernoulli(0.1), "sample"),
        (drop_path, (x,), {"drop_prob": 0.1, "training": True}, bernoulli(0.1), "sample"),
        (drop_path, (x, 0.1), {}, bernoulli(0.0), "sample"),  # timm's training defaults to off
        (drop_path, (x, 0.1, True, False), {}, None, "sample"),
        (drop_block_2d, (x, 0.2, 3), {}, bernoulli(0.2), "structured"),
        (drop_block_2d, (x,), {"drop_prob": 0.2, "gamma_scale": 0.5}, bernoulli(0.1), "structured"),
        (drop_block_2d, (x, 0.2), {"with_noise": True}, None, "structured"),
    ],
)
def test_function_specs_rates_and_groupings(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    spec: NoiseSpec | None,
    grouping: str,
) -> None:
    assert is_stochastic_function(fn)
    assert function_noise_spec(fn, args, kwargs) == spec
    assert function_mask_grouping(fn, args, kwargs) == grouping
    assert noise_grouping(fn, args, kwargs) == grouping


@pytest.mark.parametrize(
    "layer",
    [tv_ops.StochasticDepth(0.3, "row"), tv_ops.StochasticDepth(0.3, "batch"), DropPath(0.3)],
    ids=repr,
)
def test_spec_variance_is_the_layers_per_element_variance(layer: nn.Module) -> None:
    # Var[m] over many independent forwards of a one-element-per-sample batch of ones.
    spec = noise_spec(layer)
    assert spec is not None
    layer.train()
    n = 20_000 if getattr(layer, "mode", "row") == "row" else 1
    draws = 1 if n > 1 else 20_000
    masks = torch.cat([layer(torch.ones(n, 1)).flatten() for _ in range(draws)]).double()
    # Var of a sample variance of a two-point law: about 3·Var²/n here; 6 sigmas.
    tolerance = 6 * (3 * spec.variance() ** 2 / masks.numel()) ** 0.5
    assert abs(masks.mean().item() - 1) < 6 * (spec.variance() / masks.numel()) ** 0.5
    assert abs(masks.var().item() - spec.variance()) < tolerance


def test_torch_channel_dropouts_are_grouped_per_channel() -> None:
    for module in (nn.Dropout1d(0.2), nn.Dropout2d(0.2), nn.Dropout3d(0.2)):
        assert mask_grouping(module) == "channel"
    for fn in (torch.nn.functional.dropout2d, torch.feature_dropout):
        assert function_mask_grouping(fn, (x, 0.2, True)) == "channel"
    assert mask_grouping(nn.Dropout(0.2)) == "element"
    assert is_stochastic(nn.FeatureAlphaDropout(0.2))
    assert noise_spec(nn.FeatureAlphaDropout(0.2)) is None  # stochastic without formula


@pytest.mark.usefixtures("noise_registry")
def test_register_noise_grouping_overrides_the_registry() -> None:
    register_noise_grouping(DropPath, "structured")
    assert noise_grouping(DropPath(0.1)) == "structured"
    assert mask_grouping(DropPath(0.1)) == "sample"


# -- on demand, never imported by us -------------------------------------------------------------


def run_python(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_nothing_imported_or_registered_when_the_user_did_not_import_them() -> None:
    run_python(
        """
        import sys
        import torch
        from torch import nn
        import varshift.diagnose
        from varshift.layers import registry
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.2), nn.BatchNorm2d(4))
        assert varshift.diagnose.lint(net, example_inputs=torch.randn(2, 3, 8, 8)).findings
        names = {f"{k.__module__}.{k.__qualname__}" for k in registry.stochastic_modules()}
        names |= {f"{k.__module__}.{k.__name__}" for k in registry.stochastic_functions()}
        assert not [n for n in names if n.startswith(("timm", "torchvision"))], names
        assert not [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")]
        import timm.layers
        assert registry.is_stochastic(timm.layers.DropPath(0.1))
        """
    )


@pytest.mark.usefixtures("noise_registry")
def test_registered_again_after_the_registries_are_restored() -> None:
    # What the noise_registry fixture does when its snapshot predates the first lookup.
    del registry._MODULES[DropBlock2d]
    assert is_stochastic(DropBlock2d(0.1))
    assert noise_spec(DropBlock2d(0.1)) == bernoulli(0.1)


@pytest.mark.usefixtures("noise_registry")
def test_the_users_own_registration_wins() -> None:
    del registry._MODULES[DropPath]  # as if the user registered before varshift's first lookup
    register_stochastic(DropPath, lambda m: NoiseSpec("gaussian", {"p": m.drop_prob}))
    del registry._MODULES[DropBlock2d]  # forces the library's registration to run again
    assert noise_spec(DropPath(0.2)) == NoiseSpec("gaussian", {"p": 0.2})
    assert noise_spec(DropBlock2d(0.1)) == bernoulli(0.1)


# -- lint -------------------------------------------------------------------------------------


def test_lint_sizes_torchvision_stochastic_depth() -> None:
    model = tv_models.efficientnet_b0()
    report = lint(model, example_inputs=torch.randn(SAMPLE))
    depth = [f for f in report.findings if f.source.endswith("stochastic_depth")]
    assert len(depth) >= 9  # BatchNorms after a dropped residual branch, once unseen
    for finding in depth:
        assert finding.rate == model.get_submodule(finding.source).p
        assert finding.predicted_shift is not None
        assert finding.exact  # the per-sample grouping reaches lint's exact predictor


def test_lint_sizes_timm_drop_path() -> None:
    model = timm.create_model("efficientnet_b0", drop_path_rate=0.2)
    report = lint(model, example_inputs=torch.randn(SAMPLE))
    assert report.findings
    for finding in report.findings:
        assert finding.rate == model.get_submodule(finding.source).drop_prob
        assert finding.rate is not None
        assert finding.rate > 0
        assert finding.predicted_shift is not None


def test_lint_reports_timm_resnet_rates_rising_with_depth_and_flags_drop_block() -> None:
    model = timm.create_model("resnet18", drop_path_rate=0.2, drop_block_rate=0.2)
    report = lint(model)
    rates = {f.source: f.rate for f in report.findings if f.source.endswith("drop_path")}
    order = [name for name, _ in model.named_modules() if name in rates]
    assert len(order) >= 6
    assert [rates[name] for name in order] == sorted(rates.values())
    assert len(set(rates.values())) == len(order)  # one rate per block, linear in depth
    blocks = [f for f in report.findings if f.source.endswith("drop_block")]
    assert {f.rate for f in blocks} == {0.2 * 0.25, 0.2}  # gamma_scale 0.25 in stage 3
    assert all(f.predicted_shift is not None for f in report.findings)


def test_lint_estimates_timm_drop_block_by_monte_carlo() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DropBlock2d(0.2, 3),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    (finding,) = lint(net, example_inputs=torch.randn(8, 3, 16, 16)).findings
    assert (finding.bn, finding.source, finding.rate) == ("5", "3", 0.2)
    assert finding.basis == "estimated"
    assert finding.predicted_shift is not None
    assert finding.predicted_shift < 1


class FunctionalDepth(nn.Module):
    """The functional forms in a forward: torchvision's is fx-wrapped, timm's is not."""

    def __init__(self, torchvision: bool) -> None:
        super().__init__()
        self.torchvision = torchvision
        self.p = 0.3

    def forward(self, h: Tensor) -> Tensor:
        if self.torchvision:
            return tv_ops.stochastic_depth(h, self.p, "row", self.training)  # type: ignore[no-any-return]
        return drop_path(h, self.p, self.training)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "drop",
    [
        tv_ops.StochasticDepth(0.3, "row"),
        DropPath(0.3),
        FunctionalDepth(True),
        FunctionalDepth(False),
    ],
    ids=["StochasticDepth", "DropPath", "stochastic_depth", "drop_path"],
)
def test_lint_predicts_the_measured_shift_of_a_dropped_branch(drop: nn.Module) -> None:
    net = Residual(drop)
    (finding,) = lint(net, images()).findings
    assert finding.rate == pytest.approx(0.3)
    assert finding.exact
    truth = measured(net, images(), "bn", [net.drop], draws=300)
    assert finding.predicted_shift == pytest.approx(truth, abs=0.01)


def test_zero_rates_are_not_findings() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Dropout(0.0),
        nn.BatchNorm2d(8),
        tv_ops.StochasticDepth(0.0, "row"),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        DropPath(0.0, scale_by_keep=False),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        DropBlock2d(0.0, 3, with_noise=True),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
    )
    report = lint(net, example_inputs=torch.randn(4, 3, 8, 8))
    assert report.findings == []
    assert len(report.stochastic_layers) == 4


@pytest.mark.usefixtures("noise_registry")
def test_bad_groupings_and_library_hooks_are_refused() -> None:
    with pytest.raises(ValueError, match=r"grouping must be one of .* got 'row'"):
        register_stochastic(DropPath, grouping="row")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="grouping must be a mask grouping name or callable"):
        register_stochastic(DropPath, grouping=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="library must be a non-empty module name, got ''"):
        registry.register_library_noise("", list)
    with pytest.raises(TypeError, match="register must be callable"):
        registry.register_library_noise("timm", None)  # type: ignore[arg-type]
