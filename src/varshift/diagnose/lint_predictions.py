"""The predicted shifts of :func:`varshift.diagnose.lint` when it has example inputs: lint's
stochastic nodes become :class:`~varshift.diagnose.noise_montecarlo.NoiseSource` records, and
:func:`~varshift.diagnose.noise_moments.predict_on_trace` predicts on the graph lint traced
(no second trace, the same node names): in closed form where the path from a source to its
BatchNorm is linear, by Monte Carlo otherwise. When lint fell back to its hooks tracer, the
module sources are predicted the same way on a trace that keeps ``torch.nn``'s modules whole,
or, where fx cannot trace that either, by one Monte Carlo run in eager mode; either way the
noise is followed to the first normalization it meets, as on the fx path.

Which elements share one mask is not part of a :class:`~varshift.layers.registry.NoiseSpec`
(theory's per-unit formulas do not need it). The registry declares it with each stochastic
module or function (``register_stochastic(..., grouping=...)``: per channel for torch's
``Dropout1d/2d/3d``, per sample for torchvision's and timm's stochastic depth, ``"structured"``
for timm's DropBlock, see :mod:`varshift.layers.zoo`); :func:`register_noise_grouping` overrides
it, and holds ``"structured"`` (Monte Carlo only) for varshift's DropBlock, whose blocks no
grouping describes, and DropConnect, whose masks are on the weights. :func:`noise_grouping`
answers with both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from varshift.diagnose.bn_stats import batch_norms as bn_layers
from varshift.diagnose.graph import DataflowGraph
from varshift.diagnose.noise_moments import ShiftPrediction, predict_on_trace
from varshift.diagnose.noise_montecarlo import (
    EagerStops,
    Grouping,
    NoiseSource,
    chosen_batch_norms,
    model_state_kept,
    monte_carlo_shifts,
    trace_with_leaves,
)
from varshift.diagnose.roles import Role, classify_function, classify_module
from varshift.layers.dropblock import DropBlock2d, drop_block_2d
from varshift.layers.dropconnect import (
    DropConnectConv2d,
    DropConnectLinear,
    drop_connect_conv2d,
    drop_connect_linear,
)
from varshift.layers.registry import function_mask_grouping, mask_grouping

__all__ = ["DataPredictions", "noise_grouping", "predict_findings", "register_noise_grouping"]

_GROUPING_NAMES: tuple[Grouping, ...] = ("element", "channel", "sample", "structured")
_STRUCTURED: tuple[object, ...] = (
    DropBlock2d,
    drop_block_2d,
    DropConnectLinear,
    DropConnectConv2d,
    drop_connect_linear,
    drop_connect_conv2d,
)
# Overrides of the registry's groupings, by module class or function.
_GROUPINGS: dict[object, Grouping] = dict.fromkeys(_STRUCTURED, "structured")
_DRAWS = 32  # Monte Carlo forwards where a path is not linear
_SEED = 0  # lint is deterministic: the same masks on every call


def register_noise_grouping(
    target: type[nn.Module] | Callable[..., Any], grouping: Grouping
) -> None:
    """Declare which elements share one mask in the noise of a stochastic module class (and its
    subclasses) or function: ``"element"``, ``"channel"`` (each (sample, channel)),
    ``"sample"`` (stochastic depth) or ``"structured"`` (predicted by Monte Carlo only). Takes
    precedence over the grouping the registry holds for it."""
    if grouping not in _GROUPING_NAMES:
        raise ValueError(f"grouping must be one of {_GROUPING_NAMES}, got {grouping!r}")
    if not callable(target):
        raise TypeError(f"target must be a module class or a function, got {target!r}")
    _GROUPINGS[target] = grouping


def noise_grouping(
    target: object, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
) -> Grouping:
    """The grouping of a module (its class's, the most specific class in its MRO registered
    with :func:`register_noise_grouping`) or of a call ``target(*args, **kwargs)``; else the
    one the registry declares for it (``mask_grouping``, ``function_mask_grouping``),
    ``"element"`` unless said otherwise."""
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            if cls in _GROUPINGS:
                return _GROUPINGS[cls]
        return mask_grouping(target)
    try:
        override = _GROUPINGS.get(target)
    except TypeError:  # an unhashable target cannot have been registered
        return "element"
    return override if override is not None else function_mask_grouping(target, args, kwargs)


@dataclass
class DataPredictions:
    """``combined``: ``{bn: prediction with every modelled source on}``; ``alone``:
    ``{bn: {source: prediction with that source alone on}}``, both by lint's names."""

    combined: dict[str, ShiftPrediction]
    alone: dict[str, dict[str, ShiftPrediction]]


