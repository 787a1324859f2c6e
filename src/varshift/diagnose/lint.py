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
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn
from torch.nn.parameter import is_lazy

from varshift.diagnose.graph import (
    BARRIER,
    STOCHASTIC,
    ChannelStats,
    DataflowGraph,
    GraphNode,
    NoisePath,
    classify_module,
    noise_paths,
    unaffected_reason,
)
from varshift.diagnose.trace_fx import fx_measure, fx_trace
from varshift.diagnose.trace_hooks import hook_trace
from varshift.layers.registry import NoiseSpec, is_stochastic, noise_spec
from varshift.theory import variance_shift

__all__ = ["Finding", "LintReport", "StochasticLayer", "UnaffectedNorm", "lint"]

_METHODS = ("auto", "fx", "hooks")


@dataclass(frozen=True)
class Finding:
    """A normalization layer with running statistics whose input depends on a stochastic layer.

    Attributes:
        bn: qualified name of the normalization module (or ``F.batch_norm@owner``).
        bn_type: its class name, e.g. ``"BatchNorm2d"``.
        source: the stochastic layer upstream: a module's qualified name, or
            ``"F.dropout@block1"`` for a functional call made in ``block1``'s ``forward``
            (``<root>`` for the model's own ``forward``; ``#2`` marks a second such call).
        source_type: ``"module"`` or ``"function"``.
        noise: the noise kind in :mod:`varshift.theory` terms (``"bernoulli"``, ``"gaussian"``,
            ``"uout"``…), ``None`` when the registry does not model it (alpha dropout, a bare
            ``torch.rand_like``).
        rate: its strength: the drop probability ``p``, or ``β`` for Uout; ``None`` if unknown.
        rate_name: ``"p"``, ``"beta"`` or the kind's own parameter name.
        path: the names of the calls from ``source`` to ``bn``, both included (a shortest path).
        predicted_shift: ``Δ = Var_test / Var_train`` from :func:`varshift.theory.variance_shift`
            (see :func:`lint` for the assumptions), ``None`` when the noise is not modelled.
        width: fan-in ``d`` of the first linear/conv on the path (``None``: no weight layer).
        cos2: mean ``cos²θ`` of that layer's weights, as used in the prediction.
        rho: the correlation ``ρ`` between its inputs used in the prediction.
        measured: whether the mean and variance came from ``example_inputs`` (else zero-mean
            input was assumed).
    """

    bn: str
    bn_type: str
    source: str
    source_type: str
    noise: str | None
    rate: float | None
    rate_name: str | None
    path: tuple[str, ...]
    predicted_shift: float | None
    width: int | None = None
    cos2: float | None = None
    rho: float | None = None
    measured: bool = False


@dataclass(frozen=True)
class StochasticLayer:
    """A stochastic module or functional call found in the model.

    ``feeds`` names the normalization layers it reaches (empty: it feeds none, e.g. dropout
    before the classifier); ``called`` is ``False`` for a registered noise module that the
    traced ``forward`` never used."""

    name: str
    source_type: str
    type_name: str
    noise: str | None
    rate: float | None
    rate_name: str | None
    feeds: tuple[str, ...] = ()
    called: bool = True

    @property
    def feeds_bn(self) -> bool:
        return bool(self.feeds)


@dataclass(frozen=True)
class UnaffectedNorm:
    """A normalization that uses no running statistics, so no variance shift; ``fed_by_noise``
    tells whether a stochastic layer reaches it (which is then harmless)."""

    name: str
    type_name: str
    reason: str
    fed_by_noise: bool = False


