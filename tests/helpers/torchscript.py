"""The two ways to turn a module into TorchScript, for the tests that check every public entry
point refuses a TorchScript model with the same advice (pass the original module)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn


def scripted(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.jit.script(model)`` (``example`` unused: scripting needs no input)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        warnings.simplefilter("ignore", FutureWarning)  # and says so with this class from 2.14
        return torch.jit.script(model)


def jit_traced(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.jit.trace`` of the model in eval mode on ``example``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(model.eval(), example)


TorchScriptConversion = Callable[[nn.Module, torch.Tensor], nn.Module]
#: For ``pytest.mark.parametrize("to_torchscript", TO_TORCHSCRIPT, ids=TO_TORCHSCRIPT_IDS)``.
TO_TORCHSCRIPT: list[TorchScriptConversion] = [scripted, jit_traced]
TO_TORCHSCRIPT_IDS = ["script", "trace"]
