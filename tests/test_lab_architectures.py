"""The CIFAR builders: shapes, parameter counts against the papers, where dropout sits (read by
varshift.diagnose.lint), and their wiring into the lab's configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from varshift.diagnose import lint
from varshift.lab.architectures import (
    BlockNet,
    PreActBlock,
    densenet_cifar,
    densenet_cifar_layers,
    preact_resnet,
    wide_resnet,
)
from varshift.lab.config import ConfigError, TrialConfig
from varshift.lab.models import build_model

Builder = Callable[..., BlockNet]
# Small members of each family, so that forward passes stay fast on a CPU.
SMALL: list[tuple[Builder, dict[str, Any]]] = [
    (preact_resnet, {"depth": 10, "width_factor": 1}),
    (wide_resnet, {"depth": 10, "width_factor": 1}),
    (densenet_cifar, {"depth": 16, "growth": 4}),
]
IDS = ["preact_resnet", "wide_resnet", "densenet_cifar"]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("build", "kwargs"), SMALL, ids=IDS)
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shape(build: Builder, kwargs: dict[str, Any], classes: int) -> None:
    model = build(num_classes=classes, p=0.3, **kwargs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)


@pytest.mark.parametrize(("build", "kwargs", "expected"), [
    # The papers' and their reference code's counts (CIFAR-10 heads).
    (preact_resnet, {}, 11_172_170),  # PreAct-ResNet-18: "11.2M"
    (wide_resnet, {}, 36_479_194),  # WRN-28-10: "36.5M"
    (wide_resnet, {"depth": 16, "width_factor": 4}, 2_748_890),  # WRN-16-4: "2.7M"
    (densenet_cifar, {}, 769_162),  # DenseNet-BC-100, k = 12: "0.8M"
], ids=["preact18", "wrn28-10", "wrn16-4", "densenet-bc100"])
def test_parameter_counts(build: Builder, kwargs: dict[str, Any], expected: int) -> None:
    with torch.device("meta"):  # nothing allocated: these are the full-size networks
        model = build(**kwargs)
    assert _count(model) == expected


def test_wider_and_deeper_means_more_parameters() -> None:
    with torch.device("meta"):
        counts = [_count(wide_resnet(depth=d, width_factor=k))
                  for d, k in ((10, 1), (16, 1), (16, 4), (28, 10))]
        assert counts == sorted(counts)
        assert _count(preact_resnet(34)) > _count(preact_resnet(18)) > _count(preact_resnet(10))


@pytest.mark.parametrize(("build", "kwargs"), SMALL, ids=IDS)
def test_dropout_position_inside_feeds_batchnorm(build: Builder, kwargs: dict[str, Any]) -> None:
    inside = lint(build(p=0.3, dropout_at="inside", **kwargs))
    drops = [name for name, m in inside_modules(build, kwargs) if isinstance(m, nn.Dropout)]
    assert not inside.ok
    # Every dropout layer inside the blocks reaches a BatchNorm.
    assert {layer.name for layer in inside.stochastic_layers if layer.feeds} == set(drops)
    classifier = lint(build(p=0.3, dropout_at="classifier", **kwargs))
    assert classifier.ok, classifier.flagged
    assert [layer.name for layer in classifier.stochastic_layers] == ["head.drop"]
    assert not classifier.stochastic_layers[0].feeds


def inside_modules(build: Builder, kwargs: dict[str, Any]) -> list[tuple[str, nn.Module]]:
    return list(build(p=0.3, dropout_at="inside", **kwargs).named_modules())


def test_residual_dropout_sits_between_the_convolutions() -> None:
    model = wide_resnet(depth=10, width_factor=1, p=0.3)
    report = lint(model)
    assert report.flagged == ["blocks.0.0.norm2", "blocks.1.0.norm2", "blocks.2.0.norm2"]
    block = model.get_submodule("blocks.1.0")
    assert isinstance(block, PreActBlock)
    assert [name for name, _ in block.named_children()] == [
        "norm1", "act1", "conv1", "drop", "norm2", "act2", "conv2", "shortcut"]
    # A block that keeps width and size adds its input unchanged (16 -> 16·k channels: k = 1
    # keeps them); the first block of a later stage strides and projects.
    assert model.get_submodule("blocks.0.0").shortcut is None
    assert wide_resnet(depth=10, width_factor=2).get_submodule("blocks.0.0").shortcut is not None
    assert block.conv1.stride == (2, 2)
    assert model.stem is not None
    stem = model.stem(torch.randn(2, 3, 32, 32))
    assert model.blocks[0](stem).shape == (2, 16, 32, 32)
    assert model.blocks[:2](stem).shape == (2, 32, 16, 16)


def test_densenet_dropout_reaches_norms_through_the_concatenation() -> None:
    report = lint(densenet_cifar(depth=10, growth=4, p=0.2))
    # drop1 feeds norm2 directly; drop2's output is concatenated into the transition's norm.
    assert "blocks.0.layers.0.norm2" in report.flagged
    assert "blocks.0.transition.norm" in report.flagged
    sources = {f.source for f in report.findings if f.bn == "blocks.0.transition.norm"}
    assert "blocks.0.layers.0.drop2" in sources


def test_no_dropout_layers_without_a_rate() -> None:
    for build, kwargs in SMALL:
        model = build(**kwargs)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(("call", "message"), [
    (lambda: preact_resnet(depth=20), "PreAct-ResNet depth must be one of 10, 18, 34"),
    (lambda: wide_resnet(depth=20), r"6n \+ 4"),
    (lambda: densenet_cifar(depth=101), r"DenseNet-BC depth must be 6n \+ 4"),
    (lambda: wide_resnet(depth=16, width_factor=0), "width_factor must be a positive"),
    (lambda: preact_resnet(p=1.0), r"p must be a number in \[0, 1\), got 1.0"),
    (lambda: preact_resnet(dropout_at="after"), "dropout_at must be one of inside, classifier"),
    (lambda: wide_resnet(depth=True), "depth must be an integer"),
])
def test_bad_arguments(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_densenet_layers_from_depth() -> None:
    assert densenet_cifar_layers(100) == (16, 16, 16)
    assert densenet_cifar_layers(10) == (1, 1, 1)


# -- the lab's configuration ---------------------------------------------------------------------


def lab_config(**changes: Any) -> TrialConfig:
    return TrialConfig.from_dict({"data.dataset": "cifar10",
                                  **{k.replace("__", "."): v for k, v in changes.items()}})


def test_lab_defaults_are_the_papers_networks_and_are_stored() -> None:
    preact = lab_config(model__architecture="preact_resnet")
    assert (preact.model.depth, preact.model.width_factor) == (18, 4)
    # Absent and explicit spell the same network, so they hash alike.
    explicit = lab_config(model__architecture="preact_resnet", model__depth=18,
                          model__width_factor=4)
    assert preact.config_hash() == explicit.config_hash()
    wrn = lab_config(model__architecture="wide_resnet")
    assert (wrn.model.depth, wrn.model.width_factor) == (28, 10)
    dense = lab_config(model__architecture="densenet_cifar")
    assert (dense.model.depth, dense.model.width_factor) == (100, None)
    with torch.device("meta"):
        assert _count(build_model(preact, (3, 32, 32), 10)) == 11_172_170
        assert _count(build_model(dense, (3, 32, 32), 10)) == 769_162


def test_lab_config_problems() -> None:
    with pytest.raises(ConfigError) as info:
        lab_config(model__depth=18)
    assert "model.depth: used only by architecture preact_resnet or wide_resnet or " \
        "densenet_cifar; 'plain' does not use it" in info.value.problems
    with pytest.raises(ConfigError, match=r"model\.width_factor: used only by"):
        lab_config(model__architecture="densenet_cifar", model__width_factor=2)
    with pytest.raises(ConfigError, match=r"model.depth: Wide-ResNet depth must be 6n \+ 4"):
        lab_config(model__architecture="wide_resnet", model__depth=12)
    with pytest.raises(ConfigError, match=r"dropout.rate: 2 values for 3 blocks \(the stages "
                                          r"of wide_resnet\)"):
        lab_config(model__architecture="wide_resnet", dropout__rate=[0.1, 0.2])
    with pytest.raises(ConfigError, match="'wide_resnet' needs sequences or images"):
        build_model(lab_config(model__architecture="wide_resnet", model__depth=10), (10,), 1)


def test_lab_layers_follow_the_configuration() -> None:
    cfg = lab_config(model__architecture="wide_resnet", model__depth=10, model__width_factor=1,
                     model__norm_momentum=0.01, model__norm_eps=1e-3, model__activation="elu",
                     dropout__kind="uout", dropout__rate=[0.1, 0.2, 0.3])
    model = build_model(cfg, (3, 32, 32), 10)
    norm = model.get_submodule("blocks.2.0.norm2")
    assert isinstance(norm, nn.BatchNorm2d)
    assert (norm.momentum, norm.eps) == (0.01, 1e-3)
    assert isinstance(model.get_submodule("blocks.0.0.act1"), nn.ELU)
    # Rates are per stage.
    assert [model.get_submodule(f"blocks.{s}.0.drop").beta for s in range(3)] == [0.1, 0.2, 0.3]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lab_dropout_before_the_classifier_only() -> None:
    cfg = lab_config(model__architecture="preact_resnet", model__depth=10, model__width_factor=1,
                     dropout__kind="none", dropout__head_rate=0.3,
                     dropout__head_at="before_output")
    model = build_model(cfg, (3, 32, 32), 10)
    report = lint(model)
    assert report.ok
    assert [layer.name for layer in report.stochastic_layers] == ["head.drop"]


def test_lab_dropconnect_and_sequences() -> None:
    cfg = lab_config(model__architecture="preact_resnet", model__depth=10, model__width_factor=1,
                     dropout__kind="dropconnect", dropout__rate=0.2)
    model = build_model(cfg, (3, 32, 32), 10)
    noisy = [name for name, m in model.named_modules() if type(m).__name__ == "DropConnectConv2d"]
    # The conv before each dropout position (conv1 of every block) carries the noise instead.
    assert noisy == [f"blocks.{s}.0.conv1" for s in range(4)]
    seq = lab_config(data__dataset="mnist1d", model__architecture="densenet_cifar",
                     model__depth=10, model__growth=4)
    assert build_model(seq, (1, 40), 10)(torch.randn(2, 1, 40)).shape == (2, 10)
