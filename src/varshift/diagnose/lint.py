"""Static check for the Dropout/BatchNorm variance shift: which BatchNorm layers are fed by noise.

Li, Chen, Hu, Yang. *Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift.* CVPR 2019 (arXiv 1801.05134): a BatchNorm whose input has passed through a
stochastic layer (dropout, Gaussian dropout, Uout, DropBlock, DropConnect, a hand-written
``x * mask``) learns, as its running variance, the variance *with* the noise, and meets the
variance *without* it at test time; the ratio ``Δ = Var_test / Var_train < 1`` is the shift.

:func:`lint` reads the model's real data flow, not the order in which modules were registered:

1. ``torch.fx`` symbolic tracing (:mod:`~varshift.diagnose.trace_fx`), with every module in
   training mode so that ``F.dropout(x, p, training=self.training)`` and
   ``if self.training: x = F.dropout(x)`` appear whatever mode the model is in;
2. when fx cannot trace the model (data-dependent control flow), one forward pass on
   ``example_inputs`` with hooks on every module and a ``TorchFunctionMode`` that records which
   tensors each call consumed and produced (:mod:`~varshift.diagnose.trace_hooks`).

In that graph, every normalization that uses running statistics at test time (BatchNorm*,
SyncBatchNorm, LazyBatchNorm*, InstanceNorm with ``track_running_stats=True``) reached from a
stochastic layer or function without crossing another normalization is a :class:`Finding`. The
path may pass through anything else: conv, linear, activations, pooling, concatenation
(DenseNet), residual additions, reshapes. Normalizations that re-normalize with the statistics
of their current input (LayerNorm, GroupNorm, RMSNorm, InstanceNorm and BatchNorm without
running statistics) are not affected: the report lists them, and they stop the search, as does
the first BatchNorm (whose mismatch, not the noise, is what later layers then see).

This module only runs the steps; each lives with its concept: the tracers above and their
temporary model state (:mod:`~varshift.diagnose.trace_state`); the graph and the path search
(:mod:`~varshift.diagnose.graph`), the role of each call (:mod:`~varshift.diagnose.roles`),
reading and rewriting a call (:mod:`~varshift.diagnose.calls`), weight geometry
(:mod:`~varshift.diagnose.geometry`), the measured input statistics
(:mod:`~varshift.diagnose.channel_stats`), the scoped rebinding of stochastic functions in the
user's modules (:mod:`~varshift.diagnose.namespaces`), the predicted shift on example inputs
(:mod:`~varshift.diagnose.lint_predictions`) and without them
(:mod:`~varshift.diagnose.prediction`), and the report (:mod:`~varshift.diagnose.lint_report`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from varshift.diagnose.batches import require_finite
from varshift.diagnose.bn_stats import eager_module
from varshift.diagnose.channel_stats import ChannelStats, channel_stats
from varshift.diagnose.graph import DataflowGraph, GraphNode, NoisePath, noise_paths
from varshift.diagnose.lint_predictions import DataPredictions, predict_findings
from varshift.diagnose.lint_report import (
    BnPrediction,
    Finding,
    LintReport,
    StochasticLayer,
    UnaffectedNorm,
)
from varshift.diagnose.prediction import combine_shifts, predict_path_shift
from varshift.diagnose.roles import Role, classify_module, unaffected_reason
from varshift.diagnose.trace_fx import FxTrace, UntraceableError, fx_measure, fx_trace
from varshift.diagnose.trace_hooks import hook_trace
from varshift.diagnose.trace_state import forward_failure
from varshift.layers.registry import NoiseSpec, is_stochastic, noise_spec

# The report's records are part of lint's public face here, as they always were.
__all__ = ["BnPrediction", "Finding", "LintReport", "StochasticLayer", "UnaffectedNorm", "lint"]

_METHODS = ("auto", "fx", "hooks")


def lint(model: nn.Module, example_inputs: Any = None, *, method: str = "auto") -> LintReport:
    """Find every normalization layer with running statistics fed by a stochastic layer.

    Args:
        model: the model; its modules' ``training`` flags, BatchNorm buffers and the random
            state are the same afterwards (all are changed, then restored, while tracing). A
            ``torch.compile``d model is linted through the module it wraps (``_orig_mod``).
        example_inputs: one batch for ``model``: a tuple or list is passed as positional
            arguments, a dict as keyword arguments, anything else (a tensor) as the single
            argument. Needed when fx cannot trace the model; when given, the predicted shifts
            are computed on it: exact through linear paths, by Monte Carlo otherwise (see
            below).
        method: ``"auto"`` (fx, falling back to hooks), ``"fx"`` or ``"hooks"`` (needs
            ``example_inputs``).

    Returns:
        A :class:`LintReport`; one :class:`Finding` per (normalization layer, stochastic layer)
        pair with a path between them, and one :class:`BnPrediction` per flagged layer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module
            (``torch.jit.script``/``torch.jit.trace``): pass the original module instead.
        ValueError: ``example_inputs`` hold nan or inf; ``method`` is unknown; fx cannot trace the
            model (or ``method="hooks"``) and ``example_inputs`` is ``None``; ``method="fx"`` and fx
            cannot trace the model; the model's own forward fails on ``example_inputs`` in training
            mode (one line that names the input shape and the model's error, chained to it, with a
            hint when the eval-mode forward succeeds).

    With ``example_inputs``, a finding's predicted shift is that of its source alone at its
    normalization's input on those inputs (:mod:`~varshift.diagnose.lint_predictions`): the
    closed form of :mod:`~varshift.diagnose.noise_moments` where the path is linear
    (``exact=True``), a Monte Carlo estimate with its standard error otherwise
    (``exact=False``); :attr:`LintReport.predictions` holds each normalization's shift with all
    its sources on. The noise is followed to the first normalization it meets. Where that pass
    cannot go (a functional or instance norm; a functional noise call when fx cannot trace),
    and without ``example_inputs`` (``exact=None``), the single-path formula of
    :func:`varshift.theory.variance_shift` with the finding's noise is used:

    * noise straight into the normalization (through activations, pooling, concatenation,
      additions only): the direct form ``Δ = v / (v + σ²(c² + v))``, averaged over channels
      with each channel's ``c`` and ``v`` when measured, and with ``c = 0`` otherwise (then
      ``Δ = 1/(1 + σ²)``, ``1 − p`` for dropout, whatever ``v``);
    * a linear/conv layer on the path (or DropConnect, whose noise is on the weights): the
      width form with ``d`` = that layer's fan-in and ``cos²θ`` from its weights (mean over
      output units). ``ρ`` is the mean correlation between the input's channels when measured
      (for a conv the spatial neighbours inside its kernel are assumed as correlated as the
      channels), and ``0`` otherwise, which makes the width term vanish: without data the
      prediction is the worst case ``1/(1 + σ²)``. ``c²`` and ``v`` are averaged over channels.

    Dropout between two branches that are added (a residual) or concatenated is predicted for
    the noisy branch alone; the other branch dilutes the real shift.
    """
    # A torch.compile'd model is linted through the module it wraps; TorchScript is refused.
    original = eager_module(model)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    require_finite("example_inputs", example_inputs)
    inputs = None if example_inputs is None else _split_inputs(example_inputs)
    lazy = _lazy_module_names(original)
    traced = _trace(original, inputs, method)
    if original is not model:
        traced.notes.insert(
            0, "linted the module that torch.compile wraps (_orig_mod); names are relative to it"
        )
    if lazy and inputs is not None:
        traced.notes.append(
            "the forward pass on example_inputs initialized the lazy modules " + ", ".join(lazy)
        )
    return _build_report(original, traced)


def _lazy_module_names(model: nn.Module) -> list[str]:
    return [
        name or "<root>"
        for name, module in model.named_modules()
        if any(is_lazy(t) for t in (*module.parameters(False), *module.buffers(False)))
    ]


_Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class _Traced:
    """What one tracer found: the data-flow graph, which method ran, the input of each
    stochastic node on ``example_inputs`` (empty without them), the stochastic calls whose noise
    stayed on during that measurement, and notes on how the trace went (why fx failed)."""

    graph: DataflowGraph
    method: str
    inputs: dict[int, Tensor] = field(default_factory=dict)
    noisy: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    args: tuple[Any, ...] | None = None  # example_inputs as forward's positional arguments
    fx: FxTrace | None = None


def _trace(model: nn.Module, inputs: _Inputs | None, method: str) -> _Traced:
    """fx first (unless ``method="hooks"``), the hooks tracer when fx cannot trace."""
    notes: list[str] = []
    if method != "hooks":
        try:
            traced = fx_trace(model)
        except UntraceableError as error:
            if method == "fx":
                raise ValueError(
                    f"method='fx' but torch.fx could not trace the model: {error}"
                ) from error
            if inputs is None:
                raise ValueError(
                    f"torch.fx could not trace the model ({error}); pass example_inputs (one "
                    "batch for the model) so that lint can follow the data flow of a real "
                    "forward pass with hooks instead"
                ) from error
            notes.append(f"torch.fx could not trace the model ({error}); used forward hooks")
        else:
            if inputs is None:
                return _Traced(traced.graph, "fx")
            args = _positional(model, *inputs)
            with _model_errors_named(model, inputs):
                measured, noisy = fx_measure(model, traced, args)
            return _Traced(traced.graph, "fx", measured, noisy, args=args, fx=traced)
    if inputs is None:
        raise ValueError("method='hooks' needs example_inputs (one batch for the model)")
    with _model_errors_named(model, inputs):
        hooked = hook_trace(model, *inputs)
    args = _positional(model, *inputs)
    return _Traced(hooked.graph, "hooks", hooked.inputs, hooked.noisy, notes, args)


@contextlib.contextmanager
def _model_errors_named(model: nn.Module, inputs: _Inputs) -> Iterator[None]:
    """A failure of the model's own forward on ``example_inputs`` as one line that names the
    input and the reason (:func:`~varshift.diagnose.trace_state.forward_failure`); anything
    else (a failure of lint itself) as it was."""
    try:
        yield
    except Exception as error:
        failure = forward_failure(model, *inputs, error)
        if failure is None:
            raise
        raise failure from error


def _split_inputs(example_inputs: Any) -> _Inputs:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _positional(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """fx's interpreter takes placeholders by position: bind keywords to ``forward``'s order."""
    if not kwargs:
        return args
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _build_report(model: nn.Module, traced: _Traced) -> LintReport:
    graph = traced.graph
    paths, barriers = noise_paths(graph)
    paths = [path for path in paths if _applies_noise(graph.nodes[path.source])]
    # Only the sources on a path need their input's statistics.
    stats = {
        source: channel_stats(traced.inputs[source])
        for source in dict.fromkeys(path.source for path in paths)
        if source in traced.inputs
    }
    # In execution order of the normalization layers, the nearest noise first.
    findings: dict[tuple[str, str], Finding] = {}
    for path in sorted(paths, key=lambda p: (p.sink, len(p.nodes))):
        key = (graph.nodes[path.sink].name, graph.nodes[path.source].name)
        if key not in findings:  # a module called twice: keep the shortest path
            findings[key] = _finding(graph, path, stats.get(path.source))
    data = _data_predictions(model, traced, paths)
    found = [_with_data(finding, data) for finding in findings.values()]
    feeds: dict[str, list[str]] = {}
    for path in paths:
        feeds.setdefault(graph.nodes[path.source].name, []).append(graph.nodes[path.sink].name)
    report = LintReport(
        findings=found,
        predictions=_bn_predictions(found, data),
        method=traced.method,
        stochastic_layers=_stochastic_layers(model, graph, feeds),
        unaffected=_unaffected(model, graph, barriers),
        notes=list(traced.notes),
        batchnorms=_running_stat_norms(model, graph),
    )
    report.notes += _assumption_notes(report, bool(traced.inputs), traced.noisy, graph)
    return report


def _applies_noise(source: GraphNode) -> bool:
    """Whether a stochastic node applies noise: a modelled rate of 0 (``nn.Dropout(p=0)``, a
    ``training=False`` call) applies none; unmodelled noise is taken to apply some."""
    return source.spec is None or source.spec.variance() > 0


def _data_predictions(
    model: nn.Module, traced: _Traced, paths: Sequence[NoisePath]
) -> DataPredictions | None:
    """The exact or Monte Carlo predictions on ``example_inputs`` (``None`` without them)."""
    if traced.args is None or not paths:
        return None
    fx_nodes = None if traced.fx is None else {i: n for n, i in traced.fx.index.items()}
    gm = None if traced.fx is None else traced.fx.module
    pairs = [(path.sink, path.source) for path in paths]
    return predict_findings(model, traced.graph, fx_nodes, gm, traced.args, pairs)


def _with_data(finding: Finding, data: DataPredictions | None) -> Finding:
    """``finding`` with its source's shift alone from the exact pass or the Monte Carlo
    estimate, where they reach it; else as the single-path formula left it."""
    found = None if data is None else data.alone.get(finding.bn, {}).get(finding.source)
    if found is None or not math.isfinite(found.ratio):
        return finding
    return replace(finding, predicted_shift=found.ratio, exact=found.exact, stderr=found.stderr)


def _bn_predictions(
    findings: Sequence[Finding], data: DataPredictions | None
) -> dict[str, BnPrediction]:
    """One prediction per flagged normalization with all its noise on: the combined exact or
    Monte Carlo one where every modelled finding of it was predicted from data; else its
    findings' shifts combined as independent noise (their extra variances add)."""
    out: dict[str, BnPrediction] = {}
    for bn in dict.fromkeys(f.bn for f in findings):
        own = [f for f in findings if f.bn == bn]
        nearest = min(own, key=lambda f: len(f.path))
        combined = None if data is None else data.combined.get(bn)
        modelled = [f for f in own if f.noise is not None]
        ratio: float | None
        exact: bool | None
        stderr: float | None
        if combined is not None and modelled and all(f.exact is not None for f in modelled):
            ratio = combined.ratio if math.isfinite(combined.ratio) else None
            sources, exact, stderr = combined.sources, combined.exact, combined.stderr
        elif len(own) == 1:
            sources, ratio = (nearest.source,), nearest.predicted_shift
            exact, stderr = nearest.exact, nearest.stderr
        else:
            sources, exact, stderr = tuple(f.source for f in own), None, None
            shifts = [f.predicted_shift for f in own if f.predicted_shift is not None]
            ratio = combine_shifts(shifts)
        out[bn] = BnPrediction(bn, nearest.bn_type, sources, nearest.source, ratio, exact, stderr)
    return out


