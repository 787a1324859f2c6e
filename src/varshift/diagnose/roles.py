"""The role each call of a traced model plays for the variance shift (Li et al., CVPR 2019).

Only four roles matter (:class:`Role`):

* ``STOCHASTIC``: a noise layer or function (:mod:`varshift.layers.registry` decides);
* ``TARGET``: a normalization that uses batch statistics in training and *running* statistics in
  ``eval()`` (BatchNorm and InstanceNorm with ``track_running_stats=True``). Its running variance
  is learnt with the noise on and used with the noise off: this is where the shift bites;
* ``BARRIER``: a normalization that re-normalizes with the statistics of the input it is given,
  in training and in ``eval()`` alike (BatchNorm without running statistics, InstanceNorm,
  LayerNorm, GroupNorm, RMSNorm). The scale change that the noise causes is divided out there,
  so noise upstream of it does not reach the layers downstream of it;
* ``OTHER``: everything the signal merely flows through (conv, linear, activations, pooling,
  concatenation, addition, reshapes).

A ``TARGET`` also stops the search: a BatchNorm that is fed by noise is where the shift arises,
and a second BatchNorm further down sees the first one's mismatch, not the noise itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from varshift.layers.registry import is_stochastic, is_stochastic_function, is_stochastic_method

__all__ = [
    "Role",
    "classify_function",
    "classify_module",
    "is_atomic_module",
    "is_registered_function",
    "unaffected_reason",
]


class Role(enum.Enum):
    """What a call does to the variance shift (see the module docstring)."""

    STOCHASTIC = "stochastic"
    TARGET = "target"
    BARRIER = "barrier"
    OTHER = "other"


# Per-sample normalizations: they never keep running statistics, so eval() behaves as training.
_PER_SAMPLE_NORMS: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
    if isinstance(cls, type)
)
_FUNCTIONAL_PER_SAMPLE_NORMS: frozenset[Callable[..., Any]] = frozenset(
    fn
    for fn in (
        F.layer_norm,
        F.group_norm,
        F.instance_norm,
        getattr(F, "rms_norm", None),
        torch.layer_norm,
        torch.group_norm,
        torch.instance_norm,
    )
    if fn is not None
)
# Where each functional batch norm takes ``running_mean`` (``None``: batch statistics always).
_FUNCTIONAL_BATCH_NORMS: dict[Callable[..., Any], tuple[int, str]] = {
    F.batch_norm: (1, "running_mean"),
    torch.batch_norm: (3, "running_mean"),
}


def classify_module(module: nn.Module) -> Role:
    """The role of a module."""
    if is_stochastic(module):
        return Role.STOCHASTIC
    if isinstance(module, _NormBase):
        # Covers BatchNorm1d/2d/3d, SyncBatchNorm, the Lazy variants and InstanceNorm*.
        return Role.TARGET if module.track_running_stats else Role.BARRIER
    if isinstance(module, _PER_SAMPLE_NORMS):
        return Role.BARRIER
    return Role.OTHER


def classify_function(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Role:
    """The role of a function or tensor-method call; ``args`` may hold tensors or fx nodes,
    and ``fn`` is a string for an fx ``call_method`` node (the method's name)."""
    if isinstance(fn, str):
        return Role.STOCHASTIC if is_stochastic_method(fn) else Role.OTHER
    if is_registered_function(fn) or _is_stochastic_tensor_method(fn):
        return Role.STOCHASTIC
    if fn in _FUNCTIONAL_BATCH_NORMS:
        index, name = _FUNCTIONAL_BATCH_NORMS[fn]
        running_mean = args[index] if len(args) > index else kwargs.get(name)
        return Role.TARGET if running_mean is not None else Role.BARRIER
    if fn in _FUNCTIONAL_PER_SAMPLE_NORMS:
        return Role.BARRIER
    return Role.OTHER


def is_registered_function(fn: Any) -> bool:
    """Whether ``fn`` is a callable in the registry of stochastic functions. Ops arrive as
    arbitrary objects (method descriptors, operator builtins); the registry answers ``False``
    for the unhashable ones."""
    return callable(fn) and is_stochastic_function(fn)


def _is_stochastic_tensor_method(fn: Any) -> bool:
    # What __torch_function__ receives for ``x.bernoulli_()``: TensorBase's method descriptor.
    owner = getattr(fn, "__qualname__", "").split(".")[0]
    return owner in ("TensorBase", "Tensor") and is_stochastic_method(getattr(fn, "__name__", ""))


def unaffected_reason(module: nn.Module) -> str:
    """Why a ``BARRIER`` normalization module does not suffer the shift."""
    if isinstance(module, _BatchNorm):
        return (
            "track_running_stats=False: normalizes with the current batch's statistics in "
            "eval() too"
        )
    if isinstance(module, _NormBase):
        return "track_running_stats=False: normalizes each sample with its own statistics"
    return "normalizes each sample with its own statistics; keeps no running statistics"


def is_atomic_module(module: nn.Module) -> bool:
    """Whether the tracers treat a module call as one node instead of looking inside it: noise
    layers and normalizations (their internals would hide what they are), and the built-in
    ``torch.nn`` modules without children (conv, linear, activations, pooling). Everything else
    is entered: a user module, so that a functional dropout in its ``forward`` is seen, and a
    built-in container such as ``nn.TransformerEncoderLayer``, whose dropout children count."""
    if classify_module(module) is not Role.OTHER:
        return True
    return type(module).__module__.startswith("torch.nn") and next(module.children(), None) is None
