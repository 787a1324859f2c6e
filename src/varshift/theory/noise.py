"""Multiplicative noise kinds: their variance ``σ² = Var[m]`` and, for simulations, a sampler.

Every kind of dropout the toolkit knows multiplies its input by noise ``m`` with ``E[m] = 1``
(inverted scaling), so a single number, ``σ²``, is all the variance-shift formula needs from it
(Li et al., *Understanding the Disharmony between Dropout and Batch Normalization by Variance
Shift*, CVPR 2019):

- ``bernoulli`` (parameter ``p``): ``m = b / (1 − p)`` with ``b ~ Bernoulli(1 − p)``;
  ``σ² = p / (1 − p)``.
- ``gaussian`` (parameter ``p``): ``m ~ N(1, p / (1 − p))``, Gaussian dropout with the same
  variance (Srivastava et al., JMLR 2014, §10); ``σ² = p / (1 − p)``.
- ``uout`` (parameter ``beta``): ``m = 1 + r`` with ``r ~ U(−β, β)`` (Li et al. 2019);
  ``σ² = β² / 3``.

``p`` is the *drop* probability throughout, as in :func:`torch.nn.functional.dropout`.
Other kinds join with :func:`register_noise_kind`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from varshift.theory.checks import DROP_PROBABILITY, UOUT_HALF_WIDTH, check_real

__all__ = [
    "NoiseSampler",
    "NoiseVariance",
    "RESERVED_PARAMETERS",
    "noise_kinds",
    "noise_variance",
    "register_noise_kind",
    "sample_noise",
]

NoiseVariance = Callable[..., float]
"""``fn(**params) -> σ²``: validates its parameters (``ValueError``) and returns ``Var[m]``."""

NoiseSampler = Callable[..., Tensor]
"""``fn(like, generator, **params) -> m``: noise with ``E[m] = 1`` shaped, typed and placed
like the tensor ``like``, drawn from ``generator`` (``None`` for torch's global one)."""

RESERVED_PARAMETERS = frozenset(
    {"kind", "mean", "var", "width", "cos2", "rho", "samples", "seed", "depth", "blocks"}
)
"""Keyword names the theory functions take themselves; a noise parameter may not use them,
or ``variance_shift(kind, mean, var, rho=..., **params)`` could not tell the two apart."""


@dataclass(frozen=True)
class _NoiseKind:
    variance: NoiseVariance
    sampler: NoiseSampler | None
    required: tuple[str, ...]
    optional: tuple[str, ...]
    open_ended: bool  # the variance function takes **kwargs: extra names are its business

    def describe(self) -> str:
        names = [*self.required, *(f"{name} (optional)" for name in self.optional)]
        return ", ".join(names) if names else "no parameters"


_KINDS: dict[str, _NoiseKind] = {}


def _inspect_parameters(
    name: str, fn: NoiseVariance
) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """The required and optional keyword parameters of a variance function."""
    required: list[str] = []
    optional: list[str] = []
    open_ended = False
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
            continue
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise ValueError(
                f"the variance function of noise kind {name!r} must take its parameters by "
                f"keyword; {parameter.name!r} is positional-only"
            )
        if parameter.name in RESERVED_PARAMETERS:
            raise ValueError(
                f"noise kind {name!r} cannot have a parameter called {parameter.name!r}: "
                f"reserved names are {', '.join(sorted(RESERVED_PARAMETERS))}"
            )
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
        else:
            optional.append(parameter.name)
    return tuple(required), tuple(optional), open_ended


def register_noise_kind(
    name: str,
    fn: NoiseVariance,
    *,
    sampler: NoiseSampler | None = None,
    replace: bool = False,
) -> None:
    """Make a new kind of multiplicative noise known to every theory function.

    Args:
        name: the kind's name, as passed to :func:`noise_variance` and friends.
        fn: ``fn(**params) -> σ²``. Its keyword parameters are the kind's parameters (those
            without a default are required); it should raise ``ValueError`` for values out of
            range. Parameter names in :data:`RESERVED_PARAMETERS` are refused.
        sampler: optional ``sampler(like, generator, **params) -> m`` drawing noise with
            ``E[m] = 1`` and ``Var[m] = fn(**params)``; needed only by the Monte Carlo functions.
        replace: allow replacing an existing kind. Registering the very same functions again
            is always allowed (a module imported twice).

    Raises:
        ValueError: empty name, non-callable ``fn``/``sampler``, positional-only or reserved
            parameter names, or an existing name registered to other functions.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(
            f"name must be a non-empty string without surrounding spaces, got {name!r}"
        )
    if not callable(fn):
        raise ValueError(f"fn must be callable (params -> noise variance), got {fn!r}")
    if sampler is not None and not callable(sampler):
        raise ValueError(f"sampler must be callable or None, got {sampler!r}")
    required, optional, open_ended = _inspect_parameters(name, fn)
    entry = _NoiseKind(fn, sampler, required, optional, open_ended)
    existing = _KINDS.get(name)
    if existing is not None and not replace and existing != entry:
        raise ValueError(
            f"noise kind {name!r} is already registered; pass replace=True to replace it"
        )
    _KINDS[name] = entry


def noise_kinds() -> tuple[str, ...]:
    """The names of the known noise kinds, in the order they were registered."""
    return tuple(_KINDS)


def _registered_kind(kind: str, params: dict[str, Any]) -> _NoiseKind:
    """The registered kind, after checking that ``params`` names exactly its parameters."""
    entry = _KINDS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise ValueError(f"unknown noise kind {kind!r}; known kinds: {', '.join(_KINDS)}")
    missing = [name for name in entry.required if name not in params]
    unexpected = [] if entry.open_ended else [
        name for name in params if name not in entry.required + entry.optional
    ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected {', '.join(sorted(unexpected))}")
        raise ValueError(
            f"noise kind {kind!r} takes {entry.describe()}; {' and '.join(problems)}"
        )
    return entry


def noise_variance(kind: str, **params: Any) -> float:
    """``σ² = Var[m]`` of the multiplicative noise ``m`` (``E[m] = 1``) of one kind.

    Args:
        kind: a name from :func:`noise_kinds` (``"bernoulli"``, ``"gaussian"``, ``"uout"``, ...).
        **params: exactly the kind's parameters: ``p`` (drop probability in ``[0, 1)``) for
            Bernoulli and Gaussian dropout, ``beta`` (in ``[0, 1]``) for Uout.

    Returns:
        The (population) variance of ``m`` as a Python float, ``≥ 0``.

    Raises:
        ValueError: unknown kind (the message lists the known ones), missing or unexpected
            parameters, values out of range (``p = 1`` is refused: ``1/(1 − p)`` is infinite).
        TypeError: a parameter that is not a real number (a bool, a string, a tensor).

    >>> noise_variance("bernoulli", p=0.5), noise_variance("uout", beta=0.3)
    (1.0, 0.03)
    """
    entry = _registered_kind(kind, params)
    value = entry.variance(**params)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"the noise variance of kind {kind!r} must be a finite number >= 0, got {value!r} "
            "from its variance function"
        )
    return float(value)


def sample_noise(
    kind: str, like: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """Draw the multiplicative noise ``m`` of one kind, one value per entry of ``like``.

    Args:
        kind: a name from :func:`noise_kinds` whose kind was registered with a sampler.
        like: any tensor ``(N, ...)``; the noise has its shape, dtype and device.
        generator: the torch generator to draw from (``None``: torch's global one).
        **params: the kind's parameters, validated as in :func:`noise_variance`.

    Returns:
        A tensor like ``like`` with ``E[m] = 1`` and ``Var[m] = noise_variance(kind, **params)``.
    """
    noise_variance(kind, **params)  # validates kind and parameters before anything is drawn
    sampler = _KINDS[kind].sampler
    if sampler is None:
        raise ValueError(
            f"noise kind {kind!r} was registered without a sampler; pass sampler= to "
            "register_noise_kind to simulate it"
        )
    return sampler(like, generator, **params)


def _inverted_dropout_variance(p: float) -> float:
    """``σ² = p / (1 − p)`` of inverted dropout (Bernoulli, or Gaussian with the same variance)."""
    p = check_real("p", p, DROP_PROBABILITY)
    return p / (1.0 - p)


def _uout_variance(beta: float) -> float:
    """``σ² = β² / 3``: the variance of ``U(−β, β)`` (Li et al. 2019, Uout)."""
    beta = check_real("beta", beta, UOUT_HALF_WIDTH)
    return beta * beta / 3.0


def _bernoulli_sampler(like: Tensor, generator: torch.Generator | None, *, p: float) -> Tensor:
    keep = 1.0 - p
    return torch.empty_like(like).bernoulli_(keep, generator=generator).div_(keep)


def _gaussian_sampler(like: Tensor, generator: torch.Generator | None, *, p: float) -> Tensor:
    return torch.empty_like(like).normal_(1.0, math.sqrt(p / (1.0 - p)), generator=generator)


def _uout_sampler(like: Tensor, generator: torch.Generator | None, *, beta: float) -> Tensor:
    return torch.empty_like(like).uniform_(1.0 - beta, 1.0 + beta, generator=generator)


register_noise_kind("bernoulli", _inverted_dropout_variance, sampler=_bernoulli_sampler)
register_noise_kind("gaussian", _inverted_dropout_variance, sampler=_gaussian_sampler)
register_noise_kind("uout", _uout_variance, sampler=_uout_sampler)
