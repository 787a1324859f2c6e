"""Registry of stochastic modules and functions, and the noise each one applies.

The lint in :mod:`varshift.diagnose` asks two questions of every layer or traced call:
*is it random in training?* and *which multiplicative noise does it apply?* The second answer
is a :class:`NoiseSpec` in :mod:`varshift.theory` terms, from which the variance shift
``Δ = v / (v + σ²(c² + v))`` at a downstream BatchNorm follows (Li et al., "Understanding the
Disharmony between Dropout and Batch Normalization by Variance Shift", CVPR 2019).

Three registries, one per way randomness shows up in a model or in a ``torch.fx`` graph:

* **modules** (``call_module`` nodes and ``model.modules()``): :func:`register_stochastic`,
  :func:`is_stochastic` (``isinstance``-based, so subclasses count), :func:`noise_spec`;
* **functions** (``call_function`` nodes): :func:`register_stochastic_function`,
  :func:`is_stochastic_function`, :func:`function_noise_spec`, :func:`stochastic_functions`;
* **tensor methods** (``call_method`` nodes, recorded by name): :func:`is_stochastic_method`,
  :func:`register_stochastic_method`, :func:`stochastic_methods`.

Built-ins registered here: torch's dropout modules and functions, and torch's random-number
sources (``torch.bernoulli``, ``torch.rand_like``, ``Tensor.normal_``, ...), which is how a
hand-written dropout (``x * (torch.rand_like(x) < q) / q``) shows up in a graph. The varshift
layers register themselves when their modules are imported.

A spec of ``None`` means "stochastic, but not a multiplicative noise that theory models"
(alpha dropout, a bare random-number source); :func:`noise_spec` also returns ``None`` for a
module that is not stochastic at all, so ask :func:`is_stochastic` to tell the two apart.

Each registration also says which elements share one mask (its :data:`MaskGrouping`, read with
:func:`mask_grouping` and :func:`function_mask_grouping`): theory's per-unit variance does not
depend on it, the shift at a BatchNorm after a convolution or a residual sum does, and lint's
predictor needs it. torch's ``Dropout1d/2d/3d`` drop whole channels.

Noise layers of other libraries (torchvision, timm: :mod:`varshift.layers.zoo`) are registered on
demand, through :func:`register_library_noise`: at the first lookup after the user imported the
library, never by importing it ourselves.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd  # the base holding `p` for nn.Dropout*

from varshift.theory import noise_variance
from varshift.theory.checks import check_real

__all__ = [
    "CallGroupingFn",
    "CallSpecFn",
    "MaskGrouping",
    "ModuleGroupingFn",
    "ModuleSpecFn",
    "NoiseSpec",
    "bernoulli_spec",
    "function_mask_grouping",
    "function_noise_spec",
    "is_stochastic",
    "is_stochastic_function",
    "is_stochastic_method",
    "mask_grouping",
    "noise_spec",
    "register_library_noise",
    "register_stochastic",
    "register_stochastic_function",
    "register_stochastic_method",
    "spec_from_call",
    "stochastic_functions",
    "stochastic_methods",
    "stochastic_modules",
]


@dataclass(frozen=True, repr=False)
class NoiseSpec:
    """The multiplicative noise ``m`` (``E[m] = 1``) a layer or call applies in training.

    Args:
        kind: a :mod:`varshift.theory` noise kind: ``"bernoulli"`` (params ``p``, the drop
            probability; ``Var[m] = p/(1−p)``), ``"gaussian"`` (``p``; same variance) or
            ``"uout"`` (``beta``; ``Var[m] = β²/3``), or any kind registered with
            ``varshift.theory.register_noise_kind``.
        params: the kind's parameters, e.g. ``{"p": 0.3}``. Stored as a read-only copy, so a
            spec is immutable and hashable.

    Construction checks ``kind`` and ``params`` with ``varshift.theory.noise_variance``, so a
    spec that exists is one theory can evaluate.
    """

    kind: str
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"kind must be a non-empty noise-kind name, got {self.kind!r}")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"params must be a mapping of name to number, got {self.params!r}")
        frozen = MappingProxyType(
            {name: check_real(f"params[{name!r}]", v) for name, v in self.params.items()}
        )
        # The dataclass is frozen; this is the one sanctioned write, in the constructor.
        object.__setattr__(self, "params", frozen)
        self.variance()  # theory refuses unknown kinds, wrong parameters, values out of range

    def variance(self) -> float:
        """``σ² = Var[m]`` of this noise (``varshift.theory.noise_variance``)."""
        return noise_variance(self.kind, **self.params)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        return f"NoiseSpec(kind={self.kind!r}, params={dict(self.params)!r})"


ModuleT = TypeVar("ModuleT", bound=nn.Module)
FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])

ModuleSpecFn = Callable[[ModuleT], "NoiseSpec | None"]
"""``spec_fn(module) -> NoiseSpec | None`` for instances of a registered module class."""

CallSpecFn = Callable[[tuple[Any, ...], Mapping[str, Any]], "NoiseSpec | None"]
"""``spec_fn(args, kwargs) -> NoiseSpec | None`` for a registered function, given the call's
positional and keyword arguments exactly as written (or as ``torch.fx`` recorded them)."""

MaskGrouping = Literal["element", "channel", "sample", "structured"]
"""Which elements of ``Tensor[N, C, *]`` share one mask: ``"element"`` (none: ``nn.Dropout``),
``"channel"`` (each (sample, channel): ``nn.Dropout2d``), ``"sample"`` (each sample: stochastic
depth, DropPath) or ``"structured"`` (a pattern none of these describes: DropBlock's blocks, a
mask shared by the whole batch; lint predicts it by Monte Carlo only)."""

ModuleGroupingFn = Callable[[ModuleT], MaskGrouping]
"""``grouping_fn(module) -> MaskGrouping`` where the grouping depends on the instance."""

CallGroupingFn = Callable[[tuple[Any, ...], Mapping[str, Any]], MaskGrouping]
"""``grouping_fn(args, kwargs) -> MaskGrouping`` where the grouping depends on the call."""

_MASK_GROUPINGS: tuple[MaskGrouping, ...] = ("element", "channel", "sample", "structured")


class _ModuleEntry(NamedTuple):
    spec_fn: ModuleSpecFn[Any] | None
    grouping: MaskGrouping | ModuleGroupingFn[Any]


class _FunctionEntry(NamedTuple):
    spec_fn: CallSpecFn | None
    grouping: MaskGrouping | CallGroupingFn


# Insertion-ordered: listings come out in registration order.
_MODULES: dict[type[nn.Module], _ModuleEntry] = {}
_FUNCTIONS: dict[Callable[..., Any], _FunctionEntry] = {}
_METHODS: set[str] = set()


def register_stochastic(
    cls: type[ModuleT],
    spec_fn: ModuleSpecFn[ModuleT] | None = None,
    *,
    grouping: MaskGrouping | ModuleGroupingFn[ModuleT] = "element",
    replace: bool = True,
) -> type[ModuleT]:
    """Declare ``cls`` (and its subclasses) stochastic, with ``spec_fn(module)`` giving the
    noise of an instance (``None``: stochastic, noise not modelled) and ``grouping`` which of
    its elements share one mask (a :data:`MaskGrouping`, or a function of the instance).
    Registering a class again replaces its entry, unless ``replace=False`` (then the first
    registration stays); a subclass registered on its own takes precedence over its parents.
    Returns ``cls``, so it also works as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be a subclass of torch.nn.Module, got {cls!r}")
    _check_spec_fn(spec_fn)
    _check_grouping(grouping)
    if replace or cls not in _MODULES:
        _MODULES[cls] = _ModuleEntry(spec_fn, grouping)
    return cls