def _noise_fields(spec: NoiseSpec | None) -> tuple[str | None, float | None, str | None]:
    """``(noise, rate, rate_name)`` of a spec for the report: its kind and the strength ``p``,
    else ``beta``, else its first parameter; all ``None`` for noise that is not modelled."""
    if spec is None:
        return None, None, None
    for name in ("p", "beta", *spec.params):
        if name in spec.params:
            return spec.kind, float(spec.params[name]), name
    return spec.kind, None, None


def _finding(graph: DataflowGraph, path: NoisePath, stats: ChannelStats | None) -> Finding:
    source, sink = graph.nodes[path.source], graph.nodes[path.sink]
    prediction = predict_path_shift(graph, path, stats)
    noise, rate, rate_name = _noise_fields(source.spec)
    return Finding(
        bn=sink.name,
        bn_type=sink.type_name,
        source=source.name,
        source_type=source.call_type,
        noise=noise,
        rate=rate,
        rate_name=rate_name,
        path=tuple(graph.nodes[i].name for i in path.nodes),
        predicted_shift=prediction.shift,
        width=prediction.width,
        cos2=prediction.cos2,
        rho=prediction.rho,
        measured=stats is not None,
    )


def _stochastic_layers(
    model: nn.Module, graph: DataflowGraph, feeds: Mapping[str, list[str]]
) -> list[StochasticLayer]:
    layers: dict[str, StochasticLayer] = {}
    for node in graph.nodes:
        if node.role is Role.STOCHASTIC and node.name not in layers:
            layers[node.name] = StochasticLayer(
                node.name, node.call_type, node.type_name, *_noise_fields(node.spec),
                feeds=tuple(dict.fromkeys(feeds.get(node.name, []))),
            )
    for name, module in model.named_modules():
        if is_stochastic(module) and name not in layers:
            noise = _noise_fields(noise_spec(module))
            layers[name] = StochasticLayer(
                name, "module", type(module).__name__, *noise, called=False
            )
    return list(layers.values())


