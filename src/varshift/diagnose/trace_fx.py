"""Data flow by ``torch.fx`` symbolic tracing (no data needed).

The tracer keeps noise layers, normalizations and the built-in ``torch.nn`` leaves as single
nodes, and keeps registered stochastic Python functions (``varshift.layers.functional.*``, user
functions registered with ``register_stochastic_function``) as single ``call_function`` nodes
instead of tracing through them; torch's own dropouts are recorded as calls by fx already.
Tracing runs with every module in training mode (see :mod:`~varshift.diagnose.trace_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import Tensor, nn
from torch.fx.proxy import TraceError

from varshift.diagnose.calls import call_without_noise
from varshift.diagnose.graph import DataflowGraph
from varshift.diagnose.namespaces import module_namespaces, stochastic_names
from varshift.diagnose.roles import Role, is_atomic_module
from varshift.diagnose.trace_state import all_in_train_mode, measurement_state

__all__ = ["FxTrace", "UntraceableError", "fx_measure", "fx_trace"]

# What torch.fx raises when symbolic tracing meets Python it cannot record. Caught around the
# trace call alone, so that a bug in the conversion below is never mistaken for "fx cannot
# trace this model" and silently answered by the hooks tracer.
_FX_TRACE_ERRORS: tuple[type[BaseException], ...] = (
    TraceError,  # control flow on a traced value: if, bool(), iteration, assert
    TypeError,  # a traced value where Python needs a number: range(), int(), a list index
    ValueError,  # a library refusing a traced value (numpy's array protocol)
    RuntimeError,  # len() of a traced value; NotImplementedError for a module without forward
    LookupError,  # a traced value used as a dict key
    AssertionError,  # fx's own internal checks on the module it is given
)


class UntraceableError(Exception):
    """torch.fx could not trace the model; the message is fx's reason in one line and
    ``__cause__`` the error fx raised."""


@dataclass
class FxTrace:
    """The traced fx graph module and its reduction to a :class:`DataflowGraph`."""

    graph: DataflowGraph
    module: fx.GraphModule
    index: dict[fx.Node, int] = field(default_factory=dict)


class _LintTracer(fx.Tracer):
    def __init__(self, stochastic_fns: list[Callable[..., Any]], search: list[Any]) -> None:
        super().__init__(autowrap_functions=tuple(stochastic_fns))
        # fx patches autowrapped functions found by name in each forward's globals; for calls
        # through a module attribute (``VF.gaussian_dropout``) the Python module must be searched
        # too. ``_autowrap_search`` is fx's own list for that (an attribute since torch 1.8).
        searched = getattr(self, "_autowrap_search", None)
        if isinstance(searched, list):
            searched.extend(search)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Not fx's default rule, which keeps every torch.nn module whole, containers such as
        # nn.TransformerEncoderLayer included, and would hide their dropout children.
        return is_atomic_module(m)


def fx_trace(model: nn.Module) -> FxTrace:
    """Trace ``model`` with fx in training mode.

    Raises:
        UntraceableError: fx cannot trace the model (data-dependent control flow, ``len`` of a
            traced tensor, ...).
    """
    namespaces, python_modules = module_namespaces(model)
    fns = list({id(fn): fn for ns in namespaces for _, fn in stochastic_names(ns)}.values())
    tracer = _LintTracer(fns, python_modules)
    try:
        with all_in_train_mode(model):
            graph = tracer.trace(model)
    except _FX_TRACE_ERRORS as error:
        raise UntraceableError(_error_summary(error)) from error
    trace = FxTrace(DataflowGraph(), fx.GraphModule(tracer.root, graph))
    for node in graph.nodes:
        index = _add_node(model, node, trace)
        if index is not None:
            trace.index[node] = index
    return trace


def _error_summary(error: BaseException) -> str:
    """``"TypeError: first line of the message"``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _add_node(model: nn.Module, node: fx.Node, trace: FxTrace) -> int | None:
    """Add one fx node to ``trace.graph``; its index, or ``None`` for a node that carries no
    activation."""
    inputs = [trace.index[n] for n in node.all_input_nodes if n in trace.index]
    if node.op == "placeholder":
        return trace.graph.add_input(str(node.target))
    if node.op == "call_module":
        target = str(node.target)
        return trace.graph.add_module(target, model.get_submodule(target), inputs)
    if node.op in ("call_function", "call_method"):
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            weight = _attribute_value(trace.module, str(weight.target))
        return trace.graph.add_function(
            node.target, _owner(node), node.args, node.kwargs, inputs,
            weight if isinstance(weight, Tensor) else None,
        )
    return None  # get_attr (parameters, constants) and output carry no activation


def _owner(node: fx.Node) -> str:
    """Qualified name of the module whose ``forward`` made the call (``<root>`` for the model)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "<root>"
    entry = next(reversed(stack.values()))
    name = entry[0] if isinstance(entry, tuple) else entry
    return str(name) or "<root>"


def _attribute_value(gm: fx.GraphModule, target: str) -> Any:
    """The object a ``get_attr`` node names (``"layer.weight"``), ``None`` if there is none."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


class _Measure(fx.Interpreter):
    """Runs the traced graph once, keeping (a copy of) the input of every stochastic node and
    running each noise layer with its noise off."""

    def __init__(self, trace: FxTrace) -> None:
        super().__init__(trace.module)
        self.trace = trace
        self.inputs: dict[int, Tensor] = {}
        self.noisy: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        index = self.trace.index.get(n)
        if index is None or self.trace.graph.nodes[index].role is not Role.STOCHASTIC:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is not None:
            self.inputs[index] = first.detach().clone()  # the model may write into it later
        if n.op != "call_function":
            return super().run_node(n)  # a noise module, already in eval() here
        result, switched_off = call_without_noise(n.target, args, kwargs)  # type: ignore[arg-type]
        if not switched_off:
            self.noisy.append(self.trace.graph.nodes[index].name)
        return result


def fx_measure(
    model: nn.Module, trace: FxTrace, args: tuple[Any, ...]
) -> tuple[dict[int, Tensor], list[str]]:
    """The input of every stochastic node on ``args`` (its statistics are computed only for
    the nodes on a noise path: :func:`~varshift.diagnose.channel_stats.channel_stats` on a
    large model costs more than its forward); also the names of stochastic functions whose
    noise could not be switched off for the run."""
    runner = _Measure(trace)
    with measurement_state(model):
        runner.run(*args)
    return runner.inputs, runner.noisy
