"""Predict each BatchNorm's variance shift from the noise sources upstream of it, before
anything is measured: in closed form when the path from a source to the BatchNorm is linear,
by Monte Carlo on the example inputs otherwise. The maths, the two forms below and their limits:
``docs/theory.md``, "Exact prediction through a linear path".

The closed form is an ``fx.Interpreter`` pass (the shape of ``torch.fx.passes.shape_prop``) per
source: it runs the traced graph on the example inputs with the noise off and carries, next to
each value, that source's noise component, in the *squared* form ``Σ_i L_ji² x_i²``
(element-wise noise) or the *groups* form ``L(x ⊙ 1_g)`` for a chunk of groups on a leading
axis. A layer it cannot follow marks the component as broken, with the reason; the BatchNorms
it reaches get the Monte Carlo estimate of :mod:`varshift.diagnose.noise_montecarlo`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from varshift.diagnose import noise_montecarlo as mc
from varshift.diagnose.batches import require_finite
from varshift.diagnose.bn_stats import check_model
from varshift.diagnose.noise_montecarlo import NoiseSource, NotLinearError, ShiftPrediction

__all__ = ["NoiseSource", "ShiftPrediction", "predict_on_trace", "predict_shifts"]

_CHUNK_ELEMENTS = 1 << 22  # group-axis chunks hold about this many elements per tensor
_UNREACHED = "no noise source reaches it"
# Route functions that only move elements (no padding value, no sign): f(v) needs no f(0).
_MOVES_ONLY = frozenset(
    [
        "getitem",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "squeeze",
        "unsqueeze",
        "cat",
        "concat",
        "stack",
        "clone",
        "view",
        "contiguous",
        "expand",
    ]
)


def predict_shifts(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Any],
    sources: Sequence[NoiseSource] | None = None,
    batch_norms: Sequence[str] | None = None,
    *,
    draws: int = 32,
    generator: torch.Generator | None = None,
    max_groups: int = 4096,
) -> dict[str, ShiftPrediction]:
    """The variance shift each BatchNorm will see, predicted on ``example_inputs``.

    Args:
        model: left exactly as it was (training flags, buffers, global random state).
        example_inputs: one input tensor, or the positional arguments of ``model``.
        sources: the noise to predict for, every other stochastic layer off; ``None``: every
            torch dropout the trace finds (modules by name, ``F.dropout*`` calls by node name).
        batch_norms: names of the BatchNorms to predict for (``None``: all with running
            statistics). Layers the forward never calls are left out of the result.
        draws: Monte Carlo forwards with the noise on, where a path is not linear.
        generator: seeds the Monte Carlo masks (``None``: the global generator).
        max_groups: the most groups (elements per sample) an element-wise source is split into
            when its path has a second summing layer or reconverges; above: Monte Carlo.

    Returns ``{bn name: ShiftPrediction}``; all Monte Carlo, saying so, when fx cannot trace.
    Raises ``TypeError`` for a non-module ``model`` or a source that is not a
    :class:`NoiseSource`; ``ValueError`` for nan/inf ``example_inputs``, no BatchNorm, unknown
    names, ``draws < 2`` or ``max_groups < 0``.
    """
    check_model(model)
    require_finite("example_inputs", example_inputs)
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    chosen = mc.chosen_batch_norms(model, batch_norms)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an integer >= 2, got {draws!r}")
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 0:
        raise ValueError(f"max_groups must be an integer >= 0, got {max_groups!r}")
    given = None if sources is None else list(sources)
    for source in given or ():
        if not isinstance(source, NoiseSource):
            raise TypeError(f"sources must hold NoiseSource, got {type(source).__name__}")
    modules = dict(model.named_modules())
    with mc.model_state_kept(model):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        try:
            gm = mc.trace_with_leaves(model, {s.name for s in given or () if s.name in modules})
        except Exception as error:  # fx raises anything its tracing touches
            return mc.eager_predictions(model, args, chosen, given, draws, seed, error)
        plan = mc.resolve_sources(gm, modules, given)
        return _Prediction(gm, args, chosen, plan, max_groups).predict(draws, seed)


@dataclass(frozen=True)
class _Comp:
    tensor: Tensor
    mixed: bool = False  # squared form: a summing layer is already on the path


class _LinearPass(fx.Interpreter):
    """One run of the traced graph with the noise off, recording every BatchNorm's input and,
    when ``current`` is a source node, the noise component that source adds to it: squared
    form without ``chunk``, else the groups ``chunk`` of the groups form."""

    def __init__(
        self,
        gm: fx.GraphModule,
        plan: Mapping[fx.Node, NoiseSource],
        bn_nodes: Mapping[fx.Node, str],
        current: fx.Node | None = None,
        chunk: range | None = None,
        active: Collection[fx.Node] | None = None,
        stops: Collection[fx.Node] = (),
    ) -> None:
        # The noise-off pass keeps every value: the source passes (:meth:`follow`) read them
        # instead of running each layer again, which makes a pass per source cheap.
        super().__init__(gm, garbage_collect_values=False)
        self.plan, self.bn_nodes, self.current, self.chunk = plan, bn_nodes, current, chunk
        self.active = plan.keys() if active is None else active
        self.stops = stops
        self.state: dict[fx.Node, _Comp | NotLinearError] = {}
        self.source_inputs: dict[fx.Node, Tensor] = {}
        self.moments: dict[str, list[Tensor]] = {}  # per channel [Σx, Σx², n] or [Σe, n]
        self.broken: dict[str, NotLinearError] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.plan or mc.is_switched_off(n):  # noise off: m ⊙ value with E[m] = 1
            value = self.source_inputs[n] = mc.run_noise_off(self, n)
        else:
            value = super().run_node(n)
        if n in self.bn_nodes:
            self._record(self.bn_nodes[n], n.all_input_nodes[0])
        state = self._state(n, value)
        if state is not None:
            self.state[n] = state
        return value

    def follow(self, base: _LinearPass) -> None:
        """A source pass on the noise-off values of ``base``: only the nodes from the source on
        are visited, and no layer is run again except on the noise component."""
        self.env = base.env
        nodes = list(self.graph.nodes)
        assert self.current is not None
        for n in nodes[nodes.index(self.current) :]:
            if n in self.bn_nodes:
                self._record(self.bn_nodes[n], n.all_input_nodes[0])
            state = self._state(n, self.env[n])
            if state is not None:
                self.state[n] = state

    def _record(self, bn: str, node: fx.Node) -> None:
        state = self.state.get(node)
        if isinstance(state, NotLinearError):
            self.broken.setdefault(bn, state)
            return
        if self.current is None:
            x = self.env[node].detach().double()
            parts: tuple[Tensor, ...] = (x, x.square())
        elif state is None:
            return
        else:
            e = state.tensor
            parts = (e if self.chunk is None else e.double().square().sum(0),)
        dims = [d for d in range(parts[0].dim()) if d != 1]  # all but the channels
        row = [
            *(t.sum(dims, dtype=torch.float64) for t in parts),
            torch.tensor(float(parts[0].numel() // parts[0].shape[1])),
        ]
        old = self.moments.get(bn)  # a BatchNorm called twice pools both calls
        self.moments[bn] = row if old is None else [a + b for a, b in zip(old, row)]

    def _state(self, n: fx.Node, value: Any) -> _Comp | NotLinearError | None:
        if n is self.current:
            if self.plan[n].grouping == "structured":
                return NotLinearError(f"'{n.name}' applies structured noise: Monte Carlo only")
            return self._start(value)
        if n in self.stops:  # the noise is followed up to here, not through
            return None
        states = [self.state[a] for a in n.all_input_nodes if a in self.state]
        if not states or n.op == "output":
            return None
        broken = next((s for s in states if isinstance(s, NotLinearError)), None)
        if broken is not None:
            return broken
        if n in self.active:
            return NotLinearError(f"the noise passes through another noise source, '{n.name}'")
        if n in self.plan and self.plan[n].grouping == "structured":
            return NotLinearError(f"the noise passes through '{n.name}' (structured noise)")
        if n in self.plan or mc.is_switched_off(n):  # off: the identity
            return states[0]
        try:
            return self._propagate(n, value)
        except NotLinearError as error:
            return error
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. an op vmap cannot batch
            return NotLinearError(f"'{n.name}' could not be followed ({error})")

    def _start(self, x: Tensor) -> _Comp:
        if self.chunk is None or self.current is None:
            return _Comp(x.square())
        grouping, size = self.plan[self.current].grouping, len(self.chunk)
        if grouping == "sample":  # one group: every element of each sample
            return _Comp(x.unsqueeze(0))
        width = x.shape[1] if grouping == "channel" else x[0].numel()
        one_hot = torch.zeros(size, width, dtype=x.dtype, device=x.device)
        one_hot[torch.arange(size), torch.tensor(list(self.chunk))] = 1
        shape = (width, *[1] * (x.dim() - 2)) if grouping == "channel" else x.shape[1:]
        return _Comp(one_hot.view(size, 1, *shape) * x.unsqueeze(0))

    def _args(self, n: fx.Node, replace: Mapping[fx.Node, Any]) -> tuple[Any, Any]:
        def value(a: fx.Node) -> Any:
            return replace[a] if a in replace else self.env[a]

        return fx.node.map_arg(n.args, value), fx.node.map_arg(n.kwargs, value)

    def _invoke(self, n: fx.Node, args: Any, kwargs: Any) -> Any:
        if n.op == "call_module":
            return self.fetch_attr(str(n.target))(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        return n.target(*args, **kwargs)  # type: ignore[operator]

    def _call(self, n: fx.Node, replace: Mapping[fx.Node, Any]) -> Any:
        return self._invoke(n, *self._args(n, replace))

    def _propagate(self, n: fx.Node, value: Any) -> _Comp:
        module = self.fetch_attr(str(n.target)) if n.op == "call_module" else None
        category = mc.op_category(n, module)
        noisy = [a for a in n.all_input_nodes if a in self.state]
        refs: list[fx.Node] = []  # with repeats: y * y, y + y
        fx.node.map_arg((n.args, n.kwargs), lambda a: refs.append(a) if a in self.state else None)
        if not isinstance(value, Tensor):
            raise NotLinearError(f"'{n.name}' does not return one tensor")
        divisor = len(n.args) > 1 and n.args[1] in noisy and "div" in str(n.target)
        if category in ("scale", "mix") and (len(refs) > 1 or divisor):
            raise NotLinearError(f"'{n.name}' multiplies two noisy values or divides by one")
        comps = [self.state[a] for a in noisy]
        tensors = [c.tensor for c in comps if isinstance(c, _Comp)]
        if self.chunk is None:
            if category == "add" and len(refs) > 1:
                raise NotLinearError(f"two routes of the noise meet at '{n.name}'", True)
            mixed = any(isinstance(c, _Comp) and c.mixed for c in comps)
            return self._squared(n, module, category, dict(zip(noisy, tensors)), mixed, value)
        offset = self._call(n, {a: torch.zeros_like(self.env[a]) for a in noisy})
        if module is not None:  # per-sample layers: the groups folded into the batch
            d = tensors[0]
            out = self._call(n, {noisy[0]: d.reshape(-1, *d.shape[2:])})
            return _Comp(out.reshape(d.shape[0], *offset.shape) - offset)
        if not mc.keeps_samples(n, noisy[0], self.env[noisy[0]], value):
            raise NotLinearError(f"'{n.name}' mixes samples; the groups form needs them apart")

        def one_group(*ds: Tensor) -> Tensor:
            return self._call(n, dict(zip(noisy, ds))) - offset  # type: ignore[no-any-return]

        return _Comp(torch.func.vmap(one_group)(*tensors))

    def _squared(
        self,
        n: fx.Node,
        module: nn.Module | None,
        category: str,
        vs: dict[fx.Node, Tensor],
        mixed: bool,
        value: Tensor,
    ) -> _Comp:
        """Push element-wise variance coefficients through one node: ``v ↦ Σ_i L_ji² v_i``."""
        first, v = next(iter(vs.items()))
        if category == "mix":
            if mixed:
                raise NotLinearError(f"a second summing layer, '{n.name}', on the path", True)
            return _Comp(self._summed(n, module, v, self.env[first], value), mixed=True)
        if category == "bn" and isinstance(module, _BatchNorm):
            scale = 1 / (module.running_var + module.eps)  # type: ignore[operator]
            if module.weight is not None:
                scale = scale * module.weight.square()
            return _Comp(v * scale.view(1, -1, *([1] * (v.dim() - 2))), mixed)
        if category == "route" and module is not None:
            return _Comp(module(v), mixed)
        if category in ("route", "add") and "alpha" not in n.kwargs:  # at most a sign: |f(v)|
            zeros = {
                a: torch.zeros_like(t)
                for a in n.all_input_nodes
                if isinstance(t := self.env[a], Tensor)
            }
            moved = self._call(n, {**zeros, **vs})
            if category == "route" and mc.op_name(n) in _MOVES_ONLY:  # f(0) = 0, no sign
                return _Comp(moved, mixed)
            return _Comp((moved - self._call(n, zeros)).abs(), mixed)
        if category == "scale":  # the other factor squared: v·t², v/t²

            def square(a: Any) -> Any:
                return a if a is v or not isinstance(a, (Tensor, int, float)) else a * a

            args, kwargs = self._args(n, {first: v})
            squared = {k: square(a) for k, a in kwargs.items()}
            return _Comp(self._invoke(n, tuple(map(square, args)), squared), mixed)
        raise NotLinearError(f"no squared rule for '{n.name}'", retry=True)

    def _summed(
        self, n: fx.Node, module: nn.Module | None, v: Tensor, x: Tensor, value: Tensor
    ) -> Tensor:
        """One summing layer with squared coefficients and no bias."""
        if isinstance(module, (nn.Linear, _ConvNd)):
            params = {"weight": module.weight.square()}
            if module.bias is not None:
                params["bias"] = torch.zeros_like(module.bias)
            return torch.func.functional_call(module, params, (v,))  # type: ignore[no-any-return]
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return module(v) * mc.pool_coefficient(module, v[:1])  # type: ignore[no-any-return]
        if mc.op_name(n) in ("mean", "sum"):  # a mean weighs each input 1/K
            out: Tensor = self._call(n, {n.all_input_nodes[0]: v})
            return out / (x.numel() // value.numel()) if mc.op_name(n) == "mean" else out
        raise NotLinearError(f"no squared rule for '{n.name}'", retry=True)


@dataclass
class _Prediction:
    """The passes of one :func:`predict_shifts` call on a traced model: the noise of the
    ``active`` sources of ``plan`` (``None``: all), every other source run noise-off."""

    gm: fx.GraphModule
    args: tuple[Any, ...]
    chosen: Mapping[str, _BatchNorm]
    plan: dict[fx.Node, NoiseSource]
    max_groups: int
    active: tuple[fx.Node, ...] | None = None
    stops: frozenset[fx.Node] = frozenset()

    def __post_init__(self) -> None:
        calls = (n for n in self.gm.graph.nodes if n.op == "call_module")
        self.bn_nodes = {n: str(n.target) for n in calls if str(n.target) in self.chosen}
        self.on = tuple(self.plan) if self.active is None else self.active
        self.base: _LinearPass | None = None  # the noise-off pass, once run

    def _run(self, current: fx.Node | None = None, chunk: range | None = None) -> _LinearPass:
        run = _LinearPass(self.gm, self.plan, self.bn_nodes, current, chunk, self.on, self.stops)
        if current is None:
            run.run(*self.args)
        else:
            assert self.base is not None  # predict_each runs the noise-off pass first
            run.follow(self.base)
        return run

    def _groups(self, node: fx.Node, x: Tensor) -> _LinearPass:
        grouping = self.plan[node].grouping
        width = {"sample": 1, "channel": x.shape[1], "element": x[0].numel()}[grouping]
        step = max(1, _CHUNK_ELEMENTS // max(1, x.numel()))
        runs = [self._run(node, range(i, min(i + step, width))) for i in range(0, width, step)]
        for run in runs[1:]:
            runs[0].broken.update(run.broken)
            for bn, (e_sum, _) in run.moments.items():  # the same positions, other groups
                runs[0].moments[bn][0] = runs[0].moments[bn][0] + e_sum
        return runs[0]

    def _source_pass(self, node: fx.Node, x: Tensor) -> _LinearPass:
        """One source's ``[Σe, count]`` per BatchNorm, or why it cannot be exact: element-wise
        noise tries the squared form first and the groups form where that one gives up."""
        grouping = self.plan[node].grouping
        if grouping not in ("element", "structured"):
            return self._groups(node, x)
        squared = self._run(node)
        if grouping == "structured":
            return squared  # broken wherever it reaches: Monte Carlo
        if any(why.retry for why in squared.broken.values()) and x[0].numel() <= self.max_groups:
            groups = self._groups(node, x)
            for bn, row in squared.moments.items():  # exact in both; the squared form also
                groups.moments[bn] = row  # follows layers that mix samples
                groups.broken.pop(bn, None)
            return groups
        return squared

    def predict(self, draws: int, seed: int) -> dict[str, ShiftPrediction]:
        return self.predict_each(draws, seed)[0]

    def predict_each(
        self, draws: int, seed: int, alone: bool = False
    ) -> tuple[dict[str, ShiftPrediction], dict[str, dict[str, ShiftPrediction]]]:
        """Every BatchNorm's prediction with all active sources on; with ``alone``, also
        ``{bn: {source name: prediction with that source alone on}}``."""
        base = self.base = self._run()
        extras: dict[str, dict[fx.Node, Tensor]] = {bn: {} for bn in base.moments}
        broken: dict[str, dict[fx.Node, str]] = {bn: {} for bn in base.moments}
        for node in self.on:
            run = self._source_pass(node, base.source_inputs[node])
            for bn, (e_sum, count) in run.moments.items():
                extras[bn][node] = self.plan[node].variance * e_sum / count
            for bn, why in run.broken.items():
                broken[bn].setdefault(node, str(why))
        mc_bns = sorted(bn for bn, why in broken.items() if why)
        estimates = self._monte_carlo(mc_bns, draws, seed) if mc_bns else {}
        combined = {}
        for bn, (s1, s2, n) in base.moments.items():
            eval_var = s2 / n - (s1 / n).square()
            reached = [node for node in self.on if node in extras[bn] or node in broken[bn]]
            names = tuple(self.plan[node].name for node in reached)
            if broken[bn]:
                e, reason = estimates[bn], next(iter(broken[bn].values()))
                note = f"Monte Carlo, {draws} draws: {reason}"
                combined[bn] = ShiftPrediction(bn, e.ratio, False, e.stderr, names, note)
            else:
                ratio = _exact_ratio(eval_var, sum(extras[bn].values(), torch.zeros(())))
                combined[bn] = ShiftPrediction(bn, ratio, True, None, names, _note(names))
        if not alone:
            return combined, {}
        each: dict[str, dict[str, ShiftPrediction]] = {}
        for bn, (s1, s2, n) in base.moments.items():
            eval_var = s2 / n - (s1 / n).square()
            for node in (node for node in self.on if node in extras[bn] or node in broken[bn]):
                name = self.plan[node].name
                if node not in broken[bn]:
                    ratio = _exact_ratio(eval_var, extras[bn][node])
                    one = ShiftPrediction(bn, ratio, True, None, (name,))
                else:
                    # Estimated: the combined Monte Carlo of every source reaching this BatchNorm.
                    # One run per source alone would cost a run of `draws` forwards per finding,
                    # quadratic in depth on a residual trunk that carries every earlier drop path.
                    one = combined[bn]
                each.setdefault(bn, {})[name] = one
        return combined, each

    def _monte_carlo(self, names: list[str], draws: int, seed: int) -> dict[str, Any]:
        recorded = [n for n, name in self.bn_nodes.items() if name in names]
        runner = mc.NoisyRun(self.gm, self.plan, self.args, self.on, self.stops, recorded)
        switches = [
            self.gm.get_submodule(str(n.target)) for n in self.on if n.op != "call_function"
        ]
        bns = {name: self.chosen[name] for name in names}
        return mc.monte_carlo_shifts(bns, switches, runner, draws, seed)


def _exact_ratio(eval_var: Tensor, extra: Tensor) -> float:
    """Mean over channels with ``Var_eval > 0`` of ``Var_eval / (Var_eval + extra)``."""
    keep = eval_var > 0
    if not keep.any():
        return math.nan
    extra = extra.expand_as(eval_var)
    return float((eval_var[keep] / (eval_var[keep] + extra[keep])).mean())


def _note(names: tuple[str, ...]) -> str:
    return "" if names else _UNREACHED


def predict_on_trace(
    model: nn.Module,
    gm: fx.GraphModule,
    args: tuple[Any, ...],
    plan: Mapping[fx.Node, NoiseSource],
    batch_norms: Sequence[str],
    *,
    draws: int = 32,
    seed: int = 0,
    max_groups: int = 4096,
    stops: Collection[fx.Node] = (),
) -> tuple[dict[str, ShiftPrediction], dict[str, dict[str, ShiftPrediction]]]:
    """:func:`predict_shifts` on a graph the caller traced (``gm``, whose modules are
    ``model``'s) with the sources it found there (``plan``: its nodes, named as the caller
    names them), for :func:`varshift.diagnose.lint`, which has traced the model already.

    Returns ``(combined, alone)``: ``{bn: prediction with every source on}`` and
    ``{bn: {source name: prediction with that source alone on}}``; Monte Carlo masks drawn from
    ``seed``. ``stops``: nodes the noise is followed up to but not through (lint's
    normalizations: a BatchNorm's shift is that of the noise reaching it before any other
    normalization, in both the exact pass and the Monte Carlo forwards). The model is left as it
    was (flags, buffers, global random state).
    """
    chosen = mc.chosen_batch_norms(model, batch_norms)
    with mc.model_state_kept(model):
        prediction = _Prediction(gm, args, chosen, dict(plan), max_groups, None, frozenset(stops))
        return prediction.predict_each(draws, seed, alone=True)
