"""The data-flow graph that :func:`varshift.diagnose.lint` reasons about, and the rules that give
each of its nodes a role.

Both tracers (:mod:`~varshift.diagnose.trace_fx`, :mod:`~varshift.diagnose.trace_hooks`) reduce a
model to the same small graph: one node per call of a module or function, edges from the calls
that produced a tensor to the calls that consumed it. Only four roles matter to the variance
shift (Li et al., CVPR 2019):

* ``stochastic``: a noise layer or function (:mod:`varshift.layers.registry` decides);
* ``target``: a normalization that uses batch statistics in training and *running* statistics in
  ``eval()`` (BatchNorm and InstanceNorm with ``track_running_stats=True``). Its running variance
  is learnt with the noise on and used with the noise off: this is where the shift bites;
* ``barrier``: a normalization that re-normalizes with the statistics of the input it is given,
  in training and in ``eval()`` alike (BatchNorm without running statistics, InstanceNorm,
  LayerNorm, GroupNorm, RMSNorm). The scale change that the noise causes is divided out there,
  so noise upstream of it does not reach the layers downstream of it;
* ``other``: everything the signal merely flows through (conv, linear, activations, pooling,
  concatenation, addition, reshapes).

A ``target`` also stops the search: a BatchNorm that is fed by noise is where the shift arises,
and a second BatchNorm further down sees the first one's mismatch, not the noise itself.
"""

from __future__ import annotations

import inspect
import math
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd

from varshift.layers.registry import (
    NoiseSpec,
    function_noise_spec,
    is_stochastic,
    is_stochastic_function,
    is_stochastic_method,
    noise_spec,
)

__all__ = [
    "BARRIER",
    "OTHER",
    "STOCHASTIC",
    "TARGET",
    "ChannelStats",
    "DataflowGraph",
    "GraphNode",
    "NoisePath",
    "call_noise_spec",
    "call_without_noise",
    "channel_stats",
    "classify_function",
    "classify_module",
    "is_atomic_module",
    "is_inplace_call",
    "module_namespaces",
    "module_weight_geometry",
    "noise_paths",
    "stochastic_names",
    "unaffected_reason",
    "weight_geometry",
    "with_switch",
]

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

