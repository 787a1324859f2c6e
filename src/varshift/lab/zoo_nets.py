"""Networks from the model zoos (timm, torchvision) as lab architectures (``architecture = "zoo"``).

:func:`build_zoo_model` calls the factory ``model.zoo`` names through
:func:`varshift.checkpoints.load_model` (random initialisation; no weights are ever downloaded),
with the configured ``zoo_args``, ``num_classes`` and the drop-path rate under the keyword the
library uses: timm's ``drop_path_rate``, torchvision's ``stochastic_depth_prob`` (both rise
linearly with depth to that rate, block by block), or whichever of the two a plain factory takes.

:func:`torchvision_efficientnet` is torchvision's own ``EfficientNet`` class with the B0 stage
table scaled by width and depth, as EfficientNet's compound scaling does for B1…B7 upwards:
torchvision's ``efficientnet_b0()`` fixes both multipliers, and at 1.0 a B0 trains too slowly for
a many-seed study on two CPU cores.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn

from varshift.checkpoints import keyword_value, load_model, resolve_factory
from varshift.lab.config import ConfigError, ModelConfig

__all__ = ["build_zoo_model", "drop_path_keyword", "torchvision_efficientnet"]

#: EfficientNet-B0's stages (Tan & Le 2019, table 1): expansion, kernel, stride, input and
#: output channels, layers.
_EFFICIENTNET_B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


def torchvision_efficientnet(
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
    stochastic_depth_prob: float = 0.2,
    num_classes: int = 1000,
    dropout: float = 0.2,
) -> nn.Module:
    """torchvision's ``EfficientNet`` with B0's stages, channels × ``width_mult`` (rounded to a
    multiple of 8) and layers × ``depth_mult`` (rounded up), as torchvision scales B1…B7;
    ``width_mult = depth_mult = 1`` is ``torchvision.models.efficientnet_b0``. Stochastic depth
    rises from 0 to ``stochastic_depth_prob`` over the blocks; ``dropout`` is the classifier's
    (after the last BatchNorm)."""
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    stage = partial(MBConvConfig, width_mult=width_mult, depth_mult=depth_mult)
    stages = [stage(*row) for row in _EFFICIENTNET_B0]
    net: nn.Module = EfficientNet(stages, dropout=dropout,
                                  stochastic_depth_prob=stochastic_depth_prob,
                                  num_classes=num_classes)
    return net


def drop_path_keyword(spec: str) -> str | None:
    """The keyword that sets the drop-path (stochastic-depth) rate of the factory ``spec``, or
    ``None`` when a plain factory takes neither ``drop_path_rate`` nor
    ``stochastic_depth_prob``."""
    library = spec.partition(":")[0]
    if library == "timm":
        return "drop_path_rate"
    if library == "torchvision":
        return "stochastic_depth_prob"
    parameters = inspect.signature(resolve_factory(spec, argument="model.zoo")).parameters
    return next((keyword for keyword in ("drop_path_rate", "stochastic_depth_prob")
                 if keyword in parameters), None)


def _keywords(model: ModelConfig, num_outputs: int) -> dict[str, Any]:
    assert model.zoo is not None
    keywords = dict(keyword_value(text) for text in model.zoo_args)
    owned: dict[str, Any] = {"num_classes": num_outputs}
    # Always passed, 0 included: torchvision's EfficientNets default to 0.2, not to none.
    keyword = drop_path_keyword(model.zoo)
    if keyword is not None:
        owned[keyword] = model.drop_path_rate
    elif model.drop_path_rate > 0:
        raise ConfigError([f"model.drop_path_rate: {model.zoo} takes neither drop_path_rate "
                           "nor stochastic_depth_prob"])
    clash = sorted(set(keywords) & set(owned))
    if clash:
        raise ConfigError([f"model.zoo_args: {', '.join(clash)} is set by the lab "
                           "(num_classes from the data, the drop-path rate from "
                           "model.drop_path_rate)"])
    return {**keywords, **owned}


def build_zoo_model(model: ModelConfig, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """The zoo network ``model`` names, for ``num_outputs`` classes or targets, checked on one
    zero input of ``input_shape`` (a network that cannot take the data fails here, with the
    key to change, rather than in the middle of training)."""
    import torch

    if model.zoo is None:
        raise ConfigError(["model.zoo: architecture 'zoo' needs the network's name"])
    try:
        net = load_model(model.zoo, argument="model.zoo", **_keywords(model, num_outputs))
    except (TypeError, ValueError, ImportError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError([f"model.zoo: {exc}".splitlines()[0]]) from exc
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError([f"data.image_size: {model.zoo} cannot take samples of shape "
                           f"{tuple(input_shape)} ({first}); resize them with data.image_size "
                           "and data.channels"]) from exc
    return net.train()
