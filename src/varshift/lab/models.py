"""Build the network a :class:`~varshift.lab.config.TrialConfig` describes.

One layer-order string per block lays out a 1-D conv net for sequences ``(N, C, L)``, a 2-D conv
net for images ``(N, C, H, W)`` or an MLP for features ``(N, F)``: ``conv`` is Conv1d or Conv2d
by the input's rank, ``linear`` flattens what comes in. Modules get readable names
(``blocks.0.conv``, ``blocks.0.norm``, ``blocks.0.drop``, ``head.hidden.0``, ``head.out``) so that
per-layer variance-shift tables read well.

``architecture = "densenet"`` builds a small DenseNet (Huang et al. 2017) as used by Li et al.
(CVPR 2019) to place dropout inside dense layers: every layer is norm-act-conv1x1-drop-
norm-act-conv3-drop and its output is concatenated to its input. ``preact_resnet``,
``wide_resnet`` and ``densenet_cifar`` are the papers' CIFAR networks
(:mod:`varshift.lab.architectures`), with the configured norm, activation and dropout kind;
``dropout.rate`` is their dropout inside the blocks, ``dropout.head_*`` the one before the
classifier.

``architecture = "zoo"`` is a timm or torchvision network (:mod:`varshift.lab.zoo_nets`).

``task = "autoencoding"`` builds a sparse autoencoder: the blocks are the encoder (their output
is the code), one linear layer decodes.

Problems that depend on the input's shape (a conv block on tabular data, a valid-padding conv
that shrinks a map to nothing, DropBlock on sequences) raise
:class:`~varshift.lab.config.ConfigError` with the configuration key to change.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from varshift.lab.architectures import (
    DEFAULT_DEPTH,
    DEFAULT_WIDTH_FACTOR,
    BlockNet,
    DenseLayer,
    Parts,
    densenet_cifar_layers,
    densenet_parts,
    named_sequential,
    preact_resnet_parts,
    same_padding,
    wide_resnet_parts,
)
from varshift.lab.config import (
    ConfigError,
    DropoutConfig,
    ModelConfig,
    TrialConfig,
    head_dropout_kind,
    order_tokens,
    per_block,
)
from varshift.lab.zoo_nets import build_zoo_model
from varshift.layers import (
    ClassicDropout,
    DropBlock2d,
    DropConnectConv2d,
    DropConnectLinear,
    GaussianDropout,
    Uout,
    VarianceStableDropout,
)

__all__ = ["BlockNet", "DenseLayer", "SparseAutoencoder", "build_model"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


@dataclass(frozen=True)
class _Shape:
    """A sample's shape as the builder tracks it: channels (or features) and spatial sizes
    (empty once flattened)."""

    channels: int
    spatial: tuple[int, ...]

    @property
    def rank(self) -> int:
        """0 for feature vectors, 1 for sequences, 2 for images."""
        return len(self.spatial)

    @property
    def features(self) -> int:
        return self.channels * math.prod(self.spatial)


class _Builder:
    """Creates layers for one configuration, collecting every shape problem before raising."""

    def __init__(self, config: TrialConfig) -> None:
        self.config = config
        self.model: ModelConfig = config.model
        self.dropout: DropoutConfig = config.dropout
        self.problems: list[str] = []
        self.shrunk = False

    # -- single layers -------------------------------------------------------------------------
    def activation(self, name: str | None = None) -> nn.Module:
        return _ACTIVATIONS[name or self.model.activation]()

    def norm(self, shape: _Shape, where: str) -> nn.Module | None:
        """The configured norm for ``shape``'s channels, γ and β set to their initial values."""
        model, channels, rank = self.model, shape.channels, shape.rank
        layer: nn.Module
        if model.norm == "none":
            return None
        if model.norm == "batch":
            cls = nn.BatchNorm2d if rank == 2 else nn.BatchNorm1d
            layer = cls(channels, eps=model.norm_eps, momentum=model.norm_momentum)
        elif model.norm == "layer" and rank == 0:
            layer = nn.LayerNorm(channels, eps=model.norm_eps)
        elif model.norm == "layer":
            # One group = normalise over channels and positions, per-channel affine: the usual
            # "layer norm" of conv nets, which nn.LayerNorm cannot express without permutes.
            layer = nn.GroupNorm(1, channels, eps=model.norm_eps)
        elif model.norm == "group":
            if channels % model.norm_groups:
                self.problems.append(f"model.norm_groups: {model.norm_groups} groups do not "
                                     f"divide the {channels} channels at {where}")
                return None
            layer = nn.GroupNorm(model.norm_groups, channels, eps=model.norm_eps)
        else:  # instance
            if rank == 0:
                self.problems.append(f"model.norm: instance norm needs conv feature maps, "
                                     f"{where} sees flat features")
                return None
            cls_i = nn.InstanceNorm2d if rank == 2 else nn.InstanceNorm1d
            layer = cls_i(channels, eps=model.norm_eps, momentum=model.norm_momentum,
                          affine=True)
        with torch.no_grad():
            layer.weight.fill_(model.norm_gamma)
            layer.bias.fill_(model.norm_beta)
        return layer

    def drop(self, kind: str, rate: float, rank: int, where: str) -> nn.Module | None:
        """The dropout layer of ``kind`` for maps of ``rank``; ``None`` when it adds no layer
        (rate 0, kind ``none``, or DropConnect, whose noise lives in the weight layer)."""
        if rate == 0 or kind in ("none", "dropconnect"):
            return None
        if kind in ("dropout2d", "dropblock") and rank == 0:
            self.problems.append(f"dropout.kind: {kind!r} drops whole feature maps and needs "
                                 f"conv maps; {where} sees flat features")
            return None
        if kind == "dropblock" and rank != 2:
            self.problems.append("dropout.kind: 'dropblock' needs 2-D maps (images), not "
                                 "sequences")
            return None
        factories: dict[str, type[nn.Module]] = {
            "dropout": nn.Dropout,
            "alpha": nn.AlphaDropout,
            "dropout2d": nn.Dropout2d if rank == 2 else nn.Dropout1d,
            "gaussian": GaussianDropout,
            "classic": ClassicDropout,
            "variance_stable": VarianceStableDropout,
        }
        if kind == "uout":
            return Uout(beta=rate)
        if kind == "dropblock":
            return DropBlock2d(p=rate, block_size=self.dropout.block_size)
        return factories[kind](p=rate)

    def weight_layer(self, token: str, shape: _Shape, width: int, drop_connect: float,
                     where: str, *, kernel: int | None = None, padding: str | None = None,
                     stride: int = 1, bias: bool = True) -> tuple[nn.Module, _Shape]:
        """A conv (by ``shape``'s rank) or linear layer with ``width`` outputs; a DropConnect
        layer when ``drop_connect`` > 0. Returns the layer and its output shape."""
        if token == "linear":
            linear = nn.Linear(shape.features, width, bias=bias)
            if drop_connect > 0:
                return DropConnectLinear.from_module(linear, drop_connect), _Shape(width, ())
            return linear, _Shape(width, ())
        kernel = kernel or self.model.kernel_size
        padding = padding or self.model.padding
        pad = 0 if padding == "valid" else same_padding(kernel, stride)
        cls = nn.Conv2d if shape.rank == 2 else nn.Conv1d
        conv: nn.Conv1d | nn.Conv2d = cls(shape.channels, width, kernel, stride=stride,
                                          padding=pad, bias=bias)
        spatial = shape.spatial
        if padding == "valid":
            spatial = self.check_size(tuple((size - kernel) // stride + 1 for size in spatial),
                                      f"{where} (kernel {kernel}, valid padding)")
        elif stride > 1:
            spatial = tuple(-(-size // stride) for size in spatial)
        if drop_connect > 0:
            if not isinstance(conv, nn.Conv2d):
                self.problems.append("dropout.kind: 'dropconnect' supports linear and 2-D conv "
                                     "layers, not the 1-D convs of sequence models")
            else:
                conv = DropConnectConv2d.from_module(conv, drop_connect)
        return conv, _Shape(width, spatial)

    def pool(self, shape: _Shape, where: str, *, kind: str | None = None,
             size: int | None = None) -> tuple[nn.Module, _Shape]:
        kind = kind or self.model.pool
        size = size or self.model.pool_size
        two_d = shape.rank == 2
        layer: nn.Module
        if kind == "max":
            layer = nn.MaxPool2d(size) if two_d else nn.MaxPool1d(size)
        else:
            layer = nn.AvgPool2d(size) if two_d else nn.AvgPool1d(size)
        spatial = self.check_size(tuple(s // size for s in shape.spatial),
                                  f"{where} (pool size {size})")
        return layer, replace(shape, spatial=spatial)

    def check_size(self, spatial: tuple[int, ...], where: str) -> tuple[int, ...]:
        """``spatial``, clamped to 1 after reporting the first layer that empties the map (so
        later layers are still built and checked for other problems)."""
        if any(size < 1 for size in spatial) and not self.shrunk:
            self.shrunk = True
            self.problems.append(f"model.widths: the feature map shrinks to nothing at {where}; "
                                 "use fewer blocks, padding = 'same' or fewer pools")
        return tuple(max(size, 1) for size in spatial)

    def raise_problems(self, input_shape: Sequence[int]) -> None:
        if self.problems:
            raise ConfigError(self.problems, what=f"model for inputs of shape "
                                                  f"{tuple(input_shape)}")

    # -- networks ------------------------------------------------------------------------------
    def plain_blocks(self, shape: _Shape) -> tuple[nn.Sequential, _Shape]:
        model, blocks = self.model, len(self.model.widths)
        orders = per_block(model.order, blocks)
        rates = per_block(self.dropout.rate, blocks)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (order, width, rate) in enumerate(zip(orders, model.widths, rates)):
            block, shape = self.plain_block(i, order_tokens(order), width, rate, shape)
            layers[str(i)] = block
        return nn.Sequential(layers), shape

    def plain_block(self, index: int, tokens: list[str], width: int, rate: float,
                    shape: _Shape) -> tuple[nn.Sequential, _Shape]:
        prefix = f"blocks.{index}"
        layers: OrderedDict[str, nn.Module | None] = OrderedDict()
        if "linear" in tokens and shape.rank:
            layers["flatten"] = nn.Flatten()
            shape = _Shape(shape.features, ())
        if "conv" in tokens and not shape.rank:
            self.problems.append(f"model.order: block {index} is a conv block but its input "
                                 "has no channel/position axes (tabular data or after a linear "
                                 "block); use 'linear' blocks")
            shape, self.shrunk = _Shape(shape.channels, (1,)), True
        drop_connect = rate if self.dropout.kind == "dropconnect" and "drop" in tokens else 0.0
        names = {"conv": "conv", "linear": "linear", "bn": "norm", "act": "act", "drop": "drop",
                 "pool": "pool"}
        for token in tokens:
            where = f"{prefix}.{names[token]}"
            if token in ("conv", "linear"):
                layers[names[token]], shape = self.weight_layer(token, shape, width,
                                                                drop_connect, where)
            elif token == "bn":
                layers["norm"] = self.norm(shape, where)
            elif token == "act":
                layers["act"] = self.activation()
            elif token == "drop":
                layers["drop"] = self.drop(self.dropout.kind, rate, shape.rank, where)
            else:
                layers["pool"], shape = self.pool(shape, where)
        return named_sequential(layers), shape

    def head(self, shape: _Shape, num_outputs: int) -> nn.Sequential:
        model, dropout = self.model, self.dropout
        kind = head_dropout_kind(dropout)
        layers: OrderedDict[str, nn.Module | None] = OrderedDict(flatten=nn.Flatten())
        features = shape.features

        def head_drop(at: str) -> nn.Module | None:
            if dropout.head_at != at:
                return None
            return self.drop(kind, dropout.head_rate, 0, "head.drop")

        layers["drop"] = head_drop("before_hidden")
        hidden: OrderedDict[str, nn.Module] = OrderedDict()
        for i, width in enumerate(model.head_hidden):
            hidden[str(i)] = nn.Linear(features, width)
            hidden[f"act{i}"] = self.activation(model.head_activation)
            features = width
        layers["hidden"] = nn.Sequential(hidden) if hidden else None
        if layers["drop"] is None:
            layers["drop"] = head_drop("before_output")
            layers.move_to_end("drop")
        layers["out"] = nn.Linear(features, num_outputs)
        return named_sequential(layers)

    def staged(self, shape: _Shape) -> tuple[nn.Module, nn.Sequential, nn.Module, _Shape]:
        """Stem, stages and neck of a ``densenet`` or CIFAR architecture
        (:mod:`varshift.lab.architectures`), built with this configuration's layers."""
        model = self.model
        if not shape.rank:
            self.problems.append(f"model.architecture: {model.architecture!r} needs sequences "
                                 "or images, the data are flat features")
            shape, self.shrunk = _Shape(shape.channels, (1,)), True
        layers = _LabLayers(self, shape.rank)
        parts: Parts
        arch = model.architecture
        if arch in DEFAULT_WIDTH_FACTOR:  # the residual nets
            make = preact_resnet_parts if arch == "preact_resnet" else wide_resnet_parts
            parts = make(layers, shape.channels, model.depth or DEFAULT_DEPTH[arch],
                         model.width_factor or DEFAULT_WIDTH_FACTOR[arch])
        else:
            block_layers = (model.dense_layers if arch == "densenet"
                            else densenet_cifar_layers(model.depth or DEFAULT_DEPTH[arch]))
            spatial = shape.spatial
            for b in range(len(block_layers) - 1):  # transitions halve the map: may empty it
                spatial = self.check_size(tuple(size // 2 for size in spatial),
                                          f"blocks.{b}.transition.pool (pool size 2)")
            parts = densenet_parts(layers, shape.channels, block_layers, model.growth,
                                   model.bottleneck, model.compression, model.kernel_size)
        stem, blocks, neck, features = parts
        return stem, blocks, neck, _Shape(features, ())


class _LabLayers:
    """A :class:`~varshift.lab.architectures.LayerFactory` that makes the configured layers:
    the norm (kind, momentum, eps, initial γ and β), the activation, the dropout kind with its
    per-stage rate, and DropConnect convolutions in place of dropout layers. Problems go to the
    builder, which reports them all at once."""

    def __init__(self, builder: _Builder, rank: int) -> None:
        self.builder = builder
        self._rank = rank
        model, dropout = builder.model, builder.dropout
        self.kind = dropout.kind
        self.rates = per_block(dropout.rate, builder.config.block_count)
        # The plain DenseNet keeps conv biases, as the lab's other nets do; the papers' CIFAR
        # nets have none (a norm follows every convolution).
        self.bias = model.architecture == "densenet"

    @property
    def rank(self) -> int:
        return self._rank

    def _shape(self, channels: int) -> _Shape:
        return _Shape(channels, (1,) * self._rank)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
             where: str, drop_stage: int | None = None) -> nn.Module:
        rate = 0.0
        if drop_stage is not None and self.kind == "dropconnect":
            rate = self.rates[drop_stage]
        layer, _ = self.builder.weight_layer("conv", self._shape(in_channels), out_channels,
                                             rate, where, kernel=kernel_size, padding="same",
                                             stride=stride, bias=self.bias)
        return layer

    def norm(self, channels: int, where: str) -> nn.Module | None:
        return self.builder.norm(self._shape(channels), where)

    def act(self) -> nn.Module:
        return self.builder.activation()

    def drop(self, stage: int, where: str) -> nn.Module | None:
        return self.builder.drop(self.kind, self.rates[stage], self._rank, where)


class SparseAutoencoder(nn.Module):
    """Encoder ``blocks`` (their output is the code), one linear ``decoder`` back to the
    input's shape. :meth:`encode` and :meth:`decode` let the trainer penalise the code."""

    def __init__(self, blocks: nn.Sequential, decoder: nn.Linear,
                 input_shape: Sequence[int]) -> None:
        super().__init__()
        self.blocks = blocks
        self.decoder = decoder
        self.input_shape = tuple(input_shape)

    def encode(self, x: Tensor) -> Tensor:
        code: Tensor = self.blocks(x)
        return code

    def decode(self, code: Tensor) -> Tensor:
        out: Tensor = self.decoder(code)
        return out.view(-1, *self.input_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def build_model(config: TrialConfig, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """The network ``config`` describes, for samples of ``input_shape`` (no batch axis:
    ``(F,)``, ``(C, L)`` or ``(C, H, W)``) and ``num_outputs`` outputs (classes, regression
    targets; ignored for autoencoding, which reconstructs the input).

    Parameters are initialised from torch's global RNG: seed it first for a reproducible model.
    Raises :class:`~varshift.lab.config.ConfigError` for a configuration that does not fit the
    input (every problem at once, with the key to change).
    """
    if not isinstance(config, TrialConfig):
        raise TypeError(f"config must be a TrialConfig, got {type(config).__name__}")
    dims = tuple(input_shape)
    if not 1 <= len(dims) <= 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                      for d in dims):
        raise ValueError(f"input_shape must be (F,), (C, L) or (C, H, W) with positive sizes, "
                         f"got {dims}")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    if config.model.architecture == "zoo":
        return build_zoo_model(config.model, dims, num_outputs)
    builder = _Builder(config)
    shape = _Shape(dims[0], dims[1:])
    net: nn.Module
    if config.data.task == "autoencoding":
        blocks, code = builder.plain_blocks(shape)
        net = SparseAutoencoder(blocks, nn.Linear(code.features, math.prod(dims)), dims)
    elif config.model.architecture != "plain":
        stem, blocks, neck, shape = builder.staged(shape)
        net = BlockNet(blocks, builder.head(shape, num_outputs), stem=stem, neck=neck)
    else:
        blocks, shape = builder.plain_blocks(shape)
        net = BlockNet(blocks, builder.head(shape, num_outputs))
    builder.raise_problems(dims)
    return net
