"""Models by name: a factory spec (``pkg.module:factory``, ``torchvision:NAME``, ``timm:NAME``)
and a checkpoint file.

    from varshift.checkpoints import load_model

    model = load_model("mypkg.nets:make_net", checkpoint="runs/net.pt")
    model = load_model("timm:efficientnet_b0", "fixed.safetensors", drop_path_rate=0.2)

This is what ``varshift diagnose`` and ``varshift recalibrate`` do with ``--model`` and
``--checkpoint``; the same functions serve a script or a notebook. Every error is a
``ValueError``, ``TypeError``, ``ImportError`` or ``OSError`` with a one-line message that names
the spec or the file, so a command line can print it as it is.

- A spec is ``pkg.module:attribute`` (dots in the attribute reach nested objects); the module is
  imported from ``sys.path`` as it stands. :func:`resolve_factory` finds it, :func:`call_factory`
  calls it, with keyword arguments if given.
- A zoo spec is ``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None)``) or
  ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``): randomly initialised, since no
  weights are downloaded; keyword arguments go to the model (``drop_path_rate=0.2``). An unknown
  name is refused with the close matches. ``pip install 'varshift[zoo]'`` installs both.
- A checkpoint is a ``state_dict`` saved with ``torch.save`` and read with
  ``weights_only=True`` (no code runs while it is read), possibly nested in a training
  script's dict under one of :data:`NESTED_STATE_KEYS`, or a ``.safetensors`` file.
  :func:`save_state_dict` writes either, chosen by the file's suffix.

This module imports nothing else of varshift.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NESTED_STATE_KEYS",
    "SAFETENSORS_SUFFIX",
    "ZOO_PREFIXES",
    "call_factory",
    "keyword_value",
    "load_checkpoint",
    "load_model",
    "read_state_dict",
    "resolve_factory",
    "save_state_dict",
    "state_dict_mismatch",
]

NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts commonly nest the ``state_dict`` in a checkpoint dict,
tried in this order when the checkpoint's values are not all tensors."""

SAFETENSORS_SUFFIX = ".safetensors"
"""A checkpoint whose name ends in this is read and written with ``safetensors.torch``."""

ZOO_PREFIXES = ("torchvision", "timm")
"""Spec prefixes (``PREFIX:NAME``) that name a model of a model zoo rather than a factory."""

# How many names a message lists before it says "and N more".
_NAMES_SHOWN = 3

# Keyword arguments that would make a zoo fetch weights: none are reachable offline.
_WEIGHT_ARGUMENTS = ("pretrained", "weights", "weights_backbone")

_ZOO_INSTALL = "pip install 'varshift[zoo]'"

PathLike = str | os.PathLike[str]


def resolve_factory(spec: str, *, argument: str = "spec") -> Callable[..., Any]:
    """The callable that ``spec`` (``"pkg.module:attribute"``) names.

    Args:
        spec: module and attribute, separated by a colon; ``attribute`` may be dotted
            (``"pkg.module:Zoo.make"``). ``torchvision:NAME`` and ``timm:NAME`` name a model of
            that zoo instead: the callable builds it, randomly initialised, from its keyword
            arguments.
        argument: how messages call the spec (``"--model"`` on the command line).

    Raises:
        ValueError: ``spec`` is not of the form ``module:attribute``, or a zoo has no model
            ``NAME`` (the close matches are listed).
        ImportError: the module (or the zoo) cannot be imported (whatever its import raised is
            quoted), or it has no such attribute.
        TypeError: the attribute is not callable.
    """
    module_name, _, attribute = spec.partition(":")
    if module_name in ZOO_PREFIXES:
        if not attribute.strip():
            raise ValueError(f"{argument} {module_name}:NAME needs a model name, got {spec!r}")
        return _zoo_factory(module_name, attribute.strip(), spec, argument)
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


def keyword_value(text: str) -> tuple[str, Any]:
    """The name and the value of a ``KEY=VALUE`` text (``drop_path_rate=0.2``), ``KEY`` a
    Python name: the value read as a Python literal (``0.2``, ``True``, ``None``, ``(1, 2)``,
    ``'relu'``), else kept as the plain string (``act_layer=relu`` gives ``"relu"``).

    Raises:
        ValueError: no ``=``, or ``KEY`` is not a Python name.
    """
    if not isinstance(text, str):
        raise TypeError(f"a keyword argument must be a KEY=VALUE text, got {text!r}")
    key, equals, value = text.partition("=")
    if not equals or not key.strip().isidentifier():
        raise ValueError(
            f"must be KEY=VALUE with KEY a Python name (e.g. drop_path_rate=0.2), got {text!r}"
        )
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key.strip(), value


def call_factory(spec: str, *, argument: str = "spec", **kwargs: Any) -> Any:
    """Call the factory ``spec`` names with ``kwargs`` and return what it returns.

    Raises what :func:`resolve_factory` raises; ``TypeError`` naming the keyword argument when
    the factory does not take it; ``ValueError`` (quoting the exception) when the call raises
    anything else.
    """
    factory = resolve_factory(spec, argument=argument)
    if spec.partition(":")[0] in ZOO_PREFIXES:
        _refuse_weights(spec, argument, kwargs)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        if not kwargs:
            raise ValueError(
                f"{argument} {spec}: calling it raised {_exception_text(exc)}"
            ) from exc
        raise TypeError(_keyword_message(spec, argument, kwargs, exc)) from exc
    except Exception as exc:
        raise ValueError(f"{argument} {spec}: calling it raised {_exception_text(exc)}") from exc


