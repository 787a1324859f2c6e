"""Zoo networks as lab architectures (``model.architecture = "zoo"``) and the image adaptation
they need (``data.image_size``, ``data.channels``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from varshift.data import SplitDataset
from varshift.lab import run_trial
from varshift.lab.config import ConfigError, TrialConfig, canonical_hash
from varshift.lab.models import build_model
from varshift.lab.zoo_nets import drop_path_keyword, torchvision_efficientnet

# A timm ResNet-18 small enough to build and train in a test.
TINY_RESNET = {"model.architecture": "zoo", "model.zoo": "timm:resnet18",
               "model.zoo_args": ["channels=(8, 8, 16, 16)"],
               "dropout.kind": "none"}


def _config(**changes: object) -> TrialConfig:
    return TrialConfig.from_dict({"data.dataset": "digits", **changes})


def _images(channels: int = 1, size: int = 8) -> SplitDataset:
    x = torch.randn(12, channels, size, size)
    y = torch.arange(12) % 3
    return SplitDataset("toy", "classification", x[:8], y[:8], x[8:], y[8:], 3,
                        (channels, size, size))


# -- configuration ------------------------------------------------------------------------------


def test_keys_added_later_stay_out_of_the_hash_at_their_default() -> None:
    config = _config()
    canonical = config.to_dict()
    for section, key in (("data", "image_size"), ("data", "channels"), ("model", "zoo"),
                         ("model", "zoo_args"), ("model", "drop_path_rate"),
                         ("measure", "predict_samples")):
        del canonical[section][key]
    # The hash of a configuration written before these keys existed: databases resume.
    assert config.config_hash() == canonical_hash(canonical)
    assert _config(**{"data.image_size": 16}).config_hash() != config.config_hash()
    assert _config(**{"measure.predict_samples": 8}).config_hash() != config.config_hash()


def test_zoo_architecture_needs_a_name_and_no_lab_dropout() -> None:
    with pytest.raises(ConfigError) as caught:
        _config(**{"model.architecture": "zoo"})
    problems = " | ".join(caught.value.problems)
    assert "model.zoo: architecture 'zoo' needs the network's name" in problems
    assert "dropout.kind: a zoo network keeps its own dropout" in problems


@pytest.mark.parametrize(("key", "value"), [("model.zoo", "timm:resnet18"),
                                        ("model.zoo_args", ["drop_rate=0.1"]),
                                        ("model.drop_path_rate", 0.1)])
def test_zoo_keys_are_refused_for_other_architectures(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{key}: used only by architecture 'zoo'"):
        _config(**{key: value})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.zoo", "resnet18", "expected 'timm:NAME'"),
    ("model.zoo_args", ["channels"], "must be KEY=VALUE"),
    ("model.zoo_args", [3], "expected a 'KEY=VALUE' text"),
    ("model.drop_path_rate", 1.0, "expected a number in [0, 1)"),
    ("data.image_size", 0, "expected an integer >= 1"),
])
def test_bad_zoo_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(**{**TINY_RESNET, key: value})
    assert any(problem.startswith(key) and message in problem
               for problem in caught.value.problems), caught.value.problems


# -- images -------------------------------------------------------------------------------------


def test_as_images_resizes_and_repeats_channels() -> None:
    data = _images()
    adapted = data.as_images(16, 3)
    assert adapted.input_shape == (3, 16, 16)
    assert adapted.x_train.shape == (8, 3, 16, 16)
    assert adapted.x_test.shape == (4, 3, 16, 16)
    torch.testing.assert_close(adapted.x_train[:, 0], adapted.x_train[:, 2])
    # Bilinear interpolation keeps a constant image constant and preserves the mean roughly.
    constant = SplitDataset("c", "classification", torch.full((2, 1, 8, 8), 0.7),
                            torch.tensor([0, 1]), torch.full((2, 1, 8, 8), 0.7),
                            torch.tensor([0, 1]), 2, (1, 8, 8)).as_images(32)
    torch.testing.assert_close(constant.x_test, torch.full((2, 1, 32, 32), 0.7))
    assert abs(float(adapted.x_train.mean()) - float(data.x_train.mean())) < 0.05
    assert adapted.meta["as_images"] == {"size": 16, "channels": 3}


def test_as_images_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="only a one-channel image can be repeated"):
        _images(channels=2).as_images(channels=3)
    with pytest.raises(ValueError, match="size must be a positive integer or None, got 0"):
        _images().as_images(0)
    flat = SplitDataset("f", "classification", torch.randn(4, 5), torch.tensor([0, 1, 0, 1]),
                        torch.randn(2, 5), torch.tensor([0, 1]), 2, (5,))
    with pytest.raises(ValueError, match=r"needs images \(C, H, W\)"):
        flat.as_images(8)


# -- building -----------------------------------------------------------------------------------


def test_drop_path_keyword_follows_the_library() -> None:
    assert drop_path_keyword("timm:resnet18") == "drop_path_rate"
    assert drop_path_keyword("torchvision:efficientnet_b0") == "stochastic_depth_prob"
    assert drop_path_keyword("varshift.lab.zoo_nets:torchvision_efficientnet") == \
        "stochastic_depth_prob"
    assert drop_path_keyword("torch.nn:Identity") is None


def test_scaled_efficientnet_at_one_is_torchvisions_b0() -> None:
    torchvision = pytest.importorskip("torchvision")
    ours = torchvision_efficientnet(num_classes=10)
    theirs = torchvision.models.efficientnet_b0(num_classes=10)
    assert [tuple(p.shape) for p in ours.parameters()] == \
        [tuple(p.shape) for p in theirs.parameters()]
    half = torchvision_efficientnet(width_mult=0.5, depth_mult=0.75, num_classes=10)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in ours.parameters())


def _rates(model: nn.Module) -> list[float]:
    return [float(m.p) for m in model.modules() if type(m).__name__ == "StochasticDepth"]


def test_a_zero_rate_is_passed_not_left_to_the_library_default() -> None:
    # torchvision's EfficientNets default to stochastic depth 0.2: rate 0 must switch it off.
    pytest.importorskip("torchvision")
    zoo = {"model.architecture": "zoo", "dropout.kind": "none",
           "model.zoo": "varshift.lab.zoo_nets:torchvision_efficientnet",
           "model.zoo_args": ["width_mult=0.25", "depth_mult=0.5"]}
    off = build_model(_config(**zoo), (3, 32, 32), 10)
    assert _rates(off)
    assert max(_rates(off)) == 0.0
    on = build_model(_config(**zoo, **{"model.drop_path_rate": 0.3}), (3, 32, 32), 10)
    # Rising linearly with depth to (just under) the configured rate, as torchvision does it.
    assert 0.0 < max(_rates(on)) <= 0.3
    assert _rates(on) == sorted(_rates(on))


def test_timm_network_gets_rate_classes_and_arguments() -> None:
    pytest.importorskip("timm")
    net = build_model(_config(**TINY_RESNET, **{"model.drop_path_rate": 0.2}), (3, 32, 32), 7)
    assert net.fc.out_features == 7
    assert net.layer1[0].conv1.out_channels == 8
    rates = [m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"]
    assert rates
    assert math.isclose(max(rates), 0.2)


@pytest.mark.parametrize(("changes", "message"), [
    ({"model.zoo_args": ["num_classes=3"]}, "num_classes is set by the lab"),
    ({"model.zoo_args": ["no_such_argument=1"]}, "no_such_argument"),
    ({"model.zoo": "timm:no_such_net_v9"}, "model.zoo: "),
])
def test_bad_zoo_networks_are_configuration_errors(changes: dict[str, object],
                                                   message: str) -> None:
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=message):
        build_model(_config(**{**TINY_RESNET, **changes}), (3, 32, 32), 10)


def test_a_network_that_cannot_take_the_data_says_which_key_to_change() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=r"cannot take samples of shape \(1, 8, 8\).*"
                                          r"data.image_size"):
        build_model(_config(**TINY_RESNET), (1, 8, 8), 10)


def test_a_zoo_trial_trains_measures_and_predicts() -> None:
    pytest.importorskip("timm")
    config = _config(**TINY_RESNET, **{
        "model.drop_path_rate": 0.3, "data.image_size": 32, "data.channels": 3,
        "data.train_size": 96, "data.test_size": 48, "train.epochs": 1,
        "measure.shift_samples": 48, "measure.predict_samples": 16})
    result = run_trial(config, 0)
    assert result.status == "done", result.traceback
    assert result.meta["input_shape"] == [3, 32, 32]
    assert {"recal_test_metric", "recal_test_loss"} <= set(result.final)
    predicted = [layer for layer in result.layer_shift if layer.predicted is not None]
    # Drop path feeds the BatchNorms after the first block; the stem's BatchNorm sees no noise.
    assert predicted
    assert result.layer_shift[0].predicted is None
    # timm zero-initialises each branch's last BatchNorm γ, so after one epoch the branches are
    # nearly silent and the shift nearly 1: a Monte Carlo estimate may exceed 1 by its error.
    assert all(0.0 < layer.predicted <= 1.0 + 1e-3 for layer in predicted)
