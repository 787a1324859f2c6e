"""The traced graph behind :func:`varshift.diagnose.noise_moments.predict_shifts`: the noise
sources (:class:`NoiseSource`), the fx trace, which nodes the closed form can follow, and the
Monte Carlo estimate for the paths it cannot: ``draws`` forwards of the example inputs with the
chosen sources on, every other stochastic layer off and every BatchNorm in eval, so only the
noise differs from the one noise-off forward.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_map

from varshift.diagnose.bn_stats import batch_norms as bn_layers
from varshift.diagnose.calls import call_without_noise

__all__ = [
    "EagerStops",
    "Grouping",
    "MonteCarloShift",
    "NoiseSource",
    "NoisyRun",
    "NotLinearError",
    "ShiftPrediction",
    "eager_predictions",
    "chosen_batch_norms",
    "functional_dropout",
    "is_switched_off",
    "keeps_samples",
    "model_state_kept",
    "dropout_source",
    "monte_carlo_shifts",
    "run_noise_off",
    "op_category",
    "op_name",
    "pool_coefficient",
    "resolve_sources",
    "torch_dropouts",
    "trace_with_leaves",
]

Grouping = Literal["element", "channel", "sample", "structured"]
_GROUPINGS: tuple[Grouping, ...] = ("element", "channel", "sample", "structured")


@dataclass(frozen=True)
class NoiseSource:
    """One multiplicative noise source ``x ↦ m ⊙ x`` with ``E[m] = 1`` and ``Var[m] = variance``.

    Args:
        name: the qualified name of the noise module (``"block.drop"``), or, for a functional
            call such as ``F.dropout(x, 0.3, self.training)``, the name of its ``torch.fx`` node
            (``"dropout"``, ``"dropout_1"``, ... in call order).
        variance: ``s² = Var[m]``; inverted Bernoulli dropout with drop probability ``p`` has
            ``p / (1 − p)`` (:meth:`dropout`).
        grouping: which elements share one mask: ``"element"`` (``nn.Dropout``: none),
            ``"channel"`` (``nn.Dropout1d/2d/3d``: each (sample, channel) of ``Tensor[N, C, *]``)
            or ``"sample"`` (stochastic depth, DropPath: each sample); ``"structured"`` for
            noise no grouping describes (DropBlock's blocks, DropConnect's weight masks): the
            source is run noise-off in the exact pass and always predicted by Monte Carlo.
    """

    name: str
    variance: float
    grouping: Grouping = "element"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty module or node name, got {self.name!r}")
        value = self.variance
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"variance must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"variance must be finite and >= 0, got {value!r}")
        if self.grouping not in _GROUPINGS:
            raise ValueError(f"grouping must be one of {_GROUPINGS}, got {self.grouping!r}")

    @classmethod
    def dropout(cls, name: str, p: float, grouping: Grouping = "element") -> NoiseSource:
        """Inverted Bernoulli dropout with drop probability ``p`` in ``[0, 1)``."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a drop probability in [0, 1), got {p!r}")
        return cls(name, p / (1 - p), grouping)


def dropout_source(name: str, module: nn.Module) -> NoiseSource | None:
    """The source of one of torch's dropout modules (``nn.Dropout``: element-wise,
    ``nn.Dropout1d/2d/3d``: per channel); ``None`` for any other module."""
    if isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return NoiseSource.dropout(name, module.p, "channel")
    return NoiseSource.dropout(name, module.p) if type(module) is nn.Dropout else None


_CHANNEL = (F.dropout1d, F.dropout2d, F.dropout3d)
_FUNCTIONAL: dict[Any, Grouping] = {F.dropout: "element", **dict.fromkeys(_CHANNEL, "channel")}
_OFF_ONLY = {F.alpha_dropout, F.feature_alpha_dropout}  # no mean-one mask: off, never a source