def load_model(
    spec: str, checkpoint: PathLike | None = None, *, argument: str = "model", **kwargs: Any
) -> nn.Module:
    """The ``nn.Module`` the factory ``spec`` returns, with ``checkpoint`` loaded into it.

    Args:
        spec: ``"pkg.module:factory"``, a function (or a class); or ``"torchvision:NAME"`` /
            ``"timm:NAME"``, a zoo's model, randomly initialised (no weights are downloaded:
            ``pretrained``/``weights`` are refused).
        checkpoint: a ``state_dict`` file, see :func:`load_checkpoint`; ``None`` keeps the
            factory's weights.
        argument: how messages call the spec.
        kwargs: keyword arguments of the factory or of the zoo's model
            (``drop_path_rate=0.2``).

    Raises:
        TypeError: the factory does not take one of ``kwargs``, or returned something that is
            not an ``nn.Module``.
        ValueError, ImportError, OSError: see :func:`call_factory` and :func:`load_checkpoint`.
    """
    model = call_factory(spec, argument=argument, **kwargs)
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
    not all tensors, the first of :data:`NESTED_STATE_KEYS` that holds a mapping is used. A name
    ending in :data:`SAFETENSORS_SUFFIX` is read with ``safetensors.torch.load_file`` instead.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: the file cannot be read.
        ValueError: the file is not a checkpoint ``torch.load`` (or safetensors) can read
            safely (corrupt, truncated, or pickling arbitrary objects), or it holds no
            ``state_dict``.
        ImportError: a ``.safetensors`` file, and safetensors is not installed.
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file")
    if not file.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if file.suffix.lower() == SAFETENSORS_SUFFIX:
        return _read_safetensors(file)
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


def save_state_dict(state: Mapping[str, Tensor], path: PathLike) -> Path:
    """Write ``state`` (a ``state_dict``) to ``path``, creating its folder; returns the path.

    A name ending in :data:`SAFETENSORS_SUFFIX` is written with
    ``safetensors.torch.save_file`` (tensors copied first, since safetensors refuses tensors
    that share memory, as tied weights do); any other with ``torch.save``. Either is read back
    by :func:`read_state_dict`.

    Raises:
        ImportError: a ``.safetensors`` name, and safetensors is not installed.
        TypeError: a value of ``state`` is not a tensor (safetensors holds tensors only).
    """
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix.lower() != SAFETENSORS_SUFFIX:
        torch.save(state, file)
        return file
    save_file = _safetensors_torch(path).save_file
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise TypeError(
            f"cannot write {path} as safetensors: {_some(not_tensors)} are not tensors "
            "(use a .pt name to save with torch.save)"
        )
    tensors = {str(key): value.detach().cpu().clone().contiguous() for key, value in state.items()}
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def _read_safetensors(file: Path) -> Mapping[str, Tensor]:
    load_file = _safetensors_torch(file).load_file
    try:
        return dict(load_file(str(file), device="cpu"))
    except PermissionError as exc:
        raise PermissionError(f"cannot read checkpoint {file}: permission denied") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError on a damaged file
        raise ValueError(
            f"cannot read checkpoint {file} (expected a safetensors file): {_exception_text(exc)}"
        ) from exc


def _safetensors_torch(path: PathLike) -> Any:
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError as exc:
        raise ImportError(
            f"checkpoint {path} is a safetensors file, and safetensors is not installed: "
            f"{_ZOO_INSTALL} (or pip install safetensors)"
        ) from exc


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


# --- model zoos ----------------------------------------------------------------------------------


def _zoo_factory(zoo: str, name: str, spec: str, argument: str) -> Callable[..., Any]:
    """A function of keyword arguments that builds ``zoo``'s model ``name``, randomly
    initialised; the name is checked now, against the zoo's list."""
    try:
        library = importlib.import_module(zoo)
    except ImportError as exc:
        raise ImportError(
            f"{argument} {spec} needs {zoo}, which is not installed: {_ZOO_INSTALL}"
        ) from exc
    if zoo == "torchvision":
        models = importlib.import_module("torchvision.models")
        known = list(models.list_models())
        if name.lower() not in known:
            raise ValueError(_unknown_model_message(spec, argument, name, known))
        return functools.partial(models.get_model, name.lower(), weights=None)
    known = list(library.list_models())
    if not library.is_model(name):
        raise ValueError(_unknown_model_message(spec, argument, name, known))
    return functools.partial(library.create_model, name, pretrained=False)


def _unknown_model_message(spec: str, argument: str, name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=_NAMES_SHOWN, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{argument} {spec}: no model {name!r} among the {len(known)} models it has{hint}"


def _refuse_weights(spec: str, argument: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse the arguments that ask a zoo for its trained weights: no download can succeed
    offline, and a failed one would end in a long network traceback."""
    asked = [key for key in _WEIGHT_ARGUMENTS if kwargs.get(key) not in (None, False)]
    if asked:
        raise ValueError(
            f"{argument} {spec}: {asked[0]}={kwargs[asked[0]]!r} asks for trained weights, but "
            "no weights are reachable offline: the model is randomly initialised; load yours "
            "with --checkpoint (checkpoint=...)"
        )


def _keyword_message(spec: str, argument: str, kwargs: Mapping[str, Any], exc: TypeError) -> str:
    """One line naming the keyword argument the factory refused (Python's message says which,
    in ``got an unexpected keyword argument 'name'``), or all of them when it does not say."""
    given = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if match:
        return (
            f"{argument} {spec} takes no keyword argument {match.group(1)!r} "
            f"(given: {given}): {_exception_text(exc)}"
        )
    return f"{argument} {spec}: calling it with {given} raised {_exception_text(exc)}"


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
