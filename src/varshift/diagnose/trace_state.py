"""Temporary model state for tracing: every module in training mode, and, for a run on real
inputs, nothing the run changes left behind (BatchNorm buffers, random-number state, the
stochastic layers' flags).

Tracing in training mode is what makes the verdict independent of the mode the model is in:
``F.dropout(x, p, training=self.training)`` and ``if self.training: x = F.dropout(x)`` only show
up in the data flow when ``self.training`` is ``True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from varshift.layers.registry import is_stochastic

__all__ = ["all_in_train_mode", "measurement_state"]


@contextlib.contextmanager
def all_in_train_mode(model: nn.Module) -> Iterator[None]:
    """Every module in ``train()``; each module's own flag restored on exit."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in flags:
            module.training = True
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def measurement_state(model: nn.Module) -> Iterator[None]:
    """For one forward pass on example inputs: every module in training mode except the
    stochastic modules (noise off, so each noise layer's input is what it is at test time, while
    BatchNorm normalizes with batch statistics), gradients off, and on exit the BatchNorm
    buffers and the random-number generators as they were."""
    devices = sorted(
        {t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda}
    )
    saved = [
        (buffer, buffer.detach().clone())
        for buffer in model.buffers()
        if not isinstance(buffer, nn.parameter.UninitializedBuffer)
    ]
    try:
        with all_in_train_mode(model), torch.random.fork_rng(devices=devices), torch.no_grad():
            for module in model.modules():
                if is_stochastic(module):
                    module.training = False
            yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
