"""CIFAR networks whose dropout position is a parameter: PreAct-ResNet, Wide-ResNet, DenseNet-BC.

- He, Zhang, Ren, Sun. *Identity Mappings in Deep Residual Networks*. ECCV 2016 (arXiv
  1603.05027): the pre-activation residual block ``norm-act-conv-norm-act-conv + input``.
- Zagoruyko, Komodakis. *Wide Residual Networks*. BMVC 2016 (arXiv 1605.07146): the same block,
  ``k`` times wider, with dropout between its two convolutions.
- Huang, Liu, van der Maaten, Weinberger. *Densely Connected Convolutional Networks*. CVPR 2017
  (arXiv 1608.06993): DenseNet-BC, dropout after every convolution.
- Li, Chen, Hu, Yang. *Understanding the Disharmony between Dropout and Batch Normalization by
  Variance Shift*. CVPR 2019 (arXiv 1801.05134) run these nets with dropout in those places
  (every dropout then feeds a BatchNorm: a variance shift) against dropout only before the
  classifier (after the last BatchNorm: none).

Every network is ``stem → blocks → neck → head`` (a :class:`BlockNet`): ``blocks`` has one
entry per stage, ``neck`` is the final norm-act-global average pool, ``head`` flattens, may drop,
and classifies. Inside the blocks, dropout sits where the papers put it:

- residual nets: ``blocks.S.B.drop`` between ``conv1`` and ``norm2`` (it feeds ``norm2``);
- DenseNet: ``drop1``/``drop2`` after each convolution of a dense layer (``drop1`` feeds
  ``norm2``; ``drop2``'s output is concatenated into every later layer's ``norm1``) and ``drop``
  after each transition's convolution.

The convenience builders :func:`preact_resnet`, :func:`wide_resnet` and :func:`densenet_cifar`
take ``p`` and ``dropout_at`` (``"inside"`` or ``"classifier"``). The ``*_parts`` functions
take a :class:`LayerFactory` instead, so a caller chooses every norm, activation, convolution
and noise layer (the lab passes its configured norm, dropout kind and per-stage rates);
:class:`TorchLayers` is the plain PyTorch choice. Convolutions have no bias: a norm follows
each one, directly or after the residual addition. Parameters keep PyTorch's default
initialisation, as everywhere in the lab.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "CIFAR_ARCHITECTURES",
    "DEFAULT_DEPTH",
    "DEFAULT_WIDTH_FACTOR",
    "DROPOUT_POSITIONS",
    "PREACT_DEPTHS",
    "BlockNet",
    "DenseLayer",
    "LayerFactory",
    "Parts",
    "PreActBlock",
    "TorchLayers",
    "classifier_head",
    "densenet_cifar",
    "densenet_cifar_layers",
    "densenet_parts",
    "depth_problem",
    "named_sequential",
    "preact_resnet",
    "preact_resnet_parts",
    "same_padding",
    "stage_count",
    "wide_resnet",
    "wide_resnet_parts",
]

CIFAR_ARCHITECTURES = ("preact_resnet", "wide_resnet", "densenet_cifar")
#: The papers' CIFAR networks: PreAct-ResNet-18, WRN-28-10, DenseNet-BC-100 (k = 12).
DEFAULT_DEPTH = {"preact_resnet": 18, "wide_resnet": 28, "densenet_cifar": 100}
#: Stage widths are ``16k·2^s``: k = 4 gives PreAct-ResNet-18's 64…512, k = 10 is WRN-28-10.
DEFAULT_WIDTH_FACTOR = {"preact_resnet": 4, "wide_resnet": 10}
#: Residual blocks per stage of the four-stage PreAct-ResNets (two 3x3 convs per block).
PREACT_DEPTHS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
DROPOUT_POSITIONS = ("inside", "classifier")
_STAGES = {"preact_resnet": 4, "wide_resnet": 3, "densenet_cifar": 3}

#: ``(stem, blocks, neck, features)``: everything but the head, and the neck's output width.
Parts = tuple[nn.Module, nn.Sequential, nn.Module, int]


def stage_count(architecture: str) -> int:
    """Stages of a CIFAR architecture (one dropout rate each, when rates are given per stage)."""
    return _STAGES[architecture]


def depth_problem(architecture: str, depth: int) -> str | None:
    """Why ``depth`` does not fit ``architecture``, or ``None`` when it does."""
    if architecture == "preact_resnet":
        if depth not in PREACT_DEPTHS:
            return (f"PreAct-ResNet depth must be one of {', '.join(map(str, PREACT_DEPTHS))}, "
                    f"got {depth}")
        return None
    # WRN: 3 stages of n two-conv blocks + stem + classifier + 2 shortcut convs = 6n + 4.
    # DenseNet-BC: 3 blocks of n two-conv layers + stem + 2 transitions + classifier = 6n + 4.
    if depth < 10 or (depth - 4) % 6:
        name = "Wide-ResNet" if architecture == "wide_resnet" else "DenseNet-BC"
        return f"{name} depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
    return None


def _check_depth(architecture: str, depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"depth must be an integer, got {depth!r}")
    problem = depth_problem(architecture, depth)
    if problem is not None:
        raise ValueError(problem)


def densenet_cifar_layers(depth: int) -> tuple[int, int, int]:
    """Layers per dense block of DenseNet-BC-``depth`` on CIFAR: ``(depth − 4) / 6`` each."""
    _check_depth("densenet_cifar", depth)
    n = (depth - 4) // 6
    return (n, n, n)


class LayerFactory(Protocol):
    """Makes the layers a study varies; the ``*_parts`` builders call it for every layer.

    ``where`` is the layer's qualified name in the finished network (for messages). ``stage``
    is the stage (block index for DenseNet) a dropout belongs to. ``drop_stage`` marks a
    convolution that sits right before a dropout position of that stage: a factory that puts
    the noise on the weights (DropConnect) wraps exactly those and returns no dropout layer.
    """

    @property
    def rank(self) -> int:
        """1 for sequences ``(N, C, L)``, 2 for images ``(N, C, H, W)``."""
        ...

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
             where: str, drop_stage: int | None = None) -> nn.Module: ...

    def norm(self, channels: int, where: str) -> nn.Module | None: ...

    def act(self) -> nn.Module: ...

    def drop(self, stage: int, where: str) -> nn.Module | None: ...


@dataclass(frozen=True)
class TorchLayers:
    """The plain choice: bias-free convs, BatchNorm (``momentum``/``eps`` in PyTorch's
    convention), ReLU and inverted dropout ``nn.Dropout(p)`` at every position inside the blocks
    (none when ``p = 0``)."""

    p: float = 0.0
    rank: int = 2
    momentum: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int | float) \
                or not 0.0 <= self.p < 1.0:
            raise ValueError(f"p must be a number in [0, 1), got {self.p!r}")
        if self.rank not in (1, 2):
            raise ValueError(f"rank must be 1 (sequences) or 2 (images), got {self.rank!r}")

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
             where: str = "", drop_stage: int | None = None) -> nn.Module:
        cls = nn.Conv2d if self.rank == 2 else nn.Conv1d
        return cls(in_channels, out_channels, kernel_size, stride=stride,
                   padding=same_padding(kernel_size, stride), bias=False)

    def norm(self, channels: int, where: str = "") -> nn.Module | None:
        cls = nn.BatchNorm2d if self.rank == 2 else nn.BatchNorm1d
        return cls(channels, eps=self.eps, momentum=self.momentum)

    def act(self) -> nn.Module:
        return nn.ReLU()

    def drop(self, stage: int, where: str = "") -> nn.Module | None:
        return nn.Dropout(self.p) if self.p > 0 else None


def same_padding(kernel_size: int, stride: int) -> int | str:
    """``"same"`` at stride 1 (PyTorch keeps the size, even kernels included); ``k // 2`` when
    striding (``"same"`` is refused there), which gives ``ceil(size / stride)`` for odd ``k``."""
    return "same" if stride == 1 else kernel_size // 2


def _or_identity(layer: nn.Module | None) -> nn.Module:
    return nn.Identity() if layer is None else layer


def named_sequential(layers: OrderedDict[str, nn.Module | None]) -> nn.Sequential:
    """An ``nn.Sequential`` of the named layers that exist (``None`` = left out)."""
    return nn.Sequential(OrderedDict((k, v) for k, v in layers.items() if v is not None))


class BlockNet(nn.Module):
    """``stem → blocks → neck → head``; stem and neck are optional (plain lab nets have none)."""

    def __init__(self, blocks: nn.Sequential, head: nn.Module, *,
                 stem: nn.Module | None = None, neck: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = blocks
        self.neck = neck
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
        x = self.blocks(x)
        if self.neck is not None:
            x = self.neck(x)
        out: Tensor = self.head(x)
        return out


class PreActBlock(nn.Module):
    """``norm1-act1-conv1-drop-norm2-act2-conv2``, plus the input (He et al. 2016, identity
    mappings; Zagoruyko & Komodakis' dropout between the convolutions). When the block changes
    the width or strides, the shortcut is a 1x1 convolution of the pre-activated input, as in
    both papers' code. Missing norm or dropout layers are identities."""

    def __init__(self, layers: LayerFactory, in_channels: int, out_channels: int, stride: int,
                 stage: int, where: str) -> None:
        super().__init__()
        self.norm1 = _or_identity(layers.norm(in_channels, f"{where}.norm1"))
        self.act1 = layers.act()
        self.conv1 = layers.conv(in_channels, out_channels, 3, stride=stride,
                                 where=f"{where}.conv1", drop_stage=stage)
        self.drop = _or_identity(layers.drop(stage, f"{where}.drop"))
        self.norm2 = _or_identity(layers.norm(out_channels, f"{where}.norm2"))
        self.act2 = layers.act()
        self.conv2 = layers.conv(out_channels, out_channels, 3, where=f"{where}.conv2")
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = layers.conv(in_channels, out_channels, 1, stride=stride,
                                        where=f"{where}.shortcut")

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.drop(self.conv1(pre))
        out = self.conv2(self.act2(self.norm2(out)))
        total: Tensor = out + skip
        return total


class DenseLayer(nn.Sequential):
    """A DenseNet layer: its sub-layers' output, concatenated to its input along channels."""

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self:
            out = layer(out)
        return torch.cat([x, out], dim=1)


def _neck(layers: LayerFactory, channels: int) -> nn.Sequential:
    """The final pre-activation and global average pool (every pre-activation net needs the
    last norm-act, since its blocks end on a convolution)."""
    pool = nn.AdaptiveAvgPool2d(1) if layers.rank == 2 else nn.AdaptiveAvgPool1d(1)
    return named_sequential(OrderedDict(norm=layers.norm(channels, "neck.norm"), act=layers.act(),
                                   pool=pool))


def _residual_stages(layers: LayerFactory, channels: int, widths: Sequence[int],
                     counts: Sequence[int]) -> tuple[nn.Sequential, int]:
    """Stages of :class:`PreActBlock`; every stage but the first halves the map with its first
    block's stride."""
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    for s, (width, count) in enumerate(zip(widths, counts)):
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for b in range(count):
            stride = 2 if s > 0 and b == 0 else 1
            blocks[str(b)] = PreActBlock(layers, channels, width, stride, s, f"blocks.{s}.{b}")
            channels = width
        stages[str(s)] = nn.Sequential(blocks)
    return nn.Sequential(stages), channels


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def preact_resnet_parts(layers: LayerFactory, in_channels: int, depth: int = 18,
                        width_factor: int = 4) -> Parts:
    """PreAct-ResNet-``depth`` (10, 18 or 34) for 32x32 inputs: a 3x3 stem of ``16k`` channels,
    four stages of ``16k·(1, 2, 4, 8)`` channels (k = ``width_factor``; 4 is the usual
    64…512), strides 1, 2, 2, 2."""
    _check_depth("preact_resnet", depth)
    _check_positive(in_channels=in_channels, width_factor=width_factor)
    base = 16 * width_factor
    stem = layers.conv(in_channels, base, 3, where="stem")
    blocks, channels = _residual_stages(layers, base, [base * 2**s for s in range(4)],
                                        PREACT_DEPTHS[depth])
    return stem, blocks, _neck(layers, channels), channels


def wide_resnet_parts(layers: LayerFactory, in_channels: int, depth: int = 28,
                      width_factor: int = 10) -> Parts:
    """WRN-``depth``-``k``: a 3x3 stem of 16 channels, three stages of ``(depth − 4) / 6``
    blocks with ``16k``, ``32k``, ``64k`` channels (k = ``width_factor``), strides 1, 2, 2."""
    _check_depth("wide_resnet", depth)
    _check_positive(in_channels=in_channels, width_factor=width_factor)
    n = (depth - 4) // 6
    stem = layers.conv(in_channels, 16, 3, where="stem")
    k = width_factor
    blocks, channels = _residual_stages(layers, 16, [16 * k, 32 * k, 64 * k], [n, n, n])
    return stem, blocks, _neck(layers, channels), channels


def densenet_parts(layers: LayerFactory, in_channels: int, block_layers: Sequence[int],
                   growth: int = 12, bottleneck: int = 4, compression: float = 0.5,
                   stem_kernel: int = 3) -> Parts:
    """DenseNet-BC: a stem of ``2·growth`` channels; one dense block per entry of
    ``block_layers``, each layer ``norm1-act1-conv1(1x1, bottleneck·growth)-drop1-norm2-act2-
    conv2(3x3, growth)-drop2`` concatenated to its input; between blocks a transition
    ``norm-act-conv(1x1, ×compression)-drop-avg pool 2``. Names: ``blocks.B.layers.L.*``,
    ``blocks.B.transition.*``."""
    _check_positive(in_channels=in_channels, growth=growth, bottleneck=bottleneck,
                    stem_kernel=stem_kernel)
    if not block_layers:
        raise ValueError("block_layers must name at least one dense block")
    _check_positive(**{f"block_layers[{i}]": n for i, n in enumerate(block_layers)})
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    channels = 2 * growth
    stem = layers.conv(in_channels, channels, stem_kernel, where="stem")
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for b, count in enumerate(block_layers):
        dense: OrderedDict[str, nn.Module] = OrderedDict()
        for j in range(count):
            dense[str(j)] = _dense_layer(layers, channels, growth * bottleneck, growth, b,
                                         f"blocks.{b}.layers.{j}")
            channels += growth
        parts: OrderedDict[str, nn.Module | None] = OrderedDict(layers=nn.Sequential(dense))
        if b < len(block_layers) - 1:
            width = max(1, int(channels * compression))
            parts["transition"] = _transition(layers, channels, width, b,
                                              f"blocks.{b}.transition")
            channels = width
        blocks[str(b)] = named_sequential(parts)
    return stem, nn.Sequential(blocks), _neck(layers, channels), channels


def _dense_layer(layers: LayerFactory, channels: int, inner: int, growth: int, stage: int,
                 where: str) -> DenseLayer:
    parts: OrderedDict[str, nn.Module | None] = OrderedDict()
    parts["norm1"] = layers.norm(channels, f"{where}.norm1")
    parts["act1"] = layers.act()
    parts["conv1"] = layers.conv(channels, inner, 1, where=f"{where}.conv1", drop_stage=stage)
    parts["drop1"] = layers.drop(stage, f"{where}.drop1")
    parts["norm2"] = layers.norm(inner, f"{where}.norm2")
    parts["act2"] = layers.act()
    parts["conv2"] = layers.conv(inner, growth, 3, where=f"{where}.conv2", drop_stage=stage)
    parts["drop2"] = layers.drop(stage, f"{where}.drop2")
    return DenseLayer(OrderedDict((k, v) for k, v in parts.items() if v is not None))


def _transition(layers: LayerFactory, channels: int, width: int, stage: int,
                where: str) -> nn.Sequential:
    pool = nn.AvgPool2d(2) if layers.rank == 2 else nn.AvgPool1d(2)
    return named_sequential(OrderedDict(
        norm=layers.norm(channels, f"{where}.norm"), act=layers.act(),
        conv=layers.conv(channels, width, 1, where=f"{where}.conv", drop_stage=stage),
        drop=layers.drop(stage, f"{where}.drop"), pool=pool))


def classifier_head(features: int, num_classes: int, p: float = 0.0) -> nn.Sequential:
    """``flatten → drop → out``: the classifier, with inverted dropout of rate ``p`` before it
    (after the last norm: no variance shift); no ``drop`` layer when ``p = 0``."""
    _check_positive(features=features, num_classes=num_classes)
    return named_sequential(OrderedDict(flatten=nn.Flatten(),
                                   drop=nn.Dropout(p) if p > 0 else None,
                                   out=nn.Linear(features, num_classes)))


def _assemble(make_parts: Callable[[LayerFactory], Parts], num_classes: int, p: float,
              dropout_at: str) -> BlockNet:
    if dropout_at not in DROPOUT_POSITIONS:
        raise ValueError(f"dropout_at must be one of {', '.join(DROPOUT_POSITIONS)}, "
                         f"got {dropout_at!r}")
    inside = dropout_at == "inside"
    stem, blocks, neck, features = make_parts(TorchLayers(p=p if inside else 0.0))
    head = classifier_head(features, num_classes, 0.0 if inside else p)
    return BlockNet(blocks, head, stem=stem, neck=neck)


def preact_resnet(depth: int = 18, num_classes: int = 10, *, width_factor: int = 4,
                  in_channels: int = 3, p: float = 0.0, dropout_at: str = "inside") -> BlockNet:
    """PreAct-ResNet-``depth`` (see :func:`preact_resnet_parts`) with BatchNorm and ReLU.

    ``dropout_at = "inside"``: ``nn.Dropout(p)`` in every block between the convolutions, right
    before ``norm2``; ``"classifier"``: one ``nn.Dropout(p)`` before the final linear layer.
    Input ``Tensor[N, in_channels, H, W]`` (32x32 for CIFAR), output ``Tensor[N, num_classes]``.
    """
    return _assemble(lambda layers: preact_resnet_parts(layers, in_channels, depth,
                                                        width_factor), num_classes, p, dropout_at)


def wide_resnet(depth: int = 28, num_classes: int = 10, *, width_factor: int = 10,
                in_channels: int = 3, p: float = 0.0, dropout_at: str = "inside") -> BlockNet:
    """WRN-``depth``-``width_factor`` (see :func:`wide_resnet_parts`); ``p``/``dropout_at`` as
    in :func:`preact_resnet` (WRN's own recipe is ``p = 0.3`` inside)."""
    return _assemble(lambda layers: wide_resnet_parts(layers, in_channels, depth, width_factor),
                     num_classes, p, dropout_at)


def densenet_cifar(depth: int = 100, num_classes: int = 10, *, growth: int = 12,
                   in_channels: int = 3, p: float = 0.0, dropout_at: str = "inside") -> BlockNet:
    """DenseNet-BC-``depth`` with growth rate ``growth``: three dense blocks of
    ``(depth − 4) / 6`` layers, bottleneck 4·growth, compression 0.5 (see
    :func:`densenet_parts`). ``dropout_at = "inside"`` puts ``nn.Dropout(p)`` after every
    convolution but the stem (Huang et al.'s positions); ``"classifier"`` before the final
    linear layer."""
    block_layers = densenet_cifar_layers(depth)
    return _assemble(lambda layers: densenet_parts(layers, in_channels, block_layers, growth),
                     num_classes, p, dropout_at)