@dataclass
class LintReport:
    """What :func:`lint` found. ``ok`` is ``True`` when no finding was made.

    ``method`` is ``"fx"`` or ``"hooks"``; ``notes`` holds everything else worth knowing (why
    fx failed, which assumptions the predictions make)."""

    findings: list[Finding]
    method: str
    stochastic_layers: list[StochasticLayer] = field(default_factory=list)
    unaffected: list[UnaffectedNorm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def flagged(self) -> list[str]:
        """The names of the normalization layers with at least one finding, in model order."""
        return list(dict.fromkeys(finding.bn for finding in self.findings))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; :meth:`from_dict` reads it back."""
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LintReport:
        return cls(
            findings=[Finding(**{**f, "path": tuple(f["path"])}) for f in data["findings"]],
            method=data["method"],
            stochastic_layers=[
                StochasticLayer(**{**s, "feeds": tuple(s["feeds"])})
                for s in data.get("stochastic_layers", [])
            ],
            unaffected=[UnaffectedNorm(**u) for u in data.get("unaffected", [])],
            notes=list(data.get("notes", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> LintReport:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        lines = [f"varshift lint ({self.method}): " + self._summary()]
        if self.findings:
            rows = [
                (
                    f.bn,
                    f.source,
                    _format_rate(f.rate, f.rate_name),
                    "?" if f.predicted_shift is None else f"{f.predicted_shift:.4f}",
                    " -> ".join(f.path),
                )
                for f in self.findings
            ]
            lines += _table(("BN layer", "upstream noise", "p", "predicted shift", "path"), rows)
        if self.stochastic_layers:
            lines.append("stochastic layers:")
            lines += [f"  {_describe(layer)}" for layer in self.stochastic_layers]
        if self.unaffected:
            lines.append("not affected (no running statistics):")
            for norm in self.unaffected:
                fed = ", fed by noise" if norm.fed_by_noise else ""
                lines.append(f"  {norm.name} ({norm.type_name}{fed}): {norm.reason}")
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)

    def _summary(self) -> str:
        if self.ok:
            return "no BatchNorm layer is fed by a stochastic layer"
        count = len(self.flagged)
        layers = "layer is" if count == 1 else "layers are"
        return f"{count} BatchNorm {layers} fed by a stochastic layer (variance shift at eval)"


def _format_rate(rate: float | None, name: str | None, *, bare_p: bool = True) -> str:
    if rate is None:
        return "?"
    return f"{rate:g}" if bare_p and name in (None, "p") else f"{name or 'p'}={rate:g}"


def _describe(layer: StochasticLayer) -> str:
    what = layer.type_name
    if layer.source_type == "function":
        owner = layer.name.partition("@")[2].partition("#")[0]
        what += f" in the forward of {owner}"
    what += ", " + _format_rate(layer.rate, layer.rate_name, bare_p=False)
    if not layer.called:
        return f"{layer.name} ({what}) is never called by forward"
    feeds = ", ".join(layer.feeds) if layer.feeds else "no BatchNorm"
    return f"{layer.name} ({what}) feeds {feeds}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return [line(header), "-+-".join("-" * width for width in widths), *map(line, rows)]


def lint(model: nn.Module, example_inputs: Any = None, *, method: str = "auto") -> LintReport:
    """Find every normalization layer with running statistics fed by a stochastic layer.

    Args:
        model: the model; its modules' ``training`` flags, BatchNorm buffers and the random
            state are the same afterwards (all are changed, then restored, while tracing).
        example_inputs: one batch for ``model``: a tuple or list is passed as positional
            arguments, a dict as keyword arguments, anything else (a tensor) as the single
            argument. Needed when fx cannot trace the model; when given, the per-channel mean
            and variance of each noise layer's input are measured on it (one forward pass, noise
            off, BatchNorm on batch statistics) and used in the predicted shift.
        method: ``"auto"`` (fx, falling back to hooks), ``"fx"`` or ``"hooks"`` (needs
            ``example_inputs``).

    Returns:
        A :class:`LintReport`; one :class:`Finding` per (normalization layer, stochastic layer)
        pair with a path between them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``method`` is unknown; fx cannot trace the model (or ``method="hooks"``)
            and ``example_inputs`` is ``None``; ``method="fx"`` and fx cannot trace the model.

    The predicted shift uses :func:`varshift.theory.variance_shift` with the finding's noise:

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    inputs = None if example_inputs is None else _split_inputs(example_inputs)
    notes: list[str] = []
    lazy = [
        name or "<root>"
        for name, module in model.named_modules()
        if any(is_lazy(t) for t in (*module.parameters(False), *module.buffers(False)))
    ]
    graph, stats, noisy, used = _trace(model, inputs, method, notes)
    if lazy and inputs is not None:
        notes.append(
            "the forward pass on example_inputs initialized the lazy modules " + ", ".join(lazy)
        )
    return _report(model, graph, stats, used, notes, noisy)


_Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _trace(
    model: nn.Module, inputs: _Inputs | None, method: str, notes: list[str]
) -> tuple[DataflowGraph, dict[int, ChannelStats], list[str], str]:
    """Graph, input statistics of the stochastic nodes, noise left on, and the method used."""
    if method != "hooks":
        try:
            traced = fx_trace(model)
        except Exception as error:  # fx raises many types; any of them means "cannot trace"
            reason = _one_line(error)
            if method == "fx":
                raise ValueError(
                    f"method='fx' but torch.fx could not trace the model: {reason}"
                ) from error
            if inputs is None:
                raise ValueError(
                    f"torch.fx could not trace the model ({reason}); pass example_inputs (one "
                    "batch for the model) so that lint can follow the data flow of a real "
                    "forward pass with hooks instead"
                ) from error
            notes.append(f"torch.fx could not trace the model ({reason}); used forward hooks")
        else:
            if inputs is None:
                return traced.graph, {}, [], "fx"
            stats, noisy = fx_measure(model, traced, _positional(model, *inputs))
            return traced.graph, stats, noisy, "fx"
    if inputs is None:
        raise ValueError("method='hooks' needs example_inputs (one batch for the model)")
    hooked = hook_trace(model, *inputs)
    return hooked.graph, hooked.stats, hooked.noisy, "hooks"


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
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


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _report(
    model: nn.Module,
    graph: DataflowGraph,
    stats: Mapping[int, ChannelStats],
    method: str,
    notes: list[str],
    noisy: Sequence[str],
) -> LintReport:
    paths, barriers = noise_paths(graph)
    # In execution order of the normalization layers, the nearest noise first.
    findings: dict[tuple[str, str], Finding] = {}
    for path in sorted(paths, key=lambda p: (p.sink, len(p.nodes))):
        key = (graph.nodes[path.sink].name, graph.nodes[path.source].name)
        if key not in findings:  # a module called twice: keep the shortest path
            findings[key] = _finding(graph, path, stats.get(path.source))
    feeds: dict[str, list[str]] = {}
    for path in paths:
        feeds.setdefault(graph.nodes[path.source].name, []).append(graph.nodes[path.sink].name)
    report = LintReport(
        findings=list(findings.values()),
        method=method,
        stochastic_layers=_stochastic_layers(model, graph, feeds),
        unaffected=_unaffected(model, graph, barriers),
        notes=notes,
    )
    report.notes += _assumption_notes(report, bool(stats), noisy, graph)
    return report


def _noise(spec: NoiseSpec | None) -> tuple[str | None, float | None, str | None]:
    """``(kind, rate, rate_name)`` of a spec: ``p``, else ``beta``, else its first parameter."""
    if spec is None:
        return None, None, None
    for name in ("p", "beta", *spec.params):
        if name in spec.params:
            return spec.kind, float(spec.params[name]), name
    return spec.kind, None, None


