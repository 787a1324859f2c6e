"""Small versions of common architectures, for tests that need a real model (lint, measure, fix).

Import as ``from helpers.models_zoo import ...`` (pytest puts ``tests/`` on ``sys.path``). Every
model is tiny (a few thousand parameters) and takes the input of :attr:`ZooCase.example`.
:data:`ZOO` lists them with the BatchNorm layers that sit downstream of noise with no other
normalization in between, i.e. the layers that suffer the variance shift (Li et al., CVPR 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ZOO",
    "BNDropoutBN",
    "DataDependentNet",
    "DenseNetTiny",
    "DropoutBNConvBN",
    "FunctionalDropoutNet",
    "HandWrittenDropoutNet",
    "InstanceNormNet",
    "Jitter",
    "JitterNet",
    "NoRunningStatsNet",
    "PerSampleNormNet",
    "PreActResNetTiny",
    "RegistrationOrderNet",
    "ResidualDropoutNet",
    "TrainingGuardNet",
    "VGGTiny",
    "ZooCase",
]


class DenseLayer(nn.Module):
    """DenseNet-BC-style layer without the bottleneck: BN → ReLU → conv → dropout, output
    concatenated to the input, so the next layer's BN sees the dropped-out features."""

    def __init__(self, channels: int, growth: int, p: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, growth, 3, padding=1, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.drop(self.conv(F.relu(self.bn(x))))], dim=1)


class DenseNetTiny(nn.Module):
    """Stem conv, two dense layers, final BN, global pool, linear classifier."""

    def __init__(self, p: float = 0.2, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.Sequential(DenseLayer(8, growth, p), DenseLayer(8 + growth, growth, p))
        self.norm = nn.BatchNorm2d(8 + 2 * growth)
        self.fc = nn.Linear(8 + 2 * growth, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.layers(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGTiny(nn.Module):
    """VGG-style: conv-BN-ReLU-pool features, dropout only in the classifier (after the last
    BN), as in the original VGG: no BatchNorm is fed by noise."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(inplace=True), nn.Dropout(p),
            nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Dropout(p), nn.Linear(32, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    """Wide-ResNet block: BN → ReLU → conv → dropout → BN → ReLU → conv, plus the identity."""

    def __init__(self, channels: int, p: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.drop = nn.Dropout(p)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop(self.conv1(F.relu(self.bn1(x))))
        return x + self.conv2(F.relu(self.bn2(out)))


class PreActResNetTiny(nn.Module):
    def __init__(self, p: float = 0.3, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.block1 = PreActBlock(channels, p)
        self.block2 = PreActBlock(channels, p)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.block2(self.block1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class DataDependentNet(nn.Module):
    """Takes a branch chosen by the data (``if x.sum() > 0``): fx cannot trace it. Both branches
    put dropout before a BatchNorm."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.drop = nn.Dropout(p)
        self.bn_pos = nn.BatchNorm1d(16)
        self.bn_neg = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.fc(x))
        h = self.bn_pos(h) if x.sum() > 0 else self.bn_neg(h)
        return self.head(h)


class FunctionalDropoutNet(nn.Module):
    """``F.dropout(x, p, training=self.training)`` between a linear layer and a BatchNorm."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.relu(self.fc1(x)), self.p, training=self.training)
        return self.fc2(self.bn(x))


class TrainingGuardNet(nn.Module):
    """``if self.training: x = F.dropout(x)``: in eval mode the call does not even happen."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(x))
        if self.training:
            x = F.dropout(x, 0.5)
        return self.fc2(self.bn(x))


class ResidualDropoutNet(nn.Module):
    """``bn(x + dropout(conv(x)))``: the noise reaches the BN through a residual addition."""

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x + self.drop(self.conv(x)))


class BNDropoutBN(nn.Module):
    """BN → dropout → BN: only the second BN is fed by noise."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(p)
        self.bn2 = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.drop(self.bn1(self.fc(x))))


class DropoutBNConvBN(nn.Module):
    """dropout → BN → conv → BN: the first BN is fed by noise, the second sees it only through
    the first (not flagged)."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv(self.bn1(self.drop(x))))


class PerSampleNormNet(nn.Module):
    """Dropout before a LayerNorm and before a GroupNorm, no BatchNorm: nothing is affected."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop2d = nn.Dropout2d(p)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 16)
        self.drop = nn.Dropout(p)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.drop2d(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.ln(self.drop(self.fc(x))))


class NoRunningStatsNet(nn.Module):
    """Dropout before a BatchNorm that keeps no running statistics: it normalizes with the batch
    at test time too, so there is no shift."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.drop = nn.Dropout(p)
        self.bn = nn.BatchNorm1d(16, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.drop(self.fc(x)))


class InstanceNormNet(nn.Module):
    """Dropout before an InstanceNorm *with* running statistics: used at test time, so shifted."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.norm = nn.InstanceNorm2d(4, track_running_stats=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.drop(self.conv(x)))


class Jitter(nn.Module):
    """A user's own noise layer, *not* registered here: ``x · (1 + σ ε)``, ε ~ N(0, 1). Tests
    register a subclass with ``varshift.layers.register_stochastic``."""

    def __init__(self, sigma: float = 0.5) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return x * (1 + self.sigma * torch.randn_like(x))


class JitterNet(nn.Module):
    """linear → (custom noise layer) → BN."""

    def __init__(self, noise: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.noise = noise
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.noise(self.fc(x)))


class HandWrittenDropoutNet(nn.Module):
    """Dropout written out by hand (``x * (rand_like(x) > p) / q``) before a BatchNorm."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.training:
            h = h * (torch.rand_like(h) > self.p) / (1 - self.p)
        return self.bn(h)


class RegistrationOrderNet(nn.Module):
    """Modules registered in one order and used in another.

    Registration order reads ``first_bn, drop, fc, second_bn``, which suggests dropout → fc →
    ``second_bn``. ``forward`` really runs ``fc → second_bn → drop → first_bn``: only
    ``first_bn`` is fed by the dropout. A tool that walks ``named_modules()`` gets it backwards.
    """

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.first_bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(8, 16)
        self.second_bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.second_bn(self.fc(x)))
        return self.head(self.first_bn(x))


