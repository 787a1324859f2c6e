"""Data flow by running the model once on example inputs, for models fx cannot trace.

What is recorded is the real data flow of that run, never the order in which modules were
registered (which need not be the order in which ``forward`` uses them):

* forward pre-/post-hooks on every module keep a stack of the modules being run; noise layers,
  normalizations and built-in ``torch.nn`` leaves become one node each, and nothing inside them
  is recorded;
* a :class:`~torch.overrides.TorchFunctionMode` sees every torch function and tensor method
  called elsewhere (``F.dropout``, ``torch.cat``, ``+``, indexing, reshapes) and records which
  tensors each call consumed and produced;
* registered stochastic Python functions, which do not dispatch through ``__torch_function__``,
  are rebound to a recording wrapper in the namespaces where a ``forward`` can find them (as
  fx's ``autowrap`` does), for the one run only
  (:func:`~varshift.diagnose.namespaces.replaced_stochastic_functions`, undone in ``finally``).

Tensors are matched by identity; every tensor seen is kept alive until the trace ends so that
identities are never reused. A call that writes into its input (``inplace=True``, ``add_``,
``x[i] = y``) becomes the new producer of that tensor. Writes through a *view* of a tensor are
not traced back to the tensor it views.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from varshift.diagnose.calls import call_without_noise, is_inplace_call
from varshift.diagnose.graph import DataflowGraph
from varshift.diagnose.namespaces import replaced_stochastic_functions
from varshift.diagnose.roles import Role, classify_function, classify_module, is_atomic_module
from varshift.diagnose.trace_state import measurement_state

__all__ = ["HookTrace", "hook_trace"]


@dataclass
class HookTrace:
    """The recorded graph, (a copy of) the input of each stochastic node, and the stochastic
    functions whose noise could not be switched off during the run."""

    graph: DataflowGraph
    inputs: dict[int, Tensor]
    noisy: list[str]


@dataclass
class _Frame:
    name: str
    atomic: bool
    ignored: bool


class _Recorder(TorchFunctionMode):
    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        super().__init__()
        self.names = names
        self.graph = DataflowGraph()
        self.producer: dict[int, int] = {}
        self.alive: list[Tensor] = []
        self.frames: list[_Frame] = []
        self.suppress = 0
        self.inputs: dict[int, Tensor] = {}
        self.noisy: list[str] = []

    # -- tensors -------------------------------------------------------------------------
    def sources(self, *trees: Any) -> list[int]:
        found: list[int] = []
        for tree in trees:
            for leaf in tree_flatten(tree)[0]:
                if isinstance(leaf, Tensor) and id(leaf) in self.producer:
                    found.append(self.producer[id(leaf)])
        return list(dict.fromkeys(found))

    def produce(self, tree: Any, index: int) -> None:
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, Tensor):
                self.alive.append(leaf)
                self.producer[id(leaf)] = index

    def add_inputs(self, args: tuple[Any, ...]) -> None:
        leaves = [leaf for leaf in tree_flatten(args)[0] if isinstance(leaf, Tensor)]
        for number, leaf in enumerate(leaves):
            name = "input" if len(leaves) == 1 else f"input[{number}]"
            self.produce(leaf, self.graph.add_input(name))

    def fresh(self, output: Any, inputs: tuple[Any, ...]) -> Any:
        """``output`` with every tensor that *is* one of ``inputs`` replaced by a new alias, so
        that an identity (a noise layer with its noise off) does not re-label its input."""
        ids = {id(leaf) for leaf in tree_flatten(inputs)[0] if isinstance(leaf, Tensor)}
        self.suppress += 1
        try:
            return tree_map(
                lambda t: t.view_as(t) if isinstance(t, Tensor) and id(t) in ids else t, output
            )
        finally:
            self.suppress -= 1

    @property
    def owner(self) -> str:
        for frame in reversed(self.frames):
            if not frame.ignored:
                return frame.name
        return "<root>"

    # -- modules -------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.suppress:
            self.frames.append(_Frame("", atomic=False, ignored=True))
            return
        atomic = is_atomic_module(module)
        self.frames.append(_Frame(self.names.get(module, type(module).__name__), atomic, False))
        if atomic:
            self.suppress += 1

    def post_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        frame = self.frames.pop()
        if frame.ignored or not frame.atomic:
            return None
        try:  # still suppressed: the statistics below must not be recorded as calls
            index = len(self.graph.nodes)
            if classify_module(module) is Role.STOCHASTIC:
                self.measure(index, args, kwargs)
            self.graph.add_module(frame.name, module, self.sources(args, kwargs))
            if not getattr(module, "inplace", False):
                output = self.fresh(output, (args, kwargs))
            self.produce(output, index)
            return output
        finally:
            self.suppress -= 1

    def measure(self, index: int, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        first = next(
            (leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, Tensor)), None
        )
        if first is not None:
            self.inputs[index] = first.detach().clone()  # the model may write into it later

    # -- functions -----------------------------------------------------------------------
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.suppress:
            return func(*args, **kwargs)
        if classify_function(func, args, kwargs) is Role.STOCHASTIC:
            return self.stochastic_call(func, args, kwargs)
        output = func(*args, **kwargs)
        inputs = self.sources(args, kwargs)
        if not inputs:
            return output  # built from constants and parameters only: carries no signal
        if getattr(func, "__name__", "") == "__setitem__":
            output_tree: Any = args[0]  # x[i] = y writes into x and returns None
        else:
            output_tree = output
        if any(isinstance(leaf, Tensor) for leaf in tree_flatten(output_tree)[0]):
            weight = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None
            index = self.graph.add_function(func, self.owner, args, kwargs, inputs, weight)
            self.produce(output_tree, index)
        return output

    def stochastic_call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.suppress += 1  # nothing inside the call, nor the statistics, is a separate node
        try:
            index = len(self.graph.nodes)
            self.measure(index, args, kwargs)
            output, switched_off = call_without_noise(func, args, kwargs)
            self.graph.add_function(func, self.owner, args, kwargs, self.sources(args, kwargs))
            if not switched_off:
                self.noisy.append(self.graph.nodes[index].name)
            if not is_inplace_call(func, args, kwargs):
                output = self.fresh(output, (args, kwargs))
            self.produce(output, index)
            return output
        finally:
            self.suppress -= 1

    def recording(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped to be recorded as one stochastic call (outside an atomic module)."""

        @functools.wraps(fn)
        def record(*args: Any, **kwargs: Any) -> Any:
            if self.suppress:
                return fn(*args, **kwargs)
            return self.stochastic_call(fn, args, kwargs)

        return record


def hook_trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HookTrace:
    """Run ``model(*args, **kwargs)`` once (noise off; BatchNorm buffers and random state
    restored afterwards) and record its data flow."""
    names = {module: name or "<root>" for name, module in model.named_modules()}
    recorder = _Recorder(names)
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(recorder.pre_hook))
            handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True))
        recorder.add_inputs((args, kwargs))
        with (
            measurement_state(model),
            replaced_stochastic_functions(model, recorder.recording),
            recorder,
        ):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return HookTrace(recorder.graph, recorder.inputs, recorder.noisy)
