"""Functional forms of every varshift noise layer, in the style of ``torch.nn.functional``.

Each function takes ``training`` explicitly and is the identity when it is ``False``.
``p`` is always the *drop* probability, as in :func:`torch.nn.functional.dropout`.
"""

from varshift.layers.dropblock import drop_block_2d, drop_block_schedule
from varshift.layers.dropconnect import drop_connect_conv2d, drop_connect_linear
from varshift.layers.noise import (
    classic_dropout,
    gaussian_dropout,
    uout,
    variance_stable_dropout,
)

__all__ = [
    "classic_dropout",
    "drop_block_2d",
    "drop_block_schedule",
    "drop_connect_conv2d",
    "drop_connect_linear",
    "gaussian_dropout",
    "uout",
    "variance_stable_dropout",
]