_FUNCTIONAL_WEIGHT_LAYERS: frozenset[Callable[..., Any]] = frozenset(
    (F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
)

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


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and (population, ``ddof = 0``) variance of one tensor, channels on dim 1
    (dim 0 for a 1-D tensor), each channel pooled over the batch and all spatial positions."""

    mean: Tensor
    var: Tensor
    samples: int
    rho: float | None = None


@dataclass
class GraphNode:
    """One call in the data flow: a module call, a function call or a model input."""

    name: str
    role: str
    inputs: list[int]
    kind: str  # "input", "module" or "function"
    type_name: str
    spec: NoiseSpec | None = None
    fan_in: int | None = None
    cos2: float | None = None


@dataclass(frozen=True)
class NoisePath:
    """A shortest path from a stochastic node to the normalization node it feeds (indices into
    :attr:`DataflowGraph.nodes`, both ends included)."""

    source: int
    sink: int
    nodes: tuple[int, ...]


@dataclass
class DataflowGraph:
    """Nodes in execution order; ``inputs`` of a node only name earlier nodes."""

    nodes: list[GraphNode] = field(default_factory=list)
    _label_counts: dict[str, int] = field(default_factory=dict)

    def add(self, node: GraphNode) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def add_input(self, name: str) -> int:
        return self.add(GraphNode(name, OTHER, [], "input", "input"))

    def add_module(self, name: str, module: nn.Module, inputs: list[int]) -> int:
        """A module call; its role, noise spec and weight geometry are read from the module."""
        role = classify_module(module)
        fan_in, cos2 = module_weight_geometry(module)
        spec = noise_spec(module) if role == STOCHASTIC else None
        return self.add(
            GraphNode(name, role, inputs, "module", type(module).__name__, spec, fan_in, cos2)
        )

    def add_function(
        self,
        fn: Any,
        owner: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        inputs: list[int],
        weight: Tensor | None = None,
    ) -> int:
        """A function or method call made in the ``forward`` of ``owner``, named
        ``F.dropout@owner`` (``#2``, ``#3``… for further stochastic calls there); ``weight`` is
        the weight tensor of a functional linear/conv, for its geometry."""
        role = classify_function(fn, args, kwargs)
        label = f"{function_label(fn)}@{owner}"
        spec = None
        if role == STOCHASTIC:
            count = self._label_counts.get(label, 0) + 1
            self._label_counts[label] = count
            label = label if count == 1 else f"{label}#{count}"
            spec = call_noise_spec(fn, args, kwargs)
        fan_in: int | None = None
        cos2: float | None = None
        if weight is not None and fn in _FUNCTIONAL_WEIGHT_LAYERS:
            fan_in, cos2 = weight_geometry(weight)
        return self.add(
            GraphNode(label, role, inputs, "function", function_label(fn), spec, fan_in, cos2)
        )


def classify_module(module: nn.Module) -> str:
    """The role (see the module docstring) of a module."""
    if is_stochastic(module):
        return STOCHASTIC
    if isinstance(module, _NormBase):
        # Covers BatchNorm1d/2d/3d, SyncBatchNorm, the Lazy variants and InstanceNorm*.
        return TARGET if module.track_running_stats else BARRIER
    if isinstance(module, _PER_SAMPLE_NORMS):
        return BARRIER
    return OTHER


def unaffected_reason(module: nn.Module) -> str:
    """Why a ``barrier`` normalization module does not suffer the shift."""
    if isinstance(module, _BatchNorm):
        return (
            "track_running_stats=False: normalizes with the current batch's statistics in "
            "eval() too"
        )
    if isinstance(module, _NormBase):
        return "track_running_stats=False: normalizes each sample with its own statistics"
    return "normalizes each sample with its own statistics; keeps no running statistics"


def classify_function(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The role of a function call; ``args`` may hold tensors or fx nodes."""
    if isinstance(fn, str):  # an fx call_method node: a tensor method, by name
        return STOCHASTIC if is_stochastic_method(fn) else OTHER
    if _is_registered_function(fn) or _is_stochastic_tensor_method(fn):
        return STOCHASTIC
    if fn in _FUNCTIONAL_BATCH_NORMS:
        index, name = _FUNCTIONAL_BATCH_NORMS[fn]
        running_mean = args[index] if len(args) > index else kwargs.get(name)
        return TARGET if running_mean is not None else BARRIER
    if fn in _FUNCTIONAL_PER_SAMPLE_NORMS:
        return BARRIER
    return OTHER


def _is_registered_function(fn: Any) -> bool:
    # Ops arrive as arbitrary objects (method descriptors, operator builtins, strings for fx
    # call_method); the registry only knows hashable callables.
    try:
        return callable(fn) and is_stochastic_function(fn)
    except TypeError:
        return False


def _is_stochastic_tensor_method(fn: Any) -> bool:
    # What __torch_function__ receives for ``x.bernoulli_()``: TensorBase's method descriptor.
    owner = getattr(fn, "__qualname__", "").split(".")[0]
    return owner in ("TensorBase", "Tensor") and is_stochastic_method(getattr(fn, "__name__", ""))


def is_atomic_module(module: nn.Module) -> bool:
    """Whether the tracers treat a module call as one node instead of looking inside it: noise
    layers and normalizations (their internals would hide what they are), and the built-in
    ``torch.nn`` modules without children (conv, linear, activations, pooling). Everything else
    is entered: a user module, so that a functional dropout in its ``forward`` is seen, and a
    built-in container such as ``nn.TransformerEncoderLayer``, whose dropout children count."""
    if classify_module(module) != OTHER:
        return True
    return type(module).__module__.startswith("torch.nn") and next(module.children(), None) is None


# fx records ``a / b`` as operator.truediv, the tensor method behind it is ``div``.
_OPERATOR_ALIASES = {"truediv": "div", "floordiv": "floor_divide"}


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


def weight_geometry(weight: Tensor) -> tuple[int, float | None]:
    """Fan-in ``d`` of one output unit of a linear/conv weight ``Tensor[out, in/groups, *k]``
    and the mean over output units of ``cos²θ = (Σw)² / (d·Σw²)``, the angle between a unit's
    weights and the all-ones vector in Li et al.'s width analysis (``None`` if all are zero)."""
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    d = rows.shape[1]
    sq = rows.pow(2).sum(dim=1)
    keep = sq > 0
    if not bool(keep.any()):
        return d, None
    cos2 = rows.sum(dim=1)[keep].pow(2) / (d * sq[keep])
    return d, float(cos2.mean())


def module_weight_geometry(module: nn.Module) -> tuple[int | None, float | None]:
    """``(fan_in, cos²θ)`` of a linear or convolution module, ``(None, None)`` otherwise."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return None, None
    if isinstance(module, nn.Linear):
        return weight_geometry(weight)
    if isinstance(module, _ConvNd):
        if module.transposed:
            # Each output of a transposed conv sums in_channels/groups × kernel / stride inputs.
            stride = math.prod(module.stride)
            fan = module.in_channels // module.groups * math.prod(module.kernel_size)
            return max(1, fan // stride), None
        return weight_geometry(weight)
    return None, None


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> (
    inspect.BoundArguments | None
):
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
    ``None`` when the registry has none or a user's spec function cannot read the call."""
    switched = with_switch(fn, args, kwargs, True)
    if switched is not None:
        args, kwargs = switched
    try:
        return function_noise_spec(fn, args, kwargs)
    except Exception:  # user-registered spec functions may choke on an fx node as rate
        return None


def channel_stats(x: Tensor) -> ChannelStats:
    """Per-channel statistics of ``x`` (see :class:`ChannelStats`), in float64, with ``rho``
    the mean correlation between two different channels (``None`` for fewer than two channels
    that vary)."""
    data = x.detach().double()
    if data.dim() == 0:
        data = data.reshape(1, 1)
    elif data.dim() == 1:
        data = data.reshape(-1, 1)
    channels = data.transpose(0, 1).reshape(data.shape[1], -1)
    mean = channels.mean(dim=1)
    var = channels.var(dim=1, unbiased=False)
    rho = _mean_correlation(channels, mean, var)
    return ChannelStats(mean.cpu(), var.cpu(), int(channels.shape[1]), rho)


def _mean_correlation(channels: Tensor, mean: Tensor, var: Tensor) -> float | None:
    # Channels beyond the first 512 add cost (quadratic) but little to an average.
    live = (var > 0).nonzero().flatten()[:512]
    if live.numel() < 2:
        return None
    centred = (channels[live] - mean[live, None]) / var[live, None].sqrt()
    corr = centred @ centred.T / channels.shape[1]
    k = live.numel()
    return float((corr.sum() - corr.diagonal().sum()) / (k * (k - 1)))


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
        and not (value.__module__ or "").startswith("torch")
        and _is_registered_function(value)
    )


def stochastic_names(namespace: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, function)`` for each registered stochastic Python function in a namespace."""
    for name, value in list(namespace.items()):
        if not name.startswith("_") and _is_patchable(value):
            yield name, value


def noise_paths(graph: DataflowGraph) -> tuple[list[NoisePath], dict[int, set[int]]]:
    """Breadth-first search downstream of every stochastic node.

    Returns the shortest path to every ``target`` reached without crossing another ``target`` or
    a ``barrier`` (other stochastic nodes are crossed: the noise is still there), and for every
    ``barrier`` the stochastic nodes that reach it.
    """
    successors: list[list[int]] = [[] for _ in graph.nodes]
    for index, node in enumerate(graph.nodes):
        for producer in dict.fromkeys(node.inputs):
            successors[producer].append(index)
    paths: list[NoisePath] = []
    barriers: dict[int, set[int]] = {}
    for source, node in enumerate(graph.nodes):
        if node.role != STOCHASTIC:
            continue
        came_from: dict[int, int] = {source: -1}
        queue = deque([source])
        while queue:
            current = queue.popleft()
            for nxt in successors[current]:
                if nxt in came_from:
                    continue
                came_from[nxt] = current
                role = graph.nodes[nxt].role
                if role == TARGET:
                    paths.append(NoisePath(source, nxt, _walk_back(came_from, nxt)))
                elif role == BARRIER:
                    barriers.setdefault(nxt, set()).add(source)
                else:
                    queue.append(nxt)
    return paths, barriers


def _walk_back(parent: Mapping[int, int], end: int) -> tuple[int, ...]:
    chain = [end]
    while parent[chain[-1]] != -1:
        chain.append(parent[chain[-1]])
    return tuple(reversed(chain))
