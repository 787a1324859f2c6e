"""The data-flow graph that :func:`varshift.diagnose.lint` reasons about, and the search for the
paths along which noise reaches a normalization.

Both tracers (:mod:`~varshift.diagnose.trace_fx`, :mod:`~varshift.diagnose.trace_hooks`) reduce a
model to the same small graph: one node per call of a module or function, edges from the calls
that produced a tensor to the calls that consumed it. Each node carries its
:class:`~varshift.diagnose.roles.Role`, its noise spec when it is stochastic, and the weight
geometry (:mod:`~varshift.diagnose.geometry`) when it is a linear/conv layer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from varshift.diagnose.calls import call_noise_spec, function_label
from varshift.diagnose.geometry import (
    FUNCTIONAL_WEIGHT_LAYERS,
    module_weight_layer,
    weight_geometry,
)
from varshift.diagnose.roles import Role, classify_function, classify_module
from varshift.layers.registry import NoiseSpec, noise_spec

__all__ = ["CallType", "DataflowGraph", "GraphNode", "NoisePath", "noise_paths"]

CallType = Literal["input", "module", "function"]
"""What made a node: a model input, a module call, or a function/tensor-method call."""


@dataclass
class GraphNode:
    """One call in the data flow: a module call, a function call or a model input.

    ``fan_in`` and ``cos2`` are the weight geometry of a linear/conv call (else ``None``);
    the tracers leave ``cos2`` to be read from ``weight`` on first use (:meth:`weight_cos2`):
    most layers lie on no noise path, and reading every weight of a large model costs about
    as much as its forward. ``spec`` is the noise of a stochastic call (``None`` when the
    registry does not model it).
    """

    name: str
    role: Role
    inputs: list[int]
    call_type: CallType
    type_name: str
    spec: NoiseSpec | None = None
    fan_in: int | None = None
    cos2: float | None = None
    weight: Tensor | None = field(default=None, repr=False, compare=False)

    def weight_cos2(self) -> float | None:
        """``cos2``, read from ``weight`` the first time."""
        if self.weight is not None:
            _, self.cos2 = weight_geometry(self.weight)
            self.weight = None
        return self.cos2


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
        return self.add(GraphNode(name, Role.OTHER, [], "input", "input"))

    def add_module(self, name: str, module: nn.Module, inputs: list[int]) -> int:
        """A module call; its role, noise spec and weight geometry are read from the module."""
        role = classify_module(module)
        fan_in, weight = module_weight_layer(module)
        spec = noise_spec(module) if role is Role.STOCHASTIC else None
        kind = type(module).__name__
        return self.add(GraphNode(name, role, inputs, "module", kind, spec, fan_in, None, weight))

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
        if role is Role.STOCHASTIC:
            count = self._label_counts.get(label, 0) + 1
            self._label_counts[label] = count
            label = label if count == 1 else f"{label}#{count}"
            spec = call_noise_spec(fn, args, kwargs)
        fan_in: int | None = None
        if weight is not None and fn in FUNCTIONAL_WEIGHT_LAYERS:
            fan_in = math.prod(weight.shape[1:])
        else:
            weight = None
        kind = function_label(fn)
        node = GraphNode(label, role, inputs, "function", kind, spec, fan_in, None, weight)
        return self.add(node)


def noise_paths(graph: DataflowGraph) -> tuple[list[NoisePath], dict[int, set[int]]]:
    """Breadth-first search downstream of every stochastic node.

    Returns the shortest path to every ``TARGET`` reached without crossing another ``TARGET`` or
    a ``BARRIER`` (other stochastic nodes are crossed: the noise is still there), and for every
    ``BARRIER`` the stochastic nodes that reach it.
    """
    successors: list[list[int]] = [[] for _ in graph.nodes]
    for index, node in enumerate(graph.nodes):
        for producer in dict.fromkeys(node.inputs):
            successors[producer].append(index)
    paths: list[NoisePath] = []
    barriers: dict[int, set[int]] = {}
    for source, node in enumerate(graph.nodes):
        if node.role is not Role.STOCHASTIC:
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
                if role is Role.TARGET:
                    paths.append(NoisePath(source, nxt, _walk_back(came_from, nxt)))
                elif role is Role.BARRIER:
                    barriers.setdefault(nxt, set()).add(source)
                else:
                    queue.append(nxt)
    return paths, barriers


def _walk_back(parent: Mapping[int, int], end: int) -> tuple[int, ...]:
    chain = [end]
    while parent[chain[-1]] != -1:
        chain.append(parent[chain[-1]])
    return tuple(reversed(chain))