def functional_dropout(node: fx.Node) -> tuple[Grouping, float] | None:
    """``(grouping, p)`` of a traced torch dropout call that is active (``training=True``);
    ``None`` for any other node."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL:
        return None
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    bound.apply_defaults()
    p, training = bound.arguments["p"], bound.arguments["training"]
    if training is not True or not isinstance(p, (int, float)):
        return None
    return _FUNCTIONAL[node.target], float(p)


def is_switched_off(node: fx.Node) -> bool:
    """A stochastic torch call that every pass runs as the identity unless it is a source."""
    return node.op == "call_function" and (
        node.target in _OFF_ONLY or functional_dropout(node) is not None
    )


def run_noise_off(interpreter: fx.Interpreter, n: fx.Node) -> Any:
    """One stochastic node run with its noise off: a module as it is (the passes keep noise
    modules in eval unless they switch them on), torch's dropouts as the identity, any other
    registered function with its ``training``/``train`` switch turned off."""
    if n.op == "call_module":
        return fx.Interpreter.run_node(interpreter, n)
    if is_switched_off(n):
        return interpreter.env[n.all_input_nodes[0]]
    args, kwargs = interpreter.fetch_args_kwargs_from_env(n)
    return call_without_noise(n.target, args, kwargs)[0]  # type: ignore[arg-type]


class NotLinearError(Exception):
    """A node the closed form cannot follow; ``retry``: the groups form still may."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


_CATEGORIES = {  # by name, for torch's, torch.nn.functional's and operator's functions
    "route": "getitem reshape flatten permute transpose squeeze unsqueeze cat concat stack pad "
    "clone view contiguous expand",
    "add": "add sub neg pos",
    "scale": "mul truediv div",
    "mix": "linear conv1d conv2d conv3d matmul mean sum avg_pool1d avg_pool2d avg_pool3d "
    "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d",
}
_CATEGORY = {name: kind for kind, names in _CATEGORIES.items() for name in names.split()}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOLS = (*_AVG_POOLS, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def op_name(node: fx.Node) -> str:
    """A method's name, or a torch/functional/operator function's name ("" for any other)."""
    if node.op == "call_method":
        return str(node.target)
    name = getattr(node.target, "__name__", "")
    homes = (torch, F, operator)
    return name if any(getattr(home, name, None) is node.target for home in homes) else ""


def op_category(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        if isinstance(module, (nn.Linear, _ConvNd, *_POOLS)):
            return "mix"
        if isinstance(module, _BatchNorm) and module.running_var is not None:
            return "bn"
        if isinstance(module, (nn.Identity, nn.Flatten, nn.Unflatten, _DropoutNd)):
            return "route"
        raise NotLinearError(f"{type(module).__name__} '{node.target}' is not linear")
    name = op_name(node)
    if name == "batch_norm" and node.op == "call_function":
        if node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False):
            raise NotLinearError(f"'{node.name}' normalises with batch statistics")
        return "bn"
    if name not in _CATEGORY:
        raise NotLinearError(f"'{node.name}' ({name or node.target}) is not linear")
    return _CATEGORY[name]


def _dims(value: Any, ndim: int) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [int(d) % ndim for d in items]


def keeps_samples(n: fx.Node, first: fx.Node, x: Tensor, value: Tensor) -> bool:
    """Whether a function keeps every sample on its own along dimension 0."""
    if value.dim() == 0 or x.dim() == 0 or value.shape[0] != x.shape[0]:
        return False
    name, args, kwargs, nd = op_name(n), n.args, n.kwargs, x.dim()
    arg = args[1] if len(args) > 1 else None
    if name in ("cat", "concat", "stack"):
        return _dims(kwargs.get("dim", arg if arg is not None else 0), value.dim())[0] != 0
    if name == "getitem":
        index = arg if isinstance(arg, tuple) else (arg,)
        if isinstance(index[0], slice) and index[0] == slice(None):
            return True
        return index[0] is Ellipsis and sum(i is not None for i in index[1:]) < nd
    if name == "permute":
        return _dims(args[1:] if n.op == "call_method" else arg, nd)[0] == 0
    if name == "transpose":
        return 0 not in _dims(args[1:3], nd)
    if name == "unsqueeze":
        return _dims(kwargs.get("dim", arg), nd + 1)[0] != 0
    if name == "flatten":
        return _dims(kwargs.get("start_dim", arg if arg is not None else 0), nd)[0] != 0
    if name in ("mean", "sum"):
        dim = kwargs.get("dim", arg)
        return dim is not None and 0 not in _dims(dim, nd)
    if name == "matmul":  # only a noisy left operand keeps the rows (samples) apart
        return args[0] is first and nd >= 2
    return True


def pool_coefficient(pool: nn.Module, v: Tensor) -> Tensor:
    """Each output of an average pool weighs its window's inputs equally, ``1/divisor``:
    the pooled ones (``valid/divisor``) over the summed ones (``valid``)."""
    ones = torch.ones_like(v)
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    k, s, p, ceil, count = (getattr(pool, name) for name in names)
    if isinstance(pool, nn.AvgPool1d):  # avg_pool1d has no divisor_override: pool a 1×L plane
        k, s, p = (1, k[0]), (1, s[0]), (0, p[0])
        window = F.avg_pool2d(ones.unsqueeze(-2), k, s, p, ceil, count, 1).squeeze(-2)
    else:
        pool_fn = F.avg_pool2d if isinstance(pool, nn.AvgPool2d) else F.avg_pool3d
        window = pool_fn(ones, k, s, p, ceil, count, 1)
    return pool(ones) / window  # type: ignore[no-any-return]


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaves
            or isinstance(m, (_BatchNorm, _DropoutNd))
            or super().is_leaf_module(m, module_qualified_name)
        )