def is_stochastic(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a registered stochastic class (whatever its current
    ``training`` flag: the question is what it does in training)."""
    _register_imported_libraries()
    return isinstance(module, tuple(_MODULES))


def noise_spec(module: nn.Module) -> NoiseSpec | None:
    """The noise ``module`` applies in training, from the ``spec_fn`` of the most specific
    registered class in its MRO; ``None`` when it is not stochastic or its noise is not
    modelled (tell the two apart with :func:`is_stochastic`)."""
    entry = _module_entry(module)
    if entry is None or entry.spec_fn is None:
        return None
    return entry.spec_fn(module)


def mask_grouping(module: nn.Module) -> MaskGrouping:
    """Which elements share one mask in the noise of ``module`` (the most specific registered
    class in its MRO decides); ``"element"`` for a module that is not stochastic."""
    entry = _module_entry(module)
    if entry is None:
        return "element"
    return entry.grouping if isinstance(entry.grouping, str) else entry.grouping(module)


def _module_entry(module: nn.Module) -> _ModuleEntry | None:
    _register_imported_libraries()
    for cls in type(module).__mro__:
        if cls in _MODULES:
            return _MODULES[cls]
    return None


def stochastic_modules() -> tuple[type[nn.Module], ...]:
    """Every registered stochastic module class, in registration order."""
    _register_imported_libraries()
    return tuple(_MODULES)


def register_stochastic_function(
    fn: FunctionT,
    spec_fn: CallSpecFn | None = None,
    *,
    grouping: MaskGrouping | CallGroupingFn = "element",
    replace: bool = True,
) -> FunctionT:
    """Declare the function ``fn`` stochastic; ``spec_fn(args, kwargs)`` gives the noise of one
    call (see :func:`spec_from_call` for the common ``f(input, strength, training)`` shape) and
    ``grouping`` which elements share one mask (a :data:`MaskGrouping`, or a function of the
    call's arguments). ``replace=False`` keeps an earlier registration. Returns ``fn``, so it
    also works as a decorator."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    _check_spec_fn(spec_fn)
    _check_grouping(grouping)
    if replace or fn not in _FUNCTIONS:
        _FUNCTIONS[fn] = _FunctionEntry(spec_fn, grouping)
    return fn


def is_stochastic_function(fn: object) -> bool:
    """Whether ``fn`` (e.g. a ``call_function`` node's ``target``) is a registered stochastic
    function. Identity-based: ``torch.nn.functional.dropout`` and ``F.dropout`` are one object."""
    return _function_entry(fn) is not None


def function_noise_spec(
    fn: object, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
) -> NoiseSpec | None:
    """The noise one call ``fn(*args, **kwargs)`` applies; ``None`` when ``fn`` is not a
    registered stochastic function, its noise is not modelled, or its strength is not a
    constant (an ``fx`` node)."""
    entry = _function_entry(fn)
    if entry is None or entry.spec_fn is None:
        return None
    return entry.spec_fn(tuple(args), dict(kwargs or {}))


def function_mask_grouping(
    fn: object, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
) -> MaskGrouping:
    """Which elements share one mask in the noise of the call ``fn(*args, **kwargs)``;
    ``"element"`` for a function that is not stochastic."""
    entry = _function_entry(fn)
    if entry is None:
        return "element"
    if isinstance(entry.grouping, str):
        return entry.grouping
    return entry.grouping(tuple(args), dict(kwargs or {}))


def _function_entry(fn: object) -> _FunctionEntry | None:
    _register_imported_libraries()
    try:
        return _FUNCTIONS.get(fn)  # type: ignore[call-overload,no-any-return]  # any hashable
    except TypeError:  # an unhashable target cannot have been registered
        return None


def stochastic_functions() -> tuple[Callable[..., Any], ...]:
    """Every registered stochastic function, in registration order."""
    _register_imported_libraries()
    return tuple(_FUNCTIONS)


def register_stochastic_method(name: str) -> None:
    """Declare the tensor method ``name`` (as ``torch.fx`` records it in a ``call_method``
    node's ``target``, e.g. ``"bernoulli_"``) a source of randomness."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty method name, got {name!r}")
    _METHODS.add(name)


def is_stochastic_method(name: object) -> bool:
    """Whether the tensor method called ``name`` draws random numbers."""
    return isinstance(name, str) and name in _METHODS


def stochastic_methods() -> frozenset[str]:
    """The names of every registered random tensor method."""
    return frozenset(_METHODS)


# Library name (a key of sys.modules) -> the function registering its noise.
_LIBRARIES: dict[str, Callable[[], Iterable[object]]] = {}
# Library name -> the classes and functions its registration covers.
_LIBRARY_KEYS: dict[str, tuple[object, ...]] = {}
_REGISTERING: set[str] = set()


def register_library_noise(library: str, register: Callable[[], Iterable[object]]) -> None:
    """Run ``register()`` at the first registry lookup that finds the Python module
    ``library`` (e.g. ``"timm.layers.drop"``) in ``sys.modules``: a library the user has
    imported gets its noise layers known, one that is installed but not imported costs
    nothing and is never imported by us.

    ``register`` registers the library's entries (with ``replace=False``, so that the user's
    own registrations win) and returns the classes and functions it covers. While all of them
    stay registered the library counts as done; should one disappear (a test restoring the
    registries), the next lookup registers the library again.
    """
    if not isinstance(library, str) or not library:
        raise ValueError(f"library must be a non-empty module name, got {library!r}")
    if not callable(register):
        raise TypeError(f"register must be callable, got {register!r}")
    _LIBRARIES[library] = register
    _LIBRARY_KEYS.pop(library, None)


def _register_imported_libraries() -> None:
    # Runs on every lookup, so it stays a few dict probes; the work happens once per library.
    for library, register in tuple(_LIBRARIES.items()):
        if library in _REGISTERING or library not in sys.modules:
            continue
        keys = _LIBRARY_KEYS.get(library)
        if keys is not None and all(k in _MODULES or k in _FUNCTIONS for k in keys):
            continue
        _REGISTERING.add(library)  # a lookup made by register() itself must not recurse
        try:
            _LIBRARY_KEYS[library] = tuple(register())
        finally:
            _REGISTERING.discard(library)


def _check_spec_fn(spec_fn: object) -> None:
    if spec_fn is not None and not callable(spec_fn):
        raise TypeError(f"spec_fn must be callable or None, got {spec_fn!r}")


def _check_grouping(grouping: object) -> None:
    if isinstance(grouping, str):
        if grouping not in _MASK_GROUPINGS:
            raise ValueError(f"grouping must be one of {_MASK_GROUPINGS}, got {grouping!r}")
    elif not callable(grouping):
        raise TypeError(f"grouping must be a mask grouping name or callable, got {grouping!r}")


def spec_from_call(
    kind: str,
    *,
    strength: str = "p",
    param: str | None = None,
    default: float | None = 0.5,
    training: str = "training",
    training_default: bool = True,
) -> CallSpecFn:
    """A ``spec_fn`` for functions shaped ``f(input, strength, training, ...)``, reading the
    strength (position 1 or keyword ``strength``) and the training flag (position 2 or keyword
    ``training``) whether they were passed by position or by name, so ``F.dropout(x, 0.3,
    True)`` and ``F.dropout(x, p=0.3, training=self.training)`` give the same spec.

    The strength becomes theory's parameter ``param`` (default: the argument's own name). The
    kind and parameter name are checked here, once, so a misconfigured ``spec_fn`` fails at
    registration instead of returning ``None`` forever.

    The spec is that of the call as recorded: a training flag that is literally ``False``
    applies no noise, so its spec has strength 0. ``torch.fx`` records ``self.training`` by
    its value at trace time, so trace in training mode to see the noise. A strength that is
    missing with no ``default``, or is not a number (an ``fx`` node computed in the graph),
    gives ``None``, and so does one theory refuses (``p = 1`` zeroes the signal; values
    out of range make the call itself fail); a training flag that is not a bool is taken
    as on.
    """
    name = strength if param is None else param
    NoiseSpec(kind, {name: 0.0})  # zero strength is valid for every kind: checks the names

    def spec_fn(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> NoiseSpec | None:
        value = _call_argument(args, kwargs, 1, strength, default)
        active = _call_argument(args, kwargs, 2, training, training_default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        try:
            return NoiseSpec(kind, {name: 0.0 if active is False else float(value)})
        except ValueError:  # names were checked above: the value is out of theory's range
            return None

    return spec_fn


def _call_argument(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], position: int, name: str, default: object
) -> object:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def bernoulli_spec(p: float) -> NoiseSpec | None:
    """The spec of (inverted or classic) Bernoulli dropout with drop probability ``p``;
    ``None`` for ``p = 1``, which zeroes the signal: no finite noise variance describes it
    (theory refuses ``p = 1``)."""
    return None if p == 1.0 else NoiseSpec("bernoulli", {"p": p})


def _dropout_module_spec(module: _DropoutNd) -> NoiseSpec | None:
    return bernoulli_spec(module.p)


def _register_torch_builtins() -> None:
    # Element-wise and channel-wise (Dropout1d/2d/3d, feature_dropout) Bernoulli dropout give
    # every unit the same Var[m] = p/(1−p); channel-wise masks only add correlation inside a
    # channel, which the per-unit formula does not depend on but a downstream sum does.
    register_stochastic(nn.Dropout, _dropout_module_spec)
    for cls in (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
        register_stochastic(cls, _dropout_module_spec, grouping="channel")
    # Alpha dropout sets dropped units to SELU's saturation value and re-scales affinely: not a
    # multiplicative noise with E[m] = 1, so theory has no kind for it.
    register_stochastic(nn.AlphaDropout)
    register_stochastic(nn.FeatureAlphaDropout)

    # The aten-level forms take (input, p, train) with no defaults; native_dropout's train may
    # be None, which the spec takes as on.
    aten_spec = spec_from_call("bernoulli", default=None, training="train")
    element_wise: tuple[Callable[..., Any], ...] = (
        torch.dropout,
        torch.dropout_,
        torch.native_dropout,
    )
    for aten in element_wise:
        register_stochastic_function(aten, aten_spec)
    for feature in (torch.feature_dropout, torch.feature_dropout_):
        register_stochastic_function(feature, aten_spec, grouping="channel")
    register_stochastic_function(F.dropout, spec_from_call("bernoulli"))
    for channel_wise in (F.dropout1d, F.dropout2d, F.dropout3d):
        register_stochastic_function(channel_wise, spec_from_call("bernoulli"), grouping="channel")

    functions: list[tuple[tuple[Callable[..., Any], ...], CallSpecFn | None]] = [
        (
            (
                F.alpha_dropout,
                F.feature_alpha_dropout,
                torch.alpha_dropout,
                torch.alpha_dropout_,
                torch.feature_alpha_dropout,
                torch.feature_alpha_dropout_,
            ),
            None,
        ),
        # Random-number sources: how a hand-written dropout appears in a graph. Their spec
        # is None: the call alone does not say how the random tensor meets the signal.
        (
            (
                torch.bernoulli,
                torch.normal,
                torch.poisson,
                torch.rand,
                torch.rand_like,
                torch.randn,
                torch.randn_like,
            ),
            None,
        ),
    ]
    for group, spec_fn in functions:
        for fn in group:
            register_stochastic_function(fn, spec_fn)
    for name in (
        "bernoulli",
        "bernoulli_",
        "cauchy_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "normal_",
        "random_",
        "uniform_",
    ):
        register_stochastic_method(name)


_register_torch_builtins()
