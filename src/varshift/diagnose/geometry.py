"""The geometry of a linear/conv layer's weights that Li et al.'s width analysis needs.

Li et al. (CVPR 2019, §3.2) follow dropout by a layer whose output unit sums ``d`` inputs with
weights ``w``: the shift there depends on the fan-in ``d`` and on ``cos²θ``, the squared cosine of
the angle between ``w`` and the all-ones vector, ``cos²θ = (Σw)² / (d·Σw²)``. ``cos²θ = 1`` for
equal weights; zero-mean random weights give ``E[cos²θ] ≈ 1/d``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "FUNCTIONAL_WEIGHT_LAYERS",
    "module_weight_geometry",
    "module_weight_layer",
    "weight_geometry",
]

FUNCTIONAL_WEIGHT_LAYERS: frozenset[Callable[..., Any]] = frozenset(
    (F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
)
"""The functions whose second argument is a weight ``Tensor[out, in/groups, *kernel]``."""


def weight_geometry(weight: Tensor) -> tuple[int, float | None]:
    """Fan-in ``d`` of one output unit of a linear/conv weight ``Tensor[out, in/groups, *k]``
    and the mean over output units of ``cos²θ = (Σw)² / (d·Σw²)`` (``None`` if every unit's
    weights are all zero: the angle is undefined)."""
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    d = rows.shape[1]
    sq = rows.pow(2).sum(dim=1)
    keep = sq > 0
    if not bool(keep.any()):
        return d, None
    cos2 = rows.sum(dim=1)[keep].pow(2) / (d * sq[keep])
    return d, float(cos2.mean())


def module_weight_layer(module: nn.Module) -> tuple[int | None, Tensor | None]:
    """``(fan_in, weight)`` of a linear or convolution module, ``weight`` being the tensor its
    ``cos²θ`` is read from (:func:`weight_geometry`), without reading it yet; ``weight`` is
    ``None`` where there is no single angle, and both are ``None`` for any other module (and
    for a lazy module whose weight is not created yet)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return None, None
    if isinstance(module, nn.Linear):
        return math.prod(weight.shape[1:]), weight
    if isinstance(module, _ConvNd):
        if module.transposed:
            # Each output of a transposed conv sums in_channels/groups × kernel / stride inputs;
            # which weights meet which input varies with the position, so no single cos²θ.
            stride = math.prod(module.stride)
            fan = module.in_channels // module.groups * math.prod(module.kernel_size)
            return max(1, fan // stride), None
        return math.prod(weight.shape[1:]), weight
    return None, None


def module_weight_geometry(module: nn.Module) -> tuple[int | None, float | None]:
    """``(fan_in, cos²θ)`` of a linear or convolution module, ``(None, None)`` otherwise (and
    for a lazy module whose weight is not created yet)."""
    fan_in, weight = module_weight_layer(module)
    return fan_in, None if weight is None else weight_geometry(weight)[1]
