"""The ground truth that lint's static verdict is tested against: which BatchNorm layers a
forward pass shows to be fed by noise.

Import as ``from helpers.dynamic_check import noise_fed_batchnorms``. The check knows nothing of
varshift's registry or tracers; it only runs the model:

1. on a copy of the model, every noise rate that is not 0 is raised to ``rate`` (``p`` of the
   ``torch.nn`` dropouts and of torchvision's ``StochasticDepth``, ``drop_prob`` of timm's
   ``DropPath`` and ``DropBlock2d``, the ``drop_rate`` that a module passes to a functional
   dropout in its own ``forward``: torchvision's DenseNet layers, timm's classifier heads); a
   rate of 0 stays 0, since noise of rate 0 is no noise;
2. BatchNorm weights are drawn away from 0 (timm zero-initializes the last BatchNorm of each
   residual branch, which would hide a drop path behind it from any forward pass, though not
   from training, where the weight moves);
3. the model runs twice on the same input, with every module in training mode except the
   BatchNorms, which run in ``eval()``: once with every rate at 0 (noise off), once with the
   raised rates (noise on). During the noise-on pass each BatchNorm's output is replaced by its
   output of the noise-off pass ("frozen"), so noise never travels past the first BatchNorm it
   meets, as lint's search stops there.

The BatchNorms whose *input* differs between the two passes are fed by noise.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["noise_fed_batchnorms", "noise_rates"]

# The rate attribute of the noise modules the zoo tests use, by class name so that the helper
# imports neither torchvision nor timm.
_RATE_ATTRIBUTES = {"StochasticDepth": "p", "DropPath": "drop_prob", "DropBlock2d": "drop_prob"}
# A module whose own forward calls a functional dropout with this attribute as its rate.
_FUNCTIONAL_RATE_ATTRIBUTE = "drop_rate"


def noise_rates(model: nn.Module) -> dict[str, tuple[str, float]]:
    """``{module name: (rate attribute, rate)}`` of every noise rate the check can set."""
    found: dict[str, tuple[str, float]] = {}
    for name, module in model.named_modules():
        attribute = _rate_attribute(module)
        if attribute is not None:
            found[name] = (attribute, float(getattr(module, attribute)))
    return found


def noise_fed_batchnorms(
    model: nn.Module, example_inputs: Any, *, rate: float = 0.5, seed: int = 0
) -> set[str]:
    """The names of the BatchNorm modules (with running statistics) whose input changes when
    the noise is switched on, each BatchNorm's output frozen to its noise-off value (see the
    module docstring). ``model`` itself is left untouched (the check runs on a copy)."""
    probe = copy.deepcopy(model)
    rates = noise_rates(probe)
    norms = {
        name: m
        for name, m in probe.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }
    _prepare(probe, norms, seed)
    off_inputs: dict[str, list[Tensor]] = {name: [] for name in norms}
    off_outputs: dict[str, list[Tensor]] = {name: [] for name in norms}
    _set_rates(probe, rates, lambda old: 0.0)
    with _recording(norms, off_inputs, off_outputs), torch.no_grad():
        _call(probe, example_inputs)
    on_inputs: dict[str, list[Tensor]] = {name: [] for name in norms}
    _set_rates(probe, rates, lambda old: rate if old > 0 else 0.0)
    with _recording(norms, on_inputs, frozen=off_outputs), torch.no_grad():
        torch.manual_seed(seed)
        _call(probe, example_inputs)
    return {
        name
        for name in norms
        if any(_differs(a, b) for a, b in zip(off_inputs[name], on_inputs[name]))
    }


def _rate_attribute(module: nn.Module) -> str | None:
    if isinstance(module, _DropoutNd):
        return "p"
    attribute = _RATE_ATTRIBUTES.get(type(module).__name__)
    if attribute is not None:
        return attribute
    value = getattr(module, _FUNCTIONAL_RATE_ATTRIBUTE, None)
    if isinstance(value, float) and not isinstance(value, bool):
        return _FUNCTIONAL_RATE_ATTRIBUTE
    return None


def _set_rates(model: nn.Module, rates: Mapping[str, tuple[str, float]], new: Any) -> None:
    for name, (attribute, old) in rates.items():
        setattr(model.get_submodule(name), attribute, float(new(old)))


def _prepare(model: nn.Module, norms: Mapping[str, _BatchNorm], seed: int) -> None:
    """Training mode everywhere but the BatchNorms; BatchNorm weights in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for norm in norms.values():
            norm.eval()
            if norm.weight is not None:
                values = torch.rand(norm.weight.shape, generator=generator) + 0.5
                norm.weight.copy_(values.to(norm.weight))


@torch.no_grad()
def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def _recording(
    norms: Mapping[str, _BatchNorm],
    inputs: dict[str, list[Tensor]],
    outputs: dict[str, list[Tensor]] | None = None,
    frozen: Mapping[str, list[Tensor]] | None = None,
) -> Iterator[None]:
    """Hooks on every BatchNorm recording its inputs (and outputs), one entry per call; with
    ``frozen``, each call's output is replaced by the recorded output of the same call."""

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            calls = inputs[name]
            calls.append(args[0].detach().clone())
            if outputs is not None:
                outputs[name].append(output.detach().clone())
            return None if frozen is None else frozen[name][len(calls) - 1]

        return hook

    handles = [norm.register_forward_hook(hook_for(name)) for name, norm in norms.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _differs(off: Tensor, on: Tensor) -> bool:
    """Whether the noise changed a tensor beyond float rounding (relative to its scale)."""
    if off.shape != on.shape:
        return True
    scale = off.abs().max().item()
    return bool((on - off).abs().max().item() > 1e-5 * max(scale, 1e-12))

