"""The noise layers of torchvision and timm, known to the registry once the user imports them.

Registered on demand (:func:`varshift.layers.registry.register_library_noise`): at the first
registry lookup after ``torchvision.ops.stochastic_depth`` or ``timm.layers.drop`` is in
``sys.modules``. varshift never imports either library, so having them installed costs nothing.
Entries are registered with ``replace=False``: a user's own registration of one of these
classes or functions wins.

==========================================  ==============================  ==================
module / function                           spec (``Var[m]``)               mask grouping
==========================================  ==============================  ==================
``torchvision.ops.StochasticDepth``,        ``bernoulli``, ``p``            ``"sample"``
``torchvision.ops.stochastic_depth``        (``p/(1−p)``)                   (``mode="row"``),
                                                                            ``"structured"``
                                                                            (``mode="batch"``)
``timm.layers.DropPath``, ``drop_path``     ``bernoulli``, ``drop_prob``;   ``"sample"``
                                            ``None`` if not
                                            ``scale_by_keep``
``timm.layers.DropBlock2d``,                ``bernoulli``,                  ``"structured"``
``drop_block_2d``                           ``gamma_scale·drop_prob``;
                                            ``None`` with ``with_noise`` or
                                            without ``scale_by_keep``
==========================================  ==============================  ==================

Why each one reads as it does:

* Stochastic depth (Huang et al., ECCV 2016) and DropPath keep or drop a whole residual branch
  per sample and rescale the kept ones by ``1/(1−p)``: per element, inverted Bernoulli dropout.
  torchvision's ``mode="batch"`` draws one mask for the whole batch: the same per-element
  variance, but no per-sample grouping describes it, so lint estimates it by Monte Carlo.
* timm's ``scale_by_keep=False`` leaves the kept branch unscaled: ``E[m] = 1 − p ≠ 1``, not a
  multiplicative noise that theory models (stochastic, spec ``None``), like alpha dropout.
* timm's DropBlock (Ghiasi et al., NeurIPS 2018) aims to drop a fraction ``gamma_scale·
  drop_prob`` of the units in blocks and rescales by the realised kept fraction, so ``E[m] ≈ 1``
  and the spec is Bernoulli at that fraction, per unit an approximation (border units are
  dropped less often): lint predicts its shift by Monte Carlo on the real layer anyway.
  ``with_noise=True`` adds Gaussian noise in the dropped blocks instead of zeros, which is not
  multiplicative (spec ``None``). timm < 1.0.23's ``fast``/``batchwise`` variants are consumed
  as deprecated arguments since; ``drop_block_fast_2d`` is registered where it still exists.
* A rate of 0 is the identity in every variant: its spec is Bernoulli with ``p = 0``, which
  lint does not report.

The functions are read from the call as recorded (``torch.fx`` keeps ``stochastic_depth`` as
one call; timm's ``drop_path`` is kept whole by lint's tracer), bound to the library's own
signature, so arguments by position or by name give the same spec.
"""

from __future__ import annotations

import inspect
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from varshift.layers.registry import (
    CallSpecFn,
    MaskGrouping,
    NoiseSpec,
    bernoulli_spec,
    register_library_noise,
    register_stochastic,
    register_stochastic_function,
)

__all__ = ["TIMM_DROP", "TORCHVISION_STOCHASTIC_DEPTH"]

TORCHVISION_STOCHASTIC_DEPTH = "torchvision.ops.stochastic_depth"
"""The Python module whose import makes torchvision's stochastic depth known to the registry."""

TIMM_DROP = "timm.layers.drop"
"""The Python module whose import makes timm's DropPath and DropBlock known to the registry."""