def _unaffected(
    model: nn.Module, graph: DataflowGraph, barriers: Mapping[int, set[int]]
) -> list[UnaffectedNorm]:
    fed = {graph.nodes[index].name for index in barriers}
    found = [
        UnaffectedNorm(name, type(m).__name__, unaffected_reason(m), name in fed)
        for name, m in model.named_modules()
        if classify_module(m) is Role.BARRIER
    ]
    named = {u.name for u in found}
    found += [
        UnaffectedNorm(
            node.name, node.type_name, "normalizes with the statistics of its own input",
            node.name in fed,
        )
        for node in _unique(graph.nodes)
        if node.role is Role.BARRIER and node.call_type == "function" and node.name not in named
    ]
    return found


def _running_stat_norms(model: nn.Module, graph: DataflowGraph) -> list[str]:
    """Every normalization with running statistics: the modules, then functional calls."""
    names = [name for name, m in model.named_modules() if classify_module(m) is Role.TARGET]
    names += [node.name for node in _unique(graph.nodes) if node.role is Role.TARGET]
    return list(dict.fromkeys(names))


def _unique(nodes: Sequence[GraphNode]) -> list[GraphNode]:
    return list({node.name: node for node in nodes}.values())


def _assumption_notes(
    report: LintReport,
    measured: bool,
    noisy: Sequence[str],
    graph: DataflowGraph,
) -> list[str]:
    notes: list[str] = []
    bases = {f.basis for f in report.findings if f.predicted_shift is not None}
    through_weights = any(f.width for f in report.findings if f.exact is None)
    if "exact" in bases:
        notes.append("'exact': the closed form on example_inputs through a linear path")
    if "estimated" in bases:
        notes.append(
            "'≈ x ± se': a Monte Carlo estimate on example_inputs where the path is not linear"
        )
    if bases & {"exact", "estimated"}:
        notes.append("a finding's shift is its source's noise alone; per BatchNorm, all together")
    if "formula" in bases:
        note = "'formula': the single-path formula on the measured mean and variance of the input"
        notes.append(note + (", and rho" if through_weights else ""))
    elif report.findings and not measured:
        rho = " (rho=0 after a linear/conv layer)" if through_weights else ""
        notes.append(f"'assumed': zero-mean input{rho}, 1/(1 + Var[m]), the worst case")
        notes.append("pass example_inputs for a prediction from data")
    if any(f.noise is None for f in report.findings):
        notes.append("'?' marks noise that varshift.theory does not model (no prediction)")
    modelled = {n.name for n in graph.nodes if n.role is Role.STOCHASTIC and n.spec is not None}
    left_on = [name for name in noisy if name in modelled]
    if left_on:
        notes.append(
            "could not switch off the noise of " + ", ".join(left_on) + " during the "
            "measurement pass (no training argument); inputs downstream of it include its noise"
        )
    return notes
