"""lint on real torchvision and timm architectures (random weights), against a dynamic check.

For each model, the BatchNorm layers lint flags must be exactly those whose input a forward
pass shows to change when the noise is switched on (:mod:`helpers.dynamic_check`): no missed
BatchNorm, no false positive. The models cover torchvision's StochasticDepth, timm's DropPath
and DropBlock, DenseNet's dropout before concatenation, classifier-only dropout, noise of rate
0, and models with no BatchNorm at all (ViTs, ConvNeXt), one of which fx cannot trace.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from helpers.dynamic_check import noise_fed_batchnorms
from helpers.models_zoo import BNDropoutBN, DropoutBNConvBN
from varshift.diagnose import lint

tvm = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

# torchvision's stochastic_depth is hidden from fx by torch.fx.wrap, and the noise of timm's
# DropPath/DropBlock has no rate without it: lint models them through helper Z1's
# registration (varshift.layers.zoo). Assertions that need it are marked NEEDS_ZOO_REGISTRY.
NEEDS_ZOO_REGISTRY = pytest.mark.skipif(
    importlib.util.find_spec("varshift.layers.zoo") is None,
    reason="needs the torchvision/timm noise registration of varshift.layers.zoo",
)


@dataclass(frozen=True)
class Arch:
    """A real architecture: how to build it, its example input shape, and whether noise reaches
    some BatchNorm (so that the comparison cannot pass by both sides finding nothing)."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    noise_reaches_bn: bool
    # lint's Monte Carlo predictions through a ReLU take 15 s and more on these models on one
    # core; fx traces them, so their verdict needs no example input and is checked without.
    predict: bool = True

    def example(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(1))


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, **kwargs)


SMALL = TINY = (2, 3, 32, 32)
ARCHS = (
    Arch("tv_efficientnet_b0", lambda: tvm.efficientnet_b0(), SMALL, True),
    Arch("tv_efficientnet_b0_rate0", lambda: tvm.efficientnet_b0(stochastic_depth_prob=0.0),
         SMALL, False),
    Arch("timm_resnet26d_drop_path", _timm("resnet26d", drop_path_rate=0.1), SMALL, True,
         predict=False),
    Arch("timm_resnet50_drop_path", _timm("resnet50", drop_path_rate=0.1), SMALL, True,
         predict=False),
    Arch("timm_efficientnet_b0_drop_path", _timm("efficientnet_b0", drop_path_rate=0.2), SMALL,
         True),
    Arch("timm_regnety_002_drop_path", _timm("regnety_002", drop_path_rate=0.1), SMALL, True,
         predict=False),
    Arch("tv_densenet121_dropout", lambda: tvm.densenet121(drop_rate=0.2), TINY, True),
    # 64x64: on 32x32 inputs layer4's feature map is 1x1 and one draw of DropBlock may drop
    # nothing there, which the dynamic check would read as "not fed by noise".
    Arch("timm_resnet18_dropblock", _timm("resnet18", drop_block_rate=0.2), (2, 3, 64, 64),
         True),
    Arch("timm_vit_tiny", _timm("vit_tiny_patch16_224", img_size=32, drop_rate=0.1,
                                drop_path_rate=0.1), TINY, False),
    Arch("timm_convnext_nano", _timm("convnext_nano", drop_path_rate=0.1), SMALL, False),
    Arch("tv_mobilenet_v3_small_rate0", lambda: tvm.mobilenet_v3_small(dropout=0.0), SMALL,
         False),
    Arch("tv_mobilenet_v2", lambda: tvm.mobilenet_v2(), SMALL, False),
    Arch("tv_mnasnet0_5", lambda: tvm.mnasnet0_5(), SMALL, False),
)
NEEDS_REGISTRY = {"tv_efficientnet_b0"}  # fx cannot see torchvision's noise without it


def _params(archs: tuple[Arch, ...]) -> list[object]:
    return [
        pytest.param(a, id=a.name, marks=[NEEDS_ZOO_REGISTRY] if a.name in NEEDS_REGISTRY else [])
        for a in archs
    ]


