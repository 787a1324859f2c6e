"""Reading and rewriting one recorded function call: its readable name, whether it writes into its
input, its noise spec, and the same call with its ``training``/``train`` switch turned on or off.

Both tracers record calls as ``(fn, args, kwargs)``: real values for the hooks tracer, ``torch.fx``
nodes where fx recorded a value computed in the graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from varshift.layers.registry import NoiseSpec, function_noise_spec

__all__ = [
    "call_noise_spec",
    "call_without_noise",
    "function_label",
    "is_inplace_call",
    "with_switch",
]

# fx records ``a / b`` as operator.truediv, the tensor method behind it is ``div``.
_OPERATOR_ALIASES = {"truediv": "div", "floordiv": "floor_divide"}

# torch's C++ dropouts have no Python signature; their switch is the third positional argument.
_BUILTIN_TRAIN_INDEX: dict[Callable[..., Any], int] = dict.fromkeys(
    (
        torch.dropout,
        torch.dropout_,
        torch.feature_dropout,
        torch.feature_dropout_,
        torch.alpha_dropout,
        torch.alpha_dropout_,
        torch.feature_alpha_dropout,
        torch.feature_alpha_dropout_,
    ),
    2,
)


def function_label(fn: Any) -> str:
    """A short readable name for a function or method, the same whichever tracer saw the call:
    ``F.dropout``, ``torch.cat``, and bare names for operators and tensor methods (``add``,
    ``getitem``, ``view``)."""
    if isinstance(fn, str):  # fx call_method target
        name = fn.strip("_")
        return _OPERATOR_ALIASES.get(name, name)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None) or ""
    if module == "torch.nn.functional":
        return f"F.{name}"
    if module == "torch":
        return f"torch.{name}"
    if module in ("_operator", "operator", "torch._tensor") or not module:
        # Operators and tensor methods (method descriptors have no __module__).
        name = name.strip("_")
        return _OPERATOR_ALIASES.get(name, name)
    return name


def _bind(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments | None:
    # signature() raises ValueError for builtins without one, bind() TypeError for a mismatch.
    try:
        return inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def is_inplace_call(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether a call overwrites its input (``inplace=True`` or a trailing-underscore op), so
    that every later use of the input tensor sees the result."""
    name = getattr(fn, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    if kwargs.get("inplace") is True:
        return True
    bound = _bind(fn, args, kwargs)
    return bound is not None and bound.arguments.get("inplace") is True


def with_switch(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], on: bool
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call's arguments with its ``training``/``train`` switch set to ``on``; ``None`` when
    the function has no such switch."""
    if fn in _BUILTIN_TRAIN_INDEX:
        index = _BUILTIN_TRAIN_INDEX[fn]
        if len(args) > index:
            return (*args[:index], on, *args[index + 1 :]), dict(kwargs)
        return args, {**kwargs, "train": on}
    bound = _bind(fn, args, kwargs)
    if bound is None:
        return None
    for switch in ("training", "train"):
        if switch in bound.signature.parameters:
            bound.arguments[switch] = on
            return bound.args, bound.kwargs
    return None


def call_without_noise(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, bool]:
    """Call a stochastic function with its ``training``/``train`` switch turned off.

    Returns ``(result, switched_off)``; ``switched_off`` is ``False`` when the function has no
    such switch (it then ran with its noise on).
    """
    switched = with_switch(fn, args, kwargs, False)
    if switched is None:
        return fn(*args, **kwargs), False
    return fn(*switched[0], **switched[1]), True


def call_noise_spec(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> NoiseSpec | None:
    """The registry's noise spec for one call of a stochastic function, read as if the call
    were made in training (a recorded call is stochastic whatever its ``training`` argument);
    ``None`` when the registry has none, or when a user's spec function cannot read an argument
    that fx recorded as a node (a rate computed in the graph has no value at trace time).

    Raises:
        ValueError: the registered spec function failed on arguments that are all real values
            (a bug in it, which a ``None`` would hide as "noise not modelled").
    """
    switched = with_switch(fn, args, kwargs, True)
    if switched is not None:
        args, kwargs = switched
    try:
        return function_noise_spec(fn, args, kwargs)
    except (TypeError, ValueError, AttributeError, LookupError) as error:
        # What arithmetic, float(), comparisons or indexing raise on an fx.Node.
        if _has_fx_node((args, kwargs)):
            return None
        raise ValueError(
            f"the spec function registered for {function_label(fn)} failed on the arguments "
            f"of a call: {type(error).__name__}: {error}"
        ) from error


def _has_fx_node(tree: Any) -> bool:
    return any(isinstance(leaf, fx.Node) for leaf in tree_flatten(tree)[0])
