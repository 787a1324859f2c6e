"""Models of yours, by name: a factory spec (``pkg.module:factory``) and a checkpoint file.

    from varshift.checkpoints import load_model

    model = load_model("mypkg.nets:make_net", checkpoint="runs/net.pt")

This is what ``varshift diagnose`` and ``varshift recalibrate`` do with ``--model`` and
``--checkpoint``; the same functions serve a script or a notebook. Every error is a
``ValueError``, ``TypeError``, ``ImportError`` or ``OSError`` with a one-line message that names
the spec or the file, so a command line can print it as it is.

- A spec is ``pkg.module:attribute`` (dots in the attribute reach nested objects); the module is
  imported from ``sys.path`` as it stands. :func:`resolve_factory` finds it, :func:`call_factory`
  calls it with no arguments. Other spec forms (a model zoo's ``NAME``) would be told apart from
  this one by their prefix in :func:`resolve_factory`.
- A checkpoint is a ``state_dict`` saved with ``torch.save`` and read with
  ``weights_only=True`` (no code runs while it is read), possibly nested in a training
  script's dict under one of :data:`NESTED_STATE_KEYS`. Other formats would be read by
  :func:`read_state_dict`, chosen by the file's suffix.

This module imports nothing else of varshift.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NESTED_STATE_KEYS",
    "call_factory",
    "load_checkpoint",
    "load_model",
    "read_state_dict",
    "resolve_factory",
    "state_dict_mismatch",
]

NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts commonly nest the ``state_dict`` in a checkpoint dict,
tried in this order when the checkpoint's values are not all tensors."""

# How many names a message lists before it says "and N more".
_NAMES_SHOWN = 3

PathLike = str | os.PathLike[str]


def resolve_factory(spec: str, *, argument: str = "spec") -> Callable[..., Any]:
    """The callable that ``spec`` (``"pkg.module:attribute"``) names.

    Args:
        spec: module and attribute, separated by a colon; ``attribute`` may be dotted
            (``"pkg.module:Zoo.make"``).
        argument: how messages call the spec (``"--model"`` on the command line).

    Raises:
        ValueError: ``spec`` is not of the form ``module:attribute``.
        ImportError: the module cannot be imported (whatever its import raised is quoted), or
            it has no such attribute.
        TypeError: the attribute is not callable.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{argument} must be pkg.module:function, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # anything the module raises at import is the user's to fix
        raise ImportError(
            f"{argument} {spec}: cannot import {module_name!r}: {_exception_text(exc)}"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ImportError(f"{argument} {spec}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(
            f"{argument} {spec}: {attribute!r} is a {type(target).__name__}, not callable"
        )
    return target  # type: ignore[no-any-return]


def call_factory(spec: str, *, argument: str = "spec") -> Any:
    """Call the factory ``spec`` names with no arguments and return what it returns.

    Raises what :func:`resolve_factory` raises, and ``ValueError`` (quoting the exception) when
    the call itself raises.
    """
    factory = resolve_factory(spec, argument=argument)
    try:
        return factory()
    except Exception as exc:
        raise ValueError(f"{argument} {spec}: calling it raised {_exception_text(exc)}") from exc


def load_model(
    spec: str, checkpoint: PathLike | None = None, *, argument: str = "model"
) -> nn.Module:
    """The ``nn.Module`` the factory ``spec`` returns, with ``checkpoint`` loaded into it.

    Args:
        spec: ``"pkg.module:factory"``, a function (or a class) that needs no arguments.
        checkpoint: a ``state_dict`` file, see :func:`load_checkpoint`; ``None`` keeps the
            factory's weights.
        argument: how messages call the spec.

    Raises:
        TypeError: the factory returned something that is not an ``nn.Module``.
        ValueError, ImportError, OSError: see :func:`call_factory` and :func:`load_checkpoint`.
    """
    model = call_factory(spec, argument=argument)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{argument} {spec} returned an object of type {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: PathLike, *, require_finite: bool = True) -> None:
    """Load the ``state_dict`` in ``path`` into ``model``, in place, keys and shapes exactly.

    Everything is checked before ``model`` is touched, so a refused checkpoint leaves it as it
    was: the keys and shapes must match the model's (the message lists missing and unexpected
    keys and shape differences), and with ``require_finite`` every floating-point tensor must be
    free of NaN and infinity (a model that diverged in training cannot be diagnosed or fixed).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, ValueError: see
            :func:`read_state_dict`.
        ValueError: the state does not match the model, or holds non-finite values.
    """
    state = read_state_dict(path)
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model: {problems}")
    if require_finite:
        broken = [key for key, value in state.items() if not _finite(value)]
        if broken:
            raise ValueError(
                f"checkpoint {path} holds NaN or infinite values in {_some(broken)}: "
                "the model it comes from diverged or the file is damaged"
            )
    try:
        model.load_state_dict(state)
    except Exception as exc:  # what the key and shape checks above cannot see
        raise ValueError(
            f"checkpoint {path} does not match the model: {_exception_text(exc)}"
        ) from exc


def read_state_dict(path: PathLike) -> Mapping[str, Tensor]:
    """The ``state_dict`` saved in ``path`` (on the CPU), unnested from a training script's dict.

    Read with ``torch.load(path, map_location="cpu", weights_only=True)``. When the values are
    not all tensors, the first of :data:`NESTED_STATE_KEYS` that holds a mapping is used.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: the file cannot be read.
        ValueError: the file is not a checkpoint ``torch.load`` can read safely (corrupt,
            truncated, or pickling arbitrary objects), or it holds no ``state_dict``.
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file")
    if not file.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot read checkpoint {path}: permission denied") from exc
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {path} (expected a state_dict saved with torch.save): "
            f"{_exception_text(exc)}"
        ) from exc
    if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        nested = [state[key] for key in NESTED_STATE_KEYS if isinstance(state.get(key), Mapping)]
        state = nested[0] if nested else state
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    return state


def state_dict_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """Missing keys, unexpected keys and shape differences of ``state`` against ``expected``
    (a model's ``state_dict()``), on one line; ``""`` when they match."""
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    shapes = [
        f"{key} is {tuple(state[key].shape)} in the checkpoint, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state and hasattr(state[key], "shape") and state[key].shape != value.shape
    ]
    parts = [
        f"{label} {_some(names)}"
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch:", shapes),
        )
        if names
    ]
    return "; ".join(parts)


def _exception_text(exc: BaseException) -> str:
    """``Type: message`` with every line of the message joined by spaces (``load_state_dict``
    and many loaders put the useful part on the later lines)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _finite(value: Any) -> bool:
    if isinstance(value, Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _some(names: Sequence[str]) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