def _bernoulli_noise(rate: object, *, multiplicative: bool = True) -> NoiseSpec | None:
    """Bernoulli dropout at drop probability ``rate``: ``p = 0`` for a rate of 0 (the identity
    in every variant), ``None`` for a rate that is not a number (an fx node), out of theory's
    range, or for a variant that is not a multiplicative noise with ``E[m] = 1``."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        return None
    if rate == 0:
        return NoiseSpec("bernoulli", {"p": 0.0})
    if not multiplicative:
        return None
    try:
        return bernoulli_spec(float(rate))
    except ValueError:  # a rate out of [0, 1]: the layer itself refuses or misbehaves
        return None


def _stochastic_depth_noise(p: object) -> NoiseSpec | None:
    return _bernoulli_noise(p)


def _stochastic_depth_grouping(mode: object) -> MaskGrouping:
    # "row": one mask per sample; "batch": one mask for the whole batch, no grouping of ours.
    return "sample" if mode == "row" else "structured"


def _drop_path_noise(drop_prob: object, scale_by_keep: object) -> NoiseSpec | None:
    return _bernoulli_noise(drop_prob, multiplicative=scale_by_keep is not False)


def _drop_block_noise(
    drop_prob: object, gamma_scale: object, with_noise: object, scale_by_keep: object
) -> NoiseSpec | None:
    if not all(isinstance(v, numbers.Real) for v in (drop_prob, gamma_scale)):
        return None
    rate = float(gamma_scale) * float(drop_prob)  # type: ignore[arg-type]  # checked just above
    multiplicative = with_noise is not True and scale_by_keep is not False
    return _bernoulli_noise(rate, multiplicative=multiplicative)


def _call_reader(
    fn: Callable[..., Any], read: Callable[[Mapping[str, Any]], NoiseSpec | None]
) -> CallSpecFn:
    """A ``spec_fn`` that binds a call to ``fn``'s signature (defaults applied) and passes the
    arguments by name to ``read``; a ``training`` argument that is literally ``False`` applies
    no noise (spec with ``p = 0``), as in :func:`~varshift.layers.registry.spec_from_call`."""
    signature = inspect.signature(fn)

    def spec_fn(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> NoiseSpec | None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments.get("training") is False:
            return NoiseSpec("bernoulli", {"p": 0.0})
        return read(bound.arguments)

    return spec_fn


def _register_torchvision() -> tuple[object, ...]:
    library = sys.modules[TORCHVISION_STOCHASTIC_DEPTH]
    stochastic_depth = library.stochastic_depth
    signature = inspect.signature(stochastic_depth)

    def call_grouping(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> MaskGrouping:
        bound = signature.bind_partial(*args, **kwargs)
        return _stochastic_depth_grouping(bound.arguments.get("mode"))

    register_stochastic(
        library.StochasticDepth,
        lambda module: _stochastic_depth_noise(module.p),
        grouping=lambda module: _stochastic_depth_grouping(module.mode),
        replace=False,
    )
    register_stochastic_function(
        stochastic_depth,
        _call_reader(stochastic_depth, lambda a: _stochastic_depth_noise(a["p"])),
        grouping=call_grouping,
        replace=False,
    )
    return library.StochasticDepth, stochastic_depth


def _register_timm() -> list[object]:
    library = sys.modules[TIMM_DROP]
    keys: list[object] = [library.DropPath, library.drop_path, library.DropBlock2d]
    register_stochastic(
        library.DropPath,
        lambda module: _drop_path_noise(module.drop_prob, module.scale_by_keep),
        grouping="sample",
        replace=False,
    )
    register_stochastic_function(
        library.drop_path,
        _call_reader(
            library.drop_path, lambda a: _drop_path_noise(a["drop_prob"], a["scale_by_keep"])
        ),
        grouping="sample",
        replace=False,
    )
    register_stochastic(
        library.DropBlock2d, _drop_block_module_noise, grouping="structured", replace=False
    )
    for name in ("drop_block_2d", "drop_block_fast_2d"):  # the fast one: timm < 1.0.23
        fn = getattr(library, name, None)
        if fn is not None:
            keys.append(fn)
            register_stochastic_function(
                fn,
                _call_reader(fn, _drop_block_call_noise),
                grouping="structured",
                replace=False,
            )
    return keys


def _drop_block_module_noise(module: nn.Module) -> NoiseSpec | None:
    return _drop_block_noise(
        getattr(module, "drop_prob", None),
        getattr(module, "gamma_scale", 1.0),
        getattr(module, "with_noise", False),
        getattr(module, "scale_by_keep", True),
    )


def _drop_block_call_noise(arguments: Mapping[str, Any]) -> NoiseSpec | None:
    return _drop_block_noise(
        arguments.get("drop_prob"),
        arguments.get("gamma_scale", 1.0),
        arguments.get("with_noise", False),
        arguments.get("scale_by_keep", True),
    )


register_library_noise(TORCHVISION_STOCHASTIC_DEPTH, _register_torchvision)
register_library_noise(TIMM_DROP, _register_timm)