def predict_findings(
    model: nn.Module,
    graph: DataflowGraph,
    fx_nodes: Mapping[int, fx.Node] | None,
    gm: fx.GraphModule | None,
    args: tuple[Any, ...],
    pairs: Sequence[tuple[int, int]],
) -> DataPredictions:
    """Predictions for lint's ``(sink, source)`` node pairs on ``args``: on lint's fx graph when
    it traced with fx (``gm`` and ``fx_nodes``: graph index → fx node), else for the module
    sources by :func:`_predict_modules`. Sinks that are not BatchNorm modules with running
    statistics, and sources without a noise spec, are left out."""
    batch_norms = dict(bn_layers(model))
    sinks = list(dict.fromkeys(graph.nodes[s].name for s, _ in pairs))
    sinks = [name for name in sinks if name in batch_norms]
    sources = {i for _, i in pairs if _variance(graph, i) is not None}
    if not sinks or not sources:
        return DataPredictions({}, {})
    if gm is not None and fx_nodes is not None:
        plan = {
            fx_nodes[i]: _source(model, graph, i, fx_nodes[i])
            for i in sorted(_modelled(graph))
            if i in fx_nodes
        }
        # Lint's rule: noise is followed to the first normalization it meets, not through it.
        norms = (Role.TARGET, Role.BARRIER)
        stops = {n for i, n in fx_nodes.items() if graph.nodes[i].role in norms}
        combined, alone = predict_on_trace(
            model, gm, args, plan, sinks, draws=_DRAWS, seed=_SEED, stops=stops
        )
        return DataPredictions(combined, alone)
    return _predict_modules(model, graph, args, sinks, pairs)


def _modelled(graph: DataflowGraph) -> set[int]:
    """Every stochastic node with a noise spec of non-zero variance."""
    return {i for i, node in enumerate(graph.nodes) if _variance(graph, i)}


def _variance(graph: DataflowGraph, index: int) -> float | None:
    node = graph.nodes[index]
    if node.role is not Role.STOCHASTIC or node.spec is None:
        return None
    return node.spec.variance()


def _source(model: nn.Module, graph: DataflowGraph, index: int, node: fx.Node) -> NoiseSource:
    variance = _variance(graph, index)
    assert variance is not None  # _modelled chose it
    if node.op == "call_module":
        grouping = noise_grouping(model.get_submodule(str(node.target)))
    else:
        grouping = noise_grouping(node.target, node.args, node.kwargs)
    return NoiseSource(graph.nodes[index].name, variance, grouping)


def _predict_modules(
    model: nn.Module,
    graph: DataflowGraph,
    args: tuple[Any, ...],
    sinks: list[str],
    pairs: Sequence[tuple[int, int]],
) -> DataPredictions:
    """The hooks tracer's case: its module sources (functional ones have no name outside
    lint's graph) predicted on a trace that keeps ``torch.nn``'s modules whole, with the fx
    path's stops and seed, so that a model both tracers follow gets the same predictions; when
    that trace fails too, one eager Monte Carlo run (:func:`_predict_eager`)."""
    modules = dict(model.named_modules())
    named = {graph.nodes[i].name for i in _modelled(graph) if graph.nodes[i].call_type == "module"}
    sources = {
        name: NoiseSource(name, _module_variance(graph, name), noise_grouping(modules[name]))
        for name in sorted(named)
    }
    if not sources:
        return DataPredictions({}, {})
    try:
        gm = trace_with_leaves(model, set(sources))
    except Exception:  # fx raises anything its tracing touches
        reach = {(graph.nodes[sink].name, graph.nodes[source].name) for sink, source in pairs}
        return _predict_eager(model, args, sinks, sources, reach)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    plan = {n: sources[str(n.target)] for n in calls if str(n.target) in sources}
    stops = {n for n in gm.graph.nodes if _normalizes(gm, n)}
    combined, alone = predict_on_trace(
        model, gm, args, plan, sinks, draws=_DRAWS, seed=_SEED, stops=stops
    )
    return DataPredictions(combined, alone)


def _normalizes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a traced call is a normalization, where lint stops following the noise."""
    if node.op == "call_module":
        role = classify_module(gm.get_submodule(str(node.target)))
    elif node.op in ("call_function", "call_method"):
        role = classify_function(node.target, node.args, node.kwargs)
    else:
        return False
    return role in (Role.TARGET, Role.BARRIER)


def _predict_eager(
    model: nn.Module,
    args: tuple[Any, ...],
    sinks: list[str],
    sources: Mapping[str, NoiseSource],
    reach: set[tuple[str, str]],
) -> DataPredictions:
    """Monte Carlo in eager mode with every module source on, the noise stopped at the first
    normalization; as on the fx path, the estimate with all sources on also stands for each
    source alone (a run per source would cost ``draws`` forwards per finding)."""
    reached = {bn: [s for s in sources if (bn, s) in reach] for bn in sinks}
    chosen = chosen_batch_norms(model, [bn for bn in sinks if reached[bn]])
    switches = [model.get_submodule(name) for name in sources]
    norms = [m for m in model.modules() if classify_module(m) in (Role.TARGET, Role.BARRIER)]
    with model_state_kept(model), EagerStops(norms, lambda: model(*args)) as forward:
        estimates = monte_carlo_shifts(chosen, switches, forward, _DRAWS, _SEED)
    note = f"Monte Carlo, {_DRAWS} draws: fx could not trace the model"
    combined = {
        bn: ShiftPrediction(bn, e.ratio, False, e.stderr, tuple(reached[bn]), note)
        for bn, e in estimates.items()
    }
    alone = {bn: dict.fromkeys(reached[bn], one) for bn, one in combined.items()}
    return DataPredictions(combined, alone)


def _module_variance(graph: DataflowGraph, name: str) -> float:
    node = next(n for n in graph.nodes if n.name == name and n.spec is not None)
    assert node.spec is not None
    return node.spec.variance()