def trace_with_leaves(model: nn.Module, leaves: set[str]) -> fx.GraphModule:
    """fx-trace ``model``, every module in training mode (so ``F.dropout(x, p, self.training)``
    is an active call), BatchNorms, dropouts and ``leaves`` kept whole; raises what fx raises."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in flags:
            module.training = True
        tracer = _LeafTracer(leaves)
        graph = tracer.trace(model)  # sets tracer.root
        return fx.GraphModule(tracer.root, graph)
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def model_state_kept(model: nn.Module) -> Iterator[None]:
    """Every module in eval and gradients off for the duration; on exit every ``training``
    flag, every buffer and the global random state as they were, even on error."""
    flags = [(module, module.training) for module in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tensors = [*model.parameters(), *model.buffers()]
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, flag in flags:
            module.training = flag


@dataclass(frozen=True)
class MonteCarloShift:
    """Monte Carlo ratio of one BatchNorm: mean over channels of ``Var_eval / Var_train``, its
    jackknife standard error over draws, and whether the noise moved the input at all."""

    ratio: float
    stderr: float
    moved: bool


def monte_carlo_shifts(
    batch_norms: Mapping[str, nn.Module],
    switches: Sequence[nn.Module],
    forward: Callable[[bool], object],
    draws: int,
    seed: int,
) -> dict[str, MonteCarloShift]:
    """Run ``forward(False)`` once and ``forward(True)`` ``draws`` times, the global generator
    seeded with ``seed`` and the ``switches`` (source modules: their own flag only, children
    stay in eval) in training mode when on, reading each BatchNorm's input in a pre-hook.

    Per channel, ``Var_eval`` is the population variance of the noise-off input over samples and
    positions, ``Var_train`` that of the noise-on input pooled over all draws (what BatchNorm's
    running variance tracks); their ratio is averaged over the channels with ``Var_eval > 0``,
    as :attr:`varshift.diagnose.LayerShift.mean_ratio` does. The standard error, a
    delete-one-draw jackknife, covers the masks, not the choice of example inputs.
    """
    calls: dict[str, list[Tensor]] = {name: [] for name in batch_norms}
    rows: dict[str, list[Tensor]] = {name: [] for name in batch_norms}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            flat = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            calls[name].append(torch.stack((flat.sum(1), flat.square().sum(1))) / flat.shape[1])

        return hook

    torch.manual_seed(seed)
    with ExitStack() as stack:
        for name, bn in batch_norms.items():
            stack.callback(bn.register_forward_pre_hook(recorder(name)).remove)
        for on in (False, *([True] * draws)):
            for module in switches:
                module.training = on
            forward(on)
            for name, seen in calls.items():
                if seen:  # a BatchNorm called twice in one forward pools both calls
                    rows[name].append(torch.stack(seen).mean(0))
                seen.clear()
    return {name: _summarise(torch.stack(r)) for name, r in rows.items() if r}


def _summarise(rows: Tensor) -> MonteCarloShift:
    """``rows``: ``[1 + draws, 2, C]`` per-channel mean and mean square, noise-off row first."""
    off, on = rows[0], rows[1:]
    eval_var, k = off[1] - off[0].square(), on.shape[0]

    def ratio(moments: Tensor) -> Tensor:
        train_var = moments[1] - moments[0].square()
        keep = (eval_var > 0) & (train_var > 0)
        return (eval_var[keep] / train_var[keep]).mean()

    loo = torch.stack([ratio((on.sum(0) - row) / (k - 1)) for row in on])
    stderr = float(((k - 1) / k * (loo - loo.mean()).square().sum()).sqrt())
    return MonteCarloShift(float(ratio(on.mean(0))), stderr, bool((on != off).any()))


# Random torch calls outside the plan: drawn afresh in every forward, never reused.
_RANDOM_CALLS = frozenset(
    (
        *("rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm"),
        *("bernoulli", "normal", "multinomial", "poisson"),
        *("bernoulli_", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_"),
        *("log_normal_", "random_"),
    )
)


class NoisyRun(fx.Interpreter):
    """``runner(on)``: the traced model on ``args``, functional sources in ``active`` on if
    ``on``; every other node of ``plan`` and every torch dropout call run with the noise off.
    (Module sources are switched by their ``training`` flag, see :func:`monte_carlo_shifts`.)

    With ``recorded`` (the BatchNorm nodes whose inputs the Monte Carlo reads), a noise-on run
    computes only what the noise can change: the nodes downstream of an active source (up to
    the ``stops``) that lead to a recorded node or to a source. Every other value is the
    noise-off run's, kept from the first call, which must be ``runner(False)``. Deterministic
    layers give the same values either way, and the sources draw their masks in the same order,
    so the estimate is the same to the last bit, at a fraction of the cost where the noise
    reaches a small part of the graph (pre-norm residual blocks: only the trunk)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        plan: Mapping[fx.Node, object],
        args: tuple[Any, ...],
        active: Collection[fx.Node] | None = None,
        stops: Collection[fx.Node] = (),
        recorded: Collection[fx.Node] | None = None,
    ):
        super().__init__(gm)
        self.plan, self.args, self.on = set(plan), args, False
        self.active = self.plan if active is None else set(active)
        self.stops, self.clean = stops, dict[fx.Node, Any]()
        self.noisy: set[fx.Node] | None = None  # None: every node runs in a noise-on run
        self.kept: set[fx.Node] = set(stops)
        if recorded is not None:
            self.noisy = _noisy_nodes(gm.graph, self.active, stops, recorded)
            self.kept |= {a for n in self.noisy for a in n.all_input_nodes} - self.noisy
        self.ran_off = False

    def __call__(self, on: bool) -> None:
        if on and not self.ran_off:
            raise RuntimeError("NoisyRun: the first run must be the noise-off one")
        self.on, self.ran_off = on, self.ran_off or not on
        self.run(*self.args)

    def run_node(self, n: fx.Node) -> Any:
        """With ``stops``, each stop node runs (its hooks see the noisy input) but passes on
        its noise-off output, so the noise goes no further."""
        if self.on and self.noisy is not None and n not in self.noisy:
            return _copy(self.clean.get(n))  # the noise cannot change it: the noise-off value
        stochastic = n.op == "call_function" and (n in self.plan or is_switched_off(n))
        if stochastic and not (self.on and n in self.active):
            value = run_noise_off(self, n)
        else:
            value = super().run_node(n)
        if not self.on and n in self.kept:
            self.clean[n] = _copy(value)
        return _copy(self.clean[n]) if self.on and n in self.stops else value


