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
from typing import Any

import torch
from torch import nn

from varshift.layers.registry import is_stochastic

__all__ = ["all_in_train_mode", "describe_shapes", "forward_failure", "measurement_state"]


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


def forward_failure(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> ValueError | None:
    """Why a tracer's run on example inputs failed, when the model's own forward is the cause.

    Runs ``model`` itself in the tracers' state (training mode, noise off, nothing left
    changed): if that fails too, returns a one-line :class:`ValueError` naming the input shapes
    and the model's error, with a hint when the eval-mode forward succeeds (a training-only
    branch, such as Inception's auxiliary head, that needs a larger input). Returns ``None``
    when the model's own forward succeeds: the failure is then lint's, and the caller re-raises
    it."""
    try:
        with measurement_state(model):
            model(*args, **kwargs)
    except Exception as own:  # any failure of the user's forward is reported
        reason = _one_line(own)
    else:
        return None
    name = type(model).__name__
    message = (
        f"the model's training-mode forward failed on example_inputs of shape "
        f"{describe_shapes(args, kwargs)}: {reason} — lint runs the model in training mode"
    )
    if _eval_forward_succeeds(model, args, kwargs):
        message += (
            f" ({name}'s eval-mode forward succeeds on this input, so its training-mode forward "
            "takes another path, e.g. an auxiliary head that needs a larger input); pass a "
            "larger example input"
        )
    else:
        message += "; pass example inputs that the model's forward accepts"
    return ValueError(message)


def describe_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``(2, 3, 96, 96)`` for one tensor; ``[(2, 3), x=(2,)]`` for several arguments."""
    parts = [_shape(value) for value in args]
    parts += [f"{key}={_shape(value)}" for key, value in kwargs.items()]
    return parts[0] if len(parts) == 1 and not kwargs else "[" + ", ".join(parts) + "]"


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return type(value).__name__


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _eval_forward_succeeds(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    with measurement_state(model):
        for module in model.modules():
            module.training = False
        try:
            model(*args, **kwargs)
        except Exception:  # only whether it succeeds matters here
            return False
    return True