def _finding(graph: DataflowGraph, path: NoisePath, stats: ChannelStats | None) -> Finding:
    source, sink = graph.nodes[path.source], graph.nodes[path.sink]
    # The first weight layer is where the width form applies; DropConnect is its own.
    layer = next((graph.nodes[i] for i in path.nodes[:-1] if graph.nodes[i].fan_in), None)
    width = layer.fan_in if layer is not None else None
    cos2 = rho = None
    if layer is not None and width is not None:
        cos2 = 1.0 if width == 1 else _clip(layer.cos2 if layer.cos2 is not None else 1 / width)
        rho = 0.0
        if stats is not None and stats.rho is not None and width > 1:
            rho = min(1.0, max(-1.0 / (width - 1), stats.rho))
    noise, rate, rate_name = _noise(source.spec)
    return Finding(
        bn=sink.name,
        bn_type=sink.type_name,
        source=source.name,
        source_type=source.kind,
        noise=noise,
        rate=rate,
        rate_name=rate_name,
        path=tuple(graph.nodes[i].name for i in path.nodes),
        predicted_shift=_predict(source.spec, stats, width, cos2, rho),
        width=width,
        cos2=cos2,
        rho=rho,
        measured=stats is not None,
    )


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def _predict(
    spec: NoiseSpec | None,
    stats: ChannelStats | None,
    width: int | None,
    cos2: float | None,
    rho: float | None,
) -> float | None:
    if spec is None:
        return None
    params: dict[str, Any] = dict(spec.params)
    if stats is None:
        mean, var = np.zeros(1), np.ones(1)
    else:
        live = stats.var.numpy() > 0  # constant channels carry no variance to shift
        if not live.any():
            return None
        mean, var = stats.mean.numpy()[live], stats.var.numpy()[live]
    if width is None:
        return float(np.mean(variance_shift(spec.kind, mean, var, **params)))
    # The width form assumes one (c, v) for all d inputs: pool the channels.
    c = math.sqrt(float(np.mean(mean**2)))
    v = float(np.mean(var))
    return float(variance_shift(spec.kind, c, v, width=width, cos2=cos2, rho=rho, **params))


def _stochastic_layers(
    model: nn.Module, graph: DataflowGraph, feeds: Mapping[str, list[str]]
) -> list[StochasticLayer]:
    layers: dict[str, StochasticLayer] = {}
    for node in graph.nodes:
        if node.role == STOCHASTIC and node.name not in layers:
            layers[node.name] = StochasticLayer(
                node.name, node.kind, node.type_name, *_noise(node.spec),
                feeds=tuple(dict.fromkeys(feeds.get(node.name, []))),
            )
    for name, module in model.named_modules():
        if is_stochastic(module) and name not in layers:
            layers[name] = StochasticLayer(
                name, "module", type(module).__name__, *_noise(noise_spec(module)), called=False
            )
    return list(layers.values())


def _unaffected(
    model: nn.Module, graph: DataflowGraph, barriers: Mapping[int, set[int]]
) -> list[UnaffectedNorm]:
    fed = {graph.nodes[index].name for index in barriers}
    found = [
        UnaffectedNorm(name, type(m).__name__, unaffected_reason(m), name in fed)
        for name, m in model.named_modules()
        if classify_module(m) == BARRIER
    ]
    named = {u.name for u in found}
    found += [
        UnaffectedNorm(
            node.name, node.type_name, "normalizes with the statistics of its own input",
            node.name in fed,
        )
        for node in _unique(graph.nodes)
        if node.role == BARRIER and node.kind == "function" and node.name not in named
    ]
    return found


def _unique(nodes: Sequence[GraphNode]) -> list[GraphNode]:
    return list({node.name: node for node in nodes}.values())


def _assumption_notes(
    report: LintReport,
    measured: bool,
    noisy: Sequence[str],
    graph: DataflowGraph,
) -> list[str]:
    notes: list[str] = []
    through_weights = any(f.width for f in report.findings)
    if report.findings and measured:
        note = (
            "predicted shifts use the per-channel mean and variance of each noise layer's input "
            "measured on example_inputs"
        )
        if through_weights:
            note += ", and the mean correlation between its channels as rho"
        notes.append(note)
    elif report.findings:
        note = "predicted shifts assume zero-mean input: 1/(1 + Var[m])"
        if through_weights:
            note += " (after a linear/conv layer: uncorrelated inputs, rho=0, the worst case)"
        notes.append(note + "; pass example_inputs for a prediction from data")
    if any(f.noise is None for f in report.findings):
        notes.append("'?' marks noise that varshift.theory does not model (no prediction)")
    modelled = {n.name for n in graph.nodes if n.role == STOCHASTIC and n.spec is not None}
    left_on = [name for name in noisy if name in modelled]
    if left_on:
        notes.append(
            "could not switch off the noise of " + ", ".join(left_on) + " during the "
            "measurement pass (no training argument); inputs downstream of it include its noise"
        )
    return notes
