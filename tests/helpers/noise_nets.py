"""Small networks with noise before a BatchNorm, and the brute-force shift they are checked
against: the same example inputs through the model with many mask draws, every BatchNorm in
eval, per-channel Var(noise off)/Var(noise on) averaged over channels. Shared by the tests of
``predict_shifts`` and of ``lint``'s predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varshift.diagnose.noise_moments import ShiftPrediction

DRAWS = 600


class StochasticDepthRow(nn.Module):
    """Per-sample drop path: the whole sample is kept (scaled by 1/q) or dropped."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = torch.empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep)
        return x * mask / keep


def stem(channels: int = 8, dims: int = 2) -> nn.Sequential:
    """Conv + ReLU: the noise sees a non-zero-mean input, so the shift is not 1/(1 + s²)."""
    conv = nn.Conv2d(1, channels, 3, padding=1) if dims == 2 else nn.Conv1d(1, channels, 3)
    return nn.Sequential(conv, nn.ReLU())


def images(n: int = 64, seed: int = 1) -> Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def measured(
    model: nn.Module, inputs: Tensor, bn: str, switches: Sequence[nn.Module], draws: int = DRAWS
) -> float:
    """Brute force: ``switches`` (their own flags only) on for ``draws`` forwards."""
    seen: list[Tensor] = []
    layer = model.get_submodule(bn)
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    model.eval()
    sums: list[Tensor] = []
    try:
        with torch.no_grad():
            for on in (False, *([True] * draws)):
                for module in switches:
                    module.training = on
                seen.clear()
                model(inputs)
                x = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)
                sums.append(torch.stack((x.mean(1), x.square().mean(1))))
    finally:
        handle.remove()
    off, on_draws = sums[0], torch.stack(sums[1:]).mean(0)
    eval_var = off[1] - off[0].square()
    train_var = on_draws[1] - on_draws[0].square()
    keep = eval_var > 0
    return float((eval_var[keep] / train_var[keep]).mean())


def check(prediction: ShiftPrediction, truth: float, exact: bool) -> None:
    assert prediction.exact is exact, prediction
    if exact:
        assert prediction.stderr is None
        assert abs(prediction.ratio - truth) <= 0.01, (prediction, truth)
    else:
        assert prediction.stderr is not None
        assert prediction.stderr > 0
        assert abs(prediction.ratio - truth) <= min(0.05, 5 * prediction.stderr + 0.005), (
            prediction,
            truth,
        )


class Residual(nn.Module):
    """``trunk + drop(branch)``, then a 1×1 conv and BatchNorm; ``reconverge`` feeds the
    dropped value both ways instead (``y + conv(y)``)."""

    def __init__(self, drop: nn.Module, reconverge: bool = False) -> None:
        super().__init__()
        self.stem = stem()
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = drop
        self.reconverge = reconverge
        self.head = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if self.reconverge:
            y = self.drop(h)
            return self.bn(y + self.branch(y))  # type: ignore[no-any-return]
        return self.bn(self.head(h + self.drop(self.branch(h))))  # type: ignore[no-any-return]


class Dense(nn.Module):
    """DenseNet-style: the new features are concatenated to the old ones before the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.drop = nn.Dropout(0.3)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.bn(torch.cat([h, self.conv(self.drop(h))], dim=1))  # type: ignore[no-any-return]


class Mlp(nn.Module):
    """Linear layers with a functional dropout, flattened images in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x.flatten(1)))
        return self.bn(self.fc2(F.dropout(h, 0.3, self.training)))  # type: ignore[no-any-return]