@pytest.mark.parametrize("arch", _params(ARCHS))
def test_lint_flags_exactly_the_batchnorms_the_dynamic_check_finds(arch: Arch) -> None:
    model, x = arch.build(), arch.example()
    fed = noise_fed_batchnorms(model, x)
    report = lint(model, x) if arch.predict else lint(model)
    assert set(report.flagged) == fed
    assert bool(fed) is arch.noise_reaches_bn
    assert set(report.batchnorms) >= fed


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("timm_efficientnet_b0_drop_path", marks=pytest.mark.slow),  # 15 s
        "tv_densenet121_dropout",
    ],
)
def test_fx_and_hooks_give_the_same_answer(name: str) -> None:
    arch = next(a for a in ARCHS if a.name == name)
    model, x = arch.build(), arch.example()
    by_fx, by_hooks = lint(model, x, method="fx"), lint(model, x, method="hooks")
    assert (by_fx.method, by_hooks.method) == ("fx", "hooks")
    assert by_fx.flagged == by_hooks.flagged
    pairs = {(f.bn, f.source) for f in by_fx.findings}
    assert pairs == {(f.bn, f.source) for f in by_hooks.findings}


@pytest.mark.slow
def test_a_vit_fx_cannot_trace_falls_back_to_hooks_with_no_batchnorm_finding() -> None:
    model, x = tvm.vit_b_16(image_size=32, dropout=0.1), torch.randn(TINY)
    report = lint(model, x)
    assert report.method == "hooks"
    assert any("torch.fx could not trace" in note for note in report.notes)
    assert report.ok
    assert report.batchnorms == []
    assert any(layer.rate == pytest.approx(0.1) for layer in report.stochastic_layers)
    assert noise_fed_batchnorms(model, x) == set()


@NEEDS_ZOO_REGISTRY
@pytest.mark.parametrize("arch", _params(tuple(a for a in ARCHS if a.noise_reaches_bn)))
def test_every_finding_of_a_registered_kind_has_a_rate_and_a_prediction(arch: Arch) -> None:
    # NEEDS_ZOO_REGISTRY: DropPath/DropBlock/StochasticDepth findings carry no rate before Z1.
    # A shift of 1 is right at random init where timm zero-initializes the last BatchNorm of
    # each residual branch (the dropped branch is 0), hence <= 1 and not < 1.
    model = arch.build()
    report = lint(model, arch.example()) if arch.predict else lint(model)
    assert report.findings
    assert all(f.noise is not None for f in report.findings)
    for finding in report.findings:
        assert finding.rate is not None
        assert finding.rate > 0
        assert finding.predicted_shift is not None
        assert 0 < finding.predicted_shift <= 1 + 1e-9
    for prediction in report.predictions.values():
        assert prediction.shift is not None
        assert 0 < prediction.shift <= 1 + 1e-9


@NEEDS_ZOO_REGISTRY
def test_stochastic_depth_of_rate_zero_is_listed_but_feeds_nothing() -> None:
    report = lint(tvm.efficientnet_b0(stochastic_depth_prob=0.0), torch.randn(SMALL))
    depth = [s for s in report.stochastic_layers if s.type_name == "StochasticDepth"]
    assert depth
    assert all(s.rate == 0 and s.feeds == () for s in depth)
    assert report.ok


@pytest.mark.slow
def test_inception_v3_training_forward_failure_is_one_line_naming_the_input() -> None:
    model = tvm.inception_v3(init_weights=False, aux_logits=True)
    with pytest.raises(ValueError) as caught:
        lint(model, torch.randn(2, 3, 96, 96))
    message = str(caught.value)
    assert "\n" not in message
    assert "training-mode forward failed on example_inputs of shape (2, 3, 96, 96)" in message
    assert "Output size is too small" in message
    assert "eval-mode forward succeeds" in message
    assert "larger example input" in message


# -- the dynamic check itself ------------------------------------------------------------------


def test_dynamic_check_finds_the_batchnorm_behind_the_noise_and_not_the_one_before() -> None:
    assert noise_fed_batchnorms(BNDropoutBN(), torch.randn(16, 8)) == {"bn2"}
    assert noise_fed_batchnorms(DropoutBNConvBN(), torch.randn(4, 3, 8, 8)) == {"bn1"}


def test_dynamic_check_sees_no_noise_of_rate_zero_and_leaves_the_model_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.BatchNorm1d(4))
    assert noise_fed_batchnorms(model, torch.randn(8, 4)) == set()
    noisy = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.BatchNorm1d(4)).eval()
    weight = noisy[2].weight.detach().clone()
    assert noise_fed_batchnorms(noisy, torch.randn(8, 4)) == {"2"}
    assert noisy[1].p == 0.1
    assert not noisy.training
    assert torch.equal(noisy[2].weight, weight)
