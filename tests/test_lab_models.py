"""build_model: layer orders, shapes, norms, dropout kinds, DenseNet and autoencoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from varshift import layers
from varshift.lab.config import ConfigError, TrialConfig
from varshift.lab.models import build_model

# The ten orderings of conv, BN, activation, dropout and pooling compared in the issue.
TEN_ORDERINGS = [
    "conv-act-drop-bn-pool",
    "conv-act-drop-pool-bn",
    "conv-act-bn-pool-drop",
    "conv-act-bn-drop-pool",
    "conv-bn-act-drop-pool",
    "conv-bn-act-pool-drop",
    "conv-bn-drop-act-pool",
    "conv-drop-act-bn-pool",
    "conv-drop-act-pool-bn",
    "conv-drop-bn-act-pool",
]
NAMES = {"conv": "conv", "bn": "norm", "act": "act", "drop": "drop", "pool": "pool"}


def config(**changes: Any) -> TrialConfig:
    base = {"data.dataset": "digits", "model.widths": [4, 8], "model.padding": "valid",
            "dropout.rate": 0.25}
    return TrialConfig.from_dict({**base, **{k.replace("__", "."): v
                                             for k, v in changes.items()}})


@pytest.mark.parametrize("order", TEN_ORDERINGS)
@pytest.mark.parametrize(("input_shape", "after_blocks"), [
    ((1, 28, 28), (8, 5, 5)),  # 28 → conv3 valid 26 → pool 13 → conv3 11 → pool 5
    ((1, 40), (8, 8)),  # 40 → 38 → 19 → 17 → 8
])
def test_ten_orderings_build_with_the_right_shapes(
        order: str, input_shape: tuple[int, ...], after_blocks: tuple[int, ...]) -> None:
    model = build_model(config(model__order=order), input_shape, 10)
    x = torch.randn(3, *input_shape)
    assert model.blocks(x).shape == (3, *after_blocks)
    assert model(x).shape == (3, 10)
    for i in range(2):
        block_names = [name for name, _ in model.blocks[i].named_children()]
        assert block_names == [NAMES[token] for token in order.split("-")]
    two_d = len(input_shape) == 3
    assert isinstance(model.blocks[0].conv, nn.Conv2d if two_d else nn.Conv1d)
    norm = model.get_submodule("blocks.1.norm")
    assert isinstance(norm, nn.BatchNorm2d if two_d else nn.BatchNorm1d)
    # A norm before the conv would see its input channels; every norm here follows the conv.
    assert norm.num_features == 8


def test_mlp_from_linear_orders() -> None:
    model = build_model(config(model__order="linear-bn-act-drop", model__widths=[16, 8],
                               model__head_hidden=[6], dropout__head_rate=0.1,
                               dropout__head_at="before_output"), (10,), 1)
    names = [name for name, _ in model.named_modules()]
    for name in ("blocks.0.linear", "blocks.0.norm", "blocks.0.act", "blocks.0.drop",
                 "head.hidden.0", "head.drop", "head.out"):
        assert name in names
    assert isinstance(model.get_submodule("blocks.0.norm"), nn.BatchNorm1d)
    assert model(torch.randn(5, 10)).shape == (5, 1)
    head = [name for name, _ in model.head.named_children()]
    assert head == ["flatten", "hidden", "drop", "out"]


def test_linear_blocks_flatten_images_and_head_dropout_before_hidden() -> None:
    model = build_model(config(model__order=["conv-bn-act-pool", "linear-bn-act-drop"],
                               model__head_hidden=[6], dropout__head_rate=0.1,
                               dropout__head_at="before_hidden"), (1, 8, 8), 10)
    assert model.blocks[1].linear.in_features == 4 * 3 * 3
    assert [name for name, _ in model.head.named_children()] == ["flatten", "drop", "hidden",
                                                                   "out"]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_conv_order_on_tabular_data_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        build_model(config(), (10,), 1)
    assert info.value.problems == [
        "model.order: block 0 is a conv block but its input has no channel/position axes "
        "(tabular data or after a linear block); use 'linear' blocks"]


def test_valid_padding_that_empties_the_map_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"shrinks to nothing at blocks\.1\.pool"):
        build_model(config(), (1, 8, 8), 10)


@pytest.mark.parametrize(("norm", "two_d", "flat"), [
    ("batch", nn.BatchNorm2d, nn.BatchNorm1d),
    ("layer", nn.GroupNorm, nn.LayerNorm),
    ("group", nn.GroupNorm, nn.GroupNorm),
    ("instance", nn.InstanceNorm2d, None),
    ("none", None, None),
])
def test_norm_kinds(norm: str, two_d: type[nn.Module] | None,
                    flat: type[nn.Module] | None) -> None:
    settings = {"model__norm": norm, "model__norm_groups": 2, "model__norm_gamma": 0.5,
                "model__norm_beta": 0.25, "model__norm_eps": 1e-3, "model__norm_momentum": 0.01}
    model = build_model(config(model__padding="same", **settings), (1, 8, 8), 10)
    model(torch.randn(2, 1, 8, 8))
    layer = dict(model.named_modules()).get("blocks.0.norm")
    assert (layer is None) == (two_d is None)
    if two_d is not None:
        assert isinstance(layer, two_d)
        assert torch.all(layer.weight == 0.5)
        assert torch.all(layer.bias == 0.25)
        assert layer.eps == 1e-3
    if norm == "layer":
        assert layer.num_groups == 1
    if norm in ("batch", "instance"):
        assert layer.momentum == 0.01
    if flat is not None:
        mlp = build_model(config(model__order="linear-bn-act", **settings), (10,), 1)
        assert isinstance(mlp.get_submodule("blocks.0.norm"), flat)


def test_group_norm_must_divide_the_channels() -> None:
    with pytest.raises(ConfigError, match=r"model\.norm_groups: 3 groups do not divide the 4 "
                                          r"channels at blocks\.0\.norm"):
        build_model(config(model__padding="same", model__norm="group", model__norm_groups=3),
                    (1, 8, 8), 10)


@pytest.mark.parametrize(("kind", "two_d", "one_d"), [
    ("dropout", nn.Dropout, nn.Dropout),
    ("dropout2d", nn.Dropout2d, nn.Dropout1d),
    ("alpha", nn.AlphaDropout, nn.AlphaDropout),
    ("gaussian", layers.GaussianDropout, layers.GaussianDropout),
    ("uout", layers.Uout, layers.Uout),
    ("classic", layers.ClassicDropout, layers.ClassicDropout),
    ("variance_stable", layers.VarianceStableDropout, layers.VarianceStableDropout),
    ("dropblock", layers.DropBlock2d, None),
])
def test_dropout_kinds(kind: str, two_d: type[nn.Module],
                       one_d: type[nn.Module] | None) -> None:
    cfg = config(model__padding="same", dropout__kind=kind)
    model = build_model(cfg, (1, 8, 8), 10)
    drop = model.get_submodule("blocks.0.drop")
    assert isinstance(drop, two_d)
    assert getattr(drop, "beta" if kind == "uout" else "p") == 0.25
    model.train()
    assert torch.isfinite(model(torch.randn(4, 1, 8, 8))).all()
    if one_d is None:
        with pytest.raises(ConfigError, match="'dropblock' needs 2-D maps"):
            build_model(cfg, (1, 40), 10)
    else:
        assert isinstance(build_model(cfg, (1, 40), 10).get_submodule("blocks.0.drop"), one_d)


def test_dropconnect_turns_the_weight_layer_of_blocks_with_a_drop_token() -> None:
    cfg = config(model__padding="same", dropout__kind="dropconnect",
                 model__order=["conv-bn-act-drop-pool", "conv-bn-act-pool"])
    model = build_model(cfg, (1, 8, 8), 10)
    assert isinstance(model.blocks[0].conv, layers.DropConnectConv2d)
    assert model.blocks[0].conv.p == 0.25
    assert type(model.blocks[1].conv) is nn.Conv2d
    assert "drop" not in dict(model.blocks[0].named_children())
    mlp = build_model(cfg.updated({"model.order": "linear-bn-act-drop"}), (10,), 1)
    assert isinstance(mlp.blocks[0].linear, layers.DropConnectLinear)
    with pytest.raises(ConfigError, match="'dropconnect' supports linear and 2-D conv"):
        build_model(cfg, (1, 40), 10)


def test_zero_rate_adds_no_dropout_layer() -> None:
    model = build_model(config(model__padding="same", dropout__rate=[0.0, 0.5]), (1, 8, 8), 10)
    assert "drop" not in dict(model.blocks[0].named_children())
    assert model.blocks[1].drop.p == 0.5


@pytest.mark.parametrize(("input_shape", "pool"), [((1, 16, 16), nn.AdaptiveAvgPool2d),
                                                   ((1, 40), nn.AdaptiveAvgPool1d)])
def test_densenet(input_shape: tuple[int, ...], pool: type[nn.Module]) -> None:
    cfg = config(model__architecture="densenet", model__growth=4, model__dense_layers=[2, 3],
                 model__bottleneck=2)
    model = build_model(cfg, input_shape, 10)
    layer = model.get_submodule("blocks.0.layers.0")
    assert [name for name, _ in layer.named_children()] == [
        "norm1", "act1", "conv1", "drop1", "norm2", "act2", "conv2", "drop2"]
    x = torch.randn(2, *input_shape)
    stem = model.stem(x)
    assert stem.shape[1] == 8
    assert layer(stem).shape[1] == 8 + 4  # the layer's 4 new channels are concatenated
    # Block 0: 8 + 2·4 = 16 channels, compressed to 8 by the transition; block 1: 8 + 3·4.
    assert model.blocks[0].transition.conv.out_channels == 8
    assert isinstance(model.neck.pool, pool)
    assert model.neck.norm.num_features == 20
    assert model(x).shape == (2, 10)


def test_sparse_autoencoder() -> None:
    cfg = config(data__task="autoencoding", model__order="linear-bn-act", model__widths=[12],
                 model__activation="sigmoid", autoencoder__sparsity_weight=0.1)
    model = build_model(cfg, (1, 8, 8), 10)
    x = torch.randn(3, 1, 8, 8)
    code = model.encode(x)
    assert code.shape == (3, 12)
    assert torch.all((code > 0) & (code < 1))
    assert model(x).shape == x.shape
    assert isinstance(model.blocks[0].norm, nn.BatchNorm1d)


def test_same_seed_same_initialisation() -> None:
    torch.manual_seed(3)
    a = build_model(config(model__padding="same"), (1, 8, 8), 10)
    torch.manual_seed(3)
    b = build_model(config(model__padding="same"), (1, 8, 8), 10)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model(config(), (1, 2, 3, 4), 10)
    with pytest.raises(ValueError, match="num_outputs must be a positive integer"):
        build_model(config(), (1, 8, 8), 0)
    with pytest.raises(TypeError, match="config must be a TrialConfig"):
        build_model({"data.dataset": "digits"}, (1, 8, 8), 10)  # type: ignore[arg-type]
