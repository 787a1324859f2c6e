"""Dropout variants as PyTorch modules, each with a functional twin in
:mod:`varshift.layers.functional`.

All are the identity in ``eval()`` and keep the mean of the signal in training (inverted
scaling), except :class:`ClassicDropout`, which scales at test time instead, as in the original
dropout paper. :mod:`varshift.layers.registry` tells which modules and functions are stochastic
and which noise (in :mod:`varshift.theory` terms) each one applies; :mod:`varshift.layers.zoo`
adds torchvision's and timm's noise layers once the user has imported those libraries.
"""

from varshift.layers import functional, zoo
from varshift.layers.dropblock import DropBlock2d, DropBlockScheduler
from varshift.layers.dropconnect import DropConnectConv2d, DropConnectLinear, convert_to_dropconnect
from varshift.layers.noise import ClassicDropout, GaussianDropout, Uout, VarianceStableDropout
from varshift.layers.registry import (
    NoiseSpec,
    is_stochastic,
    is_stochastic_function,
    mask_grouping,
    noise_spec,
    register_stochastic,
    register_stochastic_function,
)

__all__ = [
    "ClassicDropout",
    "DropBlock2d",
    "DropBlockScheduler",
    "DropConnectConv2d",
    "DropConnectLinear",
    "GaussianDropout",
    "NoiseSpec",
    "Uout",
    "VarianceStableDropout",
    "convert_to_dropconnect",
    "functional",
    "is_stochastic",
    "is_stochastic_function",
    "mask_grouping",
    "noise_spec",
    "register_stochastic",
    "register_stochastic_function",
    "zoo",
]
