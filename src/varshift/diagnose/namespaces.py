"""Where a model's ``forward`` finds a registered stochastic Python function by name, and the one
place that temporarily rebinds such names in the user's modules.

Registered stochastic Python functions (``varshift.layers.functional.*``, user functions
registered with ``register_stochastic_function``) do not dispatch through ``__torch_function__``,
so a tracer only sees them where the ``forward`` looks them up: the globals of the module that
defines the ``forward`` (``gaussian_dropout(x, p)``), and the Python modules those globals name
(``VF.gaussian_dropout(x, p)``). ``torch.fx`` patches such names itself (``autowrap``); the hooks
tracer does it with :func:`replaced_stochastic_functions`. torch's own dropouts need neither.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from varshift.diagnose.roles import is_registered_function

__all__ = ["module_namespaces", "replaced_stochastic_functions", "stochastic_names"]


def module_namespaces(model: nn.Module) -> tuple[list[dict[str, Any]], list[types.ModuleType]]:
    """Where a ``forward`` can find a stochastic Python function by name: the globals of every
    module's ``forward`` and the Python modules those globals refer to (``VF.gaussian_dropout``).

    Returns ``(namespaces, python_modules)``; only Python modules that hold a registered
    stochastic function outside ``torch`` are kept (torch's own dropouts dispatch through
    ``__torch_function__`` and need no patching)."""
    namespaces: list[dict[str, Any]] = []
    python_modules: list[types.ModuleType] = []
    seen: set[int] = set()
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        globs = getattr(forward, "__globals__", None)
        if not isinstance(globs, dict) or id(globs) in seen:
            continue
        seen.add(id(globs))
        namespaces.append(globs)
        for value in list(globs.values()):
            if (
                isinstance(value, types.ModuleType)
                and id(value.__dict__) not in seen
                and any(_is_patchable(v) for v in list(vars(value).values()))
            ):
                seen.add(id(value.__dict__))
                namespaces.append(vars(value))
                python_modules.append(value)
    return namespaces, python_modules


def _is_patchable(value: Any) -> bool:
    return (
        isinstance(value, types.FunctionType)
        and (value.__module__ or "").split(".")[0] != "torch"  # torch itself; torchvision counts
        and is_registered_function(value)
    )


def stochastic_names(namespace: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, function)`` for each registered stochastic Python function in a namespace."""
    for name, value in list(namespace.items()):
        if not name.startswith("_") and _is_patchable(value):
            yield name, value


@contextlib.contextmanager
def replaced_stochastic_functions(
    model: nn.Module, replacement: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Inside the ``with`` block, every registered stochastic Python function that a
    ``forward`` of ``model`` finds by name (see :func:`module_namespaces`) is bound to
    ``replacement(fn)`` instead; on exit, normal or by an exception, every name is bound to its
    original function again. These are the *user's* module globals: nothing may outlive the
    block."""
    replaced: list[tuple[dict[str, Any], str, Any]] = []
    try:
        namespaces, _ = module_namespaces(model)
        for namespace in namespaces:
            for name, fn in stochastic_names(namespace):
                replaced.append((namespace, name, fn))
                namespace[name] = replacement(fn)
        yield
    finally:
        for namespace, name, fn in reversed(replaced):
            namespace[name] = fn