def _copy(value: Any) -> Any:
    """A copy of every tensor in ``value``: a kept noise-off value is handed to layers that may
    write into it (``out += identity``, ``relu(inplace=True)``), in every run."""
    return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, value)


def _is_random(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and op_name(n) in _RANDOM_CALLS


def _noisy_nodes(
    graph: fx.Graph,
    active: Collection[fx.Node],
    stops: Collection[fx.Node],
    recorded: Collection[fx.Node],
) -> set[fx.Node]:
    """The nodes a noise-on run must compute: those whose value the noise reaches (from an
    active source or a random call, not through a stop) or that are recorded, and that lead
    to a recorded node or to a source (whose masks must be drawn in the same order)."""
    reached: set[fx.Node] = set()  # nodes whose input or output carries noise
    carries: set[fx.Node] = set()  # nodes whose output carries noise
    for n in graph.nodes:
        if n in active or _is_random(n) or any(a in carries for a in n.all_input_nodes):
            reached.add(n)
            if n not in stops:
                carries.add(n)
    # Sources and random calls draw in every run, recorded nodes fire their hooks; each needs
    # its inputs that the noise reaches computed again, and those theirs.
    pending = [n for n in graph.nodes if n in recorded or n in active or _is_random(n)]
    wanted: set[fx.Node] = set()
    while pending:
        n = pending.pop()
        if n not in wanted:
            wanted.add(n)
            pending.extend(a for a in n.all_input_nodes if a in reached)
    return wanted


class EagerStops:
    """The ``stops`` of :class:`NoisyRun` for a model run in eager mode: ``with
    EagerStops(modules, forward) as runner``, ``runner(on)`` calls ``forward()``, and in a
    noise-on run each call of a stop module passes on the output of the same call (the k-th
    of that module) in the last noise-off run, so the noise goes no further; its hooks still
    see the noisy input. The forward hooks are removed on exit, even on error."""

    def __init__(self, modules: Sequence[nn.Module], forward: Callable[[], object]) -> None:
        self.modules, self.forward, self.on = list(modules), forward, False
        self.clean: dict[tuple[int, int], Any] = {}
        self.calls: dict[int, int] = {}

    def __enter__(self) -> EagerStops:
        self.handles = [module.register_forward_hook(self._hook) for module in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def __call__(self, on: bool) -> None:
        self.on = on
        self.calls.clear()
        self.forward()

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        count = self.calls.get(id(module), 0)
        self.calls[id(module)] = count + 1
        if not self.on:
            self.clean[id(module), count] = _copy(output)
            return None
        return _copy(self.clean.get((id(module), count)))  # None (keep the output): no such call


def chosen_batch_norms(model: nn.Module, names: Sequence[str] | None) -> dict[str, _BatchNorm]:
    """The BatchNorms with running statistics named in ``names`` (``None``: all of them)."""
    found = dict(bn_layers(model))
    if not found:
        raise ValueError(
            f"model ({type(model).__name__}) has no BatchNorm layer with running "
            "statistics; there is no shift to predict"
        )
    if names is None:
        return found
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(
            f"batch_norms must name BatchNorms with running statistics {sorted(found)}, "
            f"got unknown {unknown}"
        )
    return {name: found[name] for name in names}


def resolve_sources(
    gm: fx.GraphModule, modules: Mapping[str, nn.Module], given: list[NoiseSource] | None
) -> dict[fx.Node, NoiseSource]:
    """The source behind every traced node that applies noise; each call draws its own mask."""
    plan: dict[fx.Node, NoiseSource] = {}
    by_name = {source.name: source for source in given or ()}
    for node in gm.graph.nodes:
        key = str(node.target) if node.op == "call_module" else node.name
        if given is not None:
            if key in by_name and (node.op == "call_module" or is_switched_off(node)):
                plan[node] = by_name[key]
        elif node.op == "call_module" and (found := dropout_source(key, modules[key])):
            plan[node] = found
        elif (call := functional_dropout(node)) is not None:
            plan[node] = NoiseSource.dropout(node.name, call[1], call[0])
    missing = sorted(set(by_name) - {source.name for source in plan.values()})
    if missing:
        raise ValueError(
            f"sources must name noise modules or functional dropout nodes the forward calls; "
            f"never called: {missing}"
        )
    return plan


def torch_dropouts(model: nn.Module) -> list[NoiseSource]:
    """A source for each of torch's dropout modules in ``model``."""
    found = (dropout_source(name, module) for name, module in model.named_modules())
    return [source for source in found if source is not None]


@dataclass(frozen=True)
class ShiftPrediction:
    """The predicted variance shift at one BatchNorm's input. ``ratio``: mean over channels of
    ``Var_eval / Var_train`` (channels with ``Var_eval = 0`` left out), the figure
    :attr:`varshift.diagnose.LayerShift.mean_ratio` measures. ``exact``: closed form through a
    linear path, ``stderr`` ``None``; otherwise a Monte Carlo estimate and its standard error,
    ``note`` saying why. ``sources``: the noise sources that reach the layer."""

    bn: str
    ratio: float
    exact: bool
    stderr: float | None
    sources: tuple[str, ...]
    note: str = ""


def eager_predictions(
    model: nn.Module,
    args: tuple[Any, ...],
    chosen: Mapping[str, _BatchNorm],
    given: list[NoiseSource] | None,
    draws: int,
    seed: int,
    error: Exception,
) -> dict[str, ShiftPrediction]:
    """Monte Carlo for every BatchNorm, in eager mode, when fx cannot trace the model."""
    sources = torch_dropouts(model) if given is None else given
    modules = dict(model.named_modules())
    unknown = [s.name for s in sources if s.name not in modules]
    if unknown:
        raise ValueError(f"sources must name modules when fx cannot trace the model: {unknown}")
    switches = [modules[s.name] for s in sources]
    estimates = monte_carlo_shifts(chosen, switches, lambda on: model(*args), draws, seed)
    names = tuple(s.name for s in sources)
    note = f"Monte Carlo, {draws} draws: fx could not trace the model ({type(error).__name__})"
    return {
        bn: ShiftPrediction(bn, e.ratio, False, e.stderr, names if e.moved else (), note)
        for bn, e in estimates.items()
    }
