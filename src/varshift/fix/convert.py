"""Swap dropout layers for another noise (or none): the architectural remedy of Li et al.
(CVPR 2019, §5) for the variance shift.

The shift at a BatchNorm fed by multiplicative noise ``m`` (``E[m] = 1``, ``Var[m] = σ²``) is
``Δ = v / (v + σ²(c² + v))``: it depends on the noise only through ``σ²``. Hence the targets:

- ``"uout"``: uniform noise ``1 + U(−β, β)``, ``σ² = β²/3``. Li et al. propose it with a small
  ``β`` so that ``σ²`` and the shift are small (``β = 0.1``: ``Δ ≥ 0.9967``). ``β`` is therefore
  *not* matched to the old layer's ``σ²`` (that would reproduce the same shift, and needs
  ``β > 1`` for ``p > 1/4``): it is ``beta`` if given, else :data:`DEFAULT_BETA` ``= 0.1``.
- ``"gaussian"``: Gaussian dropout ``N(1, p/(1−p))`` (Srivastava et al. 2014, §10) with the
  same ``σ²`` (the same ``p`` for Bernoulli dropout): the same regularisation strength and the
  *same* shift; for comparisons, not a fix.
- ``"variance_stable"``: :class:`~varshift.layers.VarianceStableDropout` with the same ``p``:
  Bernoulli noise whose per-feature batch mean and variance are pinned, so the BatchNorm after it
  learns the statistics it meets at test time.
- ``"identity"``: ``nn.Identity``, no noise at all.

All targets are the identity in eval mode, as are the converted layers (torch's inverted
dropout and varshift's Gaussian, Uout and variance-stable dropout), so a trained model computes
the same function in eval mode after conversion; its BatchNorm statistics still carry the old
shift until re-estimated (:func:`varshift.fix.recalibrate_bn`) or re-trained. Targets apply
element-wise noise: a channel-wise ``Dropout2d`` becomes element-wise noise.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from torch import nn

from varshift.diagnose.bn_stats import eager_module
from varshift.diagnose.lint import lint
from varshift.layers import GaussianDropout, Uout, VarianceStableDropout
from varshift.layers.registry import is_stochastic, noise_spec

__all__ = ["DEFAULT_BETA", "convert_dropout"]

DEFAULT_BETA = 0.1

Target = Literal["uout", "gaussian", "variance_stable", "identity"]
_TARGETS: tuple[str, ...] = ("uout", "gaussian", "variance_stable", "identity")
_WHERE: tuple[str, ...] = ("before_bn", "all")

# Noise modules that are the identity in eval mode, so a replacement keeps the eval function.
# Alpha dropout (not a multiplicative noise), ClassicDropout (scales by 1 − p in eval),
# DropBlock and DropConnect (structured noise) are left alone, with a warning.
_CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    GaussianDropout,
    Uout,
    VarianceStableDropout,
)

ModelT = TypeVar("ModelT", bound=nn.Module)


def convert_dropout(
    model: ModelT,
    to: Target,
    *,
    where: Literal["before_bn", "all"] = "before_bn",
    beta: float | None = None,
    example_inputs: Any = None,
) -> ModelT:
    """Return a deep copy of ``model`` with its dropout layers replaced by ``to``; ``model`` is
    not modified.

    Args:
        model: the model to convert. For a ``torch.compile``'d model, the copy is made of the
            module it wraps (``_orig_mod``) and returned as a plain, uncompiled module: compile
            it again if you want to.
        to: ``"uout"``, ``"gaussian"``, ``"variance_stable"`` or ``"identity"`` (see the module
            docstring for the noise each one applies and why).
        where: ``"before_bn"`` converts only the stochastic modules that
            :func:`varshift.diagnose.lint` finds upstream of a BatchNorm with running
            statistics (layers after the last BatchNorm cause no shift and keep their noise);
            ``"all"`` converts every convertible noise module (``nn.Dropout``,
            ``nn.Dropout1d/2d/3d`` and varshift's Gaussian, Uout and variance-stable dropout).
        beta: Uout's ``β`` in ``[0, 1]``, only with ``to="uout"``; default :data:`DEFAULT_BETA`.
        example_inputs: one batch for the model, passed to :func:`~varshift.diagnose.lint` when
            ``torch.fx`` cannot trace it (``where="before_bn"`` only).

    The new layer keeps the old layer's noise variance ``σ²`` (so the same ``p`` for Bernoulli
    or Gaussian dropout; ``p = σ²/(1 + σ²)`` from a Uout), except Uout, whose ``β`` is chosen
    as above. A module shared by several parents is replaced by one shared new module.

    Warns (``UserWarning``) naming what cannot be converted: functional calls
    (``F.dropout(x)`` inside a ``forward``) and stochastic modules outside the list above.

    Raises:
        TypeError: ``model`` is not a module, or is a TorchScript module (pass the original).
        ValueError: unknown ``to`` or ``where``; ``beta`` out of range or given with another
            ``to``; a dropout with ``p = 1`` (no finite noise variance to carry over).
    """
    module = eager_module(model)
    if to not in _TARGETS:
        raise ValueError(f"to must be one of {list(_TARGETS)}, got {to!r}")
    if where not in _WHERE:
        raise ValueError(f"where must be one of {list(_WHERE)}, got {where!r}")
    if beta is not None:
        if to != "uout":
            raise ValueError(f"beta applies only to to='uout', got beta={beta!r} with to={to!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    converted = copy.deepcopy(module)
    if where == "all":
        chosen = [name for name, module in converted.named_modules() if is_stochastic(module)]
        functions: list[str] = []
    else:
        report = lint(converted, example_inputs)
        sources = list(dict.fromkeys(f.source for f in report.findings))
        kinds = {f.source: f.source_type for f in report.findings}
        chosen = [s for s in sources if kinds[s] == "module"]
        functions = [s for s in sources if kinds[s] != "module"]
    modules = {name: converted.get_submodule(name) for name in chosen}
    skipped = [name for name, m in modules.items() if not isinstance(m, _CONVERTIBLE)]
    _warn_unconverted(functions, skipped, modules)
    make = _replacement_maker(to, DEFAULT_BETA if beta is None else float(beta))
    replacements = {
        id(m): make(name, m) for name, m in modules.items() if isinstance(m, _CONVERTIBLE)
    }
    root = replacements.get(id(converted))
    if root is not None:  # the model is itself a dropout layer
        return root  # type: ignore[return-value]
    _swap_modules(converted, replacements)
    return converted  # type: ignore[return-value]  # the module a compiled model wraps


def _warn_unconverted(
    functions: list[str], skipped: list[str], modules: dict[str, nn.Module]
) -> None:
    if functions:
        warnings.warn(
            f"convert_dropout: functional noise calls cannot be converted (change the model's "
            f"forward, or use a module): {functions}",
            stacklevel=3,
        )
    if skipped:
        described = [f"{name} ({type(modules[name]).__name__})" for name in skipped]
        warnings.warn(
            f"convert_dropout: left unchanged, not an eval-identity dropout module: {described}",
            stacklevel=3,
        )


def _noise_p(name: str, module: nn.Module) -> float:
    """The drop probability with the module's noise variance ``σ² = p/(1 − p)``: its own ``p``
    for Bernoulli and Gaussian dropout, ``σ²/(1 + σ²)`` for a Uout (``σ² = β²/3``)."""
    if isinstance(module, Uout):
        spec = noise_spec(module)
        assert spec is not None, "Uout registers its noise"
        variance = spec.variance()
        p = variance / (1.0 + variance)
    else:
        p = float(getattr(module, "p"))  # noqa: B009 (nn.Module's __getattr__ is typed loosely)
    if not 0 <= p < 1:
        raise ValueError(
            f"cannot convert {name} ({type(module).__name__}): p must be in [0, 1) to carry "
            f"its noise variance over, got p={p}"
        )
    return p


def _replacement_maker(to: str, beta: float) -> Callable[[str, nn.Module], nn.Module]:
    def make(name: str, module: nn.Module) -> nn.Module:
        if to == "identity":
            return nn.Identity()
        if to == "uout":
            return Uout(beta)
        if to == "gaussian":
            return GaussianDropout(_noise_p(name, module))
        return VarianceStableDropout(_noise_p(name, module))

    return make


def _swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put each replacement wherever its original sits, under every parent that holds it, and
    carry over the original's train/eval flag."""
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter skips a second name for the same child.
        for child_name, child in list(parent._modules.items()):
            new = replacements.get(id(child)) if child is not None else None
            if new is not None and child is not None:
                new.train(child.training)
                setattr(parent, child_name, new)