def _images(batch: int = 16) -> Tensor:
    return torch.randn(batch, 3, 8, 8)


def _vectors(batch: int = 32) -> Tensor:
    return torch.randn(batch, 8)


@dataclass(frozen=True)
class ZooCase:
    """A zoo model: how to build it, an example batch, and the BatchNorm-like layers that are
    fed by noise (``flagged``)."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], Tensor]
    flagged: frozenset[str]
    fx_traceable: bool = True


ZOO: tuple[ZooCase, ...] = (
    ZooCase("densenet", DenseNetTiny, _images, frozenset({"layers.1.bn", "norm"})),
    ZooCase("vgg", VGGTiny, _images, frozenset()),
    ZooCase("preact_resnet", PreActResNetTiny, _images, frozenset({"block1.bn2", "block2.bn2"})),
    ZooCase("data_dependent", DataDependentNet, lambda: _vectors().abs(), frozenset({"bn_pos"}),
            fx_traceable=False),
    ZooCase("functional_dropout", FunctionalDropoutNet, _vectors, frozenset({"bn"})),
    ZooCase("training_guard", TrainingGuardNet, _vectors, frozenset({"bn"})),
    ZooCase("residual", ResidualDropoutNet, _images, frozenset({"bn"})),
    ZooCase("bn_dropout_bn", BNDropoutBN, _vectors, frozenset({"bn2"})),
    ZooCase("dropout_bn_conv_bn", DropoutBNConvBN, _images, frozenset({"bn1"})),
    ZooCase("per_sample_norms", PerSampleNormNet, _images, frozenset()),
    ZooCase("no_running_stats", NoRunningStatsNet, _vectors, frozenset()),
    ZooCase("instance_norm", InstanceNormNet, _images, frozenset({"norm"})),
    ZooCase("hand_written", HandWrittenDropoutNet, _vectors, frozenset({"bn"})),
    ZooCase("registration_order", RegistrationOrderNet, _vectors, frozenset({"first_bn"})),
)
