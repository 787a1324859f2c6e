"""DropBlock: dropout of contiguous square regions of a feature map, with a linear schedule for
its drop probability.

Ghiasi, Lin, Le. *DropBlock: A regularization method for convolutional networks*. NeurIPS 2018
(arXiv 1810.12890).

Two departures from the paper's Algorithm 1, both so that the layer is an exact multiplicative
noise in the sense of :mod:`varshift.theory` (``E[m] = 1``, ``Var[m] = p / (1 − p)`` at every
unit):

* **Geometry.** The paper samples block centres only where a whole block fits, so units near
  the border are dropped less often than ``p``. Here seeds are sampled on a grid padded by
  ``block_size − 1`` on the top and left, so blocks may hang over the border and *every* unit,
  corners included, is covered by exactly ``block_size²`` candidate seeds. With seed rate
  ``γ = 1 − (1 − p)^(1 / block_size²)`` each unit is kept with probability
  ``(1 − γ)^(block_size²) = 1 − p``, exactly. Even block sizes need no special case.
* **Scaling.** Kept units are multiplied by the constant ``1 / (1 − p)``, not by the realised
  fraction of kept units (timm, torchvision). The constant makes ``E[output] = input`` exactly
  and per unit; dividing by a random count makes the scale depend on the other units of the
  batch, biases the mean slightly and changes the noise variance in a way no closed form gives.

Registry: :class:`DropBlock2d` and :func:`drop_block_2d` are registered as
``NoiseSpec("bernoulli", {"p": p})``. Per unit that is exact (previous two points); what the spec
leaves out is the spatial correlation of the mask, which enters the shift at a downstream BN
only through the ``ρ`` term of a following convolution (see ``docs/layers.md``).

Tracing: :func:`drop_block_2d` is wrapped with :func:`torch.fx.wrap`, so
:func:`torch.fx.symbolic_trace` records it as one call (``training`` frozen at trace time);
:func:`torch.compile` captures it whole (``fullgraph=True``); :func:`torch.jit.script` is not
supported (TorchScript refuses keyword-only arguments with defaults).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varshift.layers.registry import (
    NoiseSpec,
    bernoulli_spec,
    register_stochastic,
    register_stochastic_function,
    spec_from_call,
)
from varshift.theory.checks import (
    DROP_PROBABILITY,
    check_bool,
    check_floating,
    check_int,
    check_real,
)

__all__ = ["DropBlock2d", "DropBlockScheduler", "drop_block_2d", "drop_block_schedule"]


def _seed_rate(p: float, block_size: int) -> float:
    """Per-seed Bernoulli rate ``γ`` with ``(1 − γ)^(block_size²) = 1 − p``."""
    # expm1/log1p keep γ accurate when p is tiny and block_size large (γ ≈ p / block_size²).
    return -math.expm1(math.log1p(-p) / block_size**2)


def _expand_seeds(seeds: Tensor, block_size: int) -> Tensor:
    """Turn a seed grid ``Tensor[N, C, H + b − 1, W + b − 1]`` (``b = block_size``) into the drop
    mask ``Tensor[N, C, H, W]`` (1 = dropped).

    The seed at padded position ``(i, j)`` drops the square whose bottom-right corner is unit
    ``(i, j)`` of the padded grid, i.e. rows ``i − b + 1 … i`` of the feature map. A max-pool
    with a ``b × b`` window and stride 1 over the padded grid is exactly "is any of the ``b²``
    seeds whose square covers this unit set".
    """
    return F.max_pool2d(seeds, kernel_size=block_size, stride=1)


def drop_block_2d(
    x: Tensor,
    p: float = 0.1,
    block_size: int = 7,
    training: bool = True,
    *,
    shared_channels: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropBlock (Ghiasi, Lin, Le, NeurIPS 2018): zero random ``block_size × block_size``
    squares of each feature map and scale the rest by ``1 / (1 − p)``.

    Every unit, including those at the border and in the corners, is dropped with probability
    exactly ``p`` (see the module docstring for the construction), so per unit the noise is
    inverted Bernoulli dropout: ``E[output] = x`` and ``Var[m] = p / (1 − p)``. What differs from
    dropout is the correlation: units within ``block_size − 1`` of each other tend to be dropped
    together. Blocks larger than the feature map are allowed and clipped by the border like any
    other block; as ``block_size`` grows past ``max(H, W)`` more and more blocks cover the whole
    map and the noise tends to channel-wise dropout (``nn.Dropout2d``).

    Args:
        x: ``Tensor[N, C, H, W]``.
        p: probability that a unit is dropped, in ``[0, 1)``.
        block_size: side of the dropped squares, an int ``>= 1`` (1 is ordinary dropout).
            Even sizes are exact too.
        training: apply the noise if ``True``; return ``x`` unchanged otherwise.
        shared_channels: one mask per example shared by all channels if ``True``; by default
            each channel has its own mask, the variant of the paper's Algorithm 1, which the
            authors report works better.
        generator: optional random generator for the seeds.

    Returns:
        ``Tensor[N, C, H, W]``, same dtype and device as ``x``; ``x`` itself when ``training`` is
        ``False``, ``p == 0`` or ``x`` is empty.

    Raises:
        ValueError: ``p`` or ``block_size`` out of range, ``x`` not 4-D.
        TypeError: ``p`` not a real number, ``block_size`` not an integer, ``shared_channels``
            not a bool, ``x`` not a floating-point tensor.
    """
    p = check_real("p", p, DROP_PROBABILITY)
    block_size = check_int("block_size", block_size, low=1)
    check_bool("shared_channels", shared_channels)
    check_floating("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D Tensor[N, C, H, W], got shape {tuple(x.shape)}")
    if not training or p == 0.0 or x.numel() == 0:  # an empty map has nothing to drop
        return x
    n, c, h, w = x.shape
    seed_shape = (n, 1 if shared_channels else c, h + block_size - 1, w + block_size - 1)
    # new_empty: same device and dtype as x; the padded grid is larger than x, so empty_like
    # cannot give its shape.
    seeds = x.new_empty(seed_shape).bernoulli_(_seed_rate(p, block_size), generator=generator)
    keep = 1.0 - _expand_seeds(seeds, block_size)
    return x * keep * (1.0 / (1.0 - p))


torch.fx.wrap("drop_block_2d")


def drop_block_schedule(
    step: int, *, start_p: float = 0.0, end_p: float, total_steps: int
) -> float:
    """Drop probability at ``step`` of DropBlock's linear ramp (Ghiasi et al., §3: "scheduled
    DropBlock" raises the drop rate linearly from 0 during training).

    ``p(step) = start_p + (end_p − start_p) · min(step, total_steps) / total_steps``: ``start_p``
    at step 0, ``end_p`` from ``total_steps`` on (clamped, never extrapolated).

    Args:
        step: number of completed steps, an int ``>= 0``.
        start_p: drop probability at step 0, in ``[0, 1)``.
        end_p: drop probability from ``total_steps`` on, in ``[0, 1)``.
        total_steps: length of the ramp, an int ``>= 1``.
    """
    step = check_int("step", step, low=0)
    start_p = check_real("start_p", start_p, DROP_PROBABILITY)
    end_p = check_real("end_p", end_p, DROP_PROBABILITY)
    total_steps = check_int("total_steps", total_steps, low=1)
    fraction = min(step, total_steps) / total_steps
    return float(start_p + (end_p - start_p) * fraction)


class DropBlock2d(nn.Module):
    """Module form of :func:`drop_block_2d`: ``Tensor[N, C, H, W] → Tensor[N, C, H, W]``.

    ``p`` is a plain attribute so that :class:`DropBlockScheduler` can change it between steps;
    it is validated at construction and again at every forward.
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, *, shared_channels: bool = False):
        super().__init__()
        self.p = check_real("p", p, DROP_PROBABILITY)
        self.block_size = check_int("block_size", block_size, low=1)
        self.shared_channels = check_bool("shared_channels", shared_channels)

    def forward(self, x: Tensor) -> Tensor:
        return drop_block_2d(
            x, self.p, self.block_size, self.training, shared_channels=self.shared_channels
        )

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}, shared_channels={self.shared_channels}"


class DropBlockScheduler:
    """Ramp the ``p`` of every :class:`DropBlock2d` linearly, as :func:`drop_block_schedule`.

    Construction sets ``p = start_p`` (the value at step 0); each :meth:`step` advances the
    counter by one and sets the value for the new step. The counter and the ramp settings live in
    :meth:`state_dict`, so a run resumed from a checkpoint continues the ramp where it stopped.
    Call :meth:`step` once per training step (or per epoch, with ``total_steps`` in epochs).

    Args:
        modules_or_model: a model, whose :class:`DropBlock2d` submodules are all scheduled, or an
            iterable of :class:`DropBlock2d`.
        start_p, end_p, total_steps: as in :func:`drop_block_schedule`.

    Raises:
        ValueError: if no :class:`DropBlock2d` is found, or for a bad ramp setting.
        TypeError: if the iterable holds something other than :class:`DropBlock2d`.
    """

    def __init__(
        self,
        modules_or_model: nn.Module | Iterable[DropBlock2d],
        *,
        start_p: float = 0.0,
        end_p: float,
        total_steps: int,
    ) -> None:
        # Validates all three settings before anything is touched.
        drop_block_schedule(0, start_p=start_p, end_p=end_p, total_steps=total_steps)
        if isinstance(modules_or_model, nn.Module):
            blocks = [m for m in modules_or_model.modules() if isinstance(m, DropBlock2d)]
        else:
            blocks = list(modules_or_model)
            for item in blocks:
                if not isinstance(item, DropBlock2d):
                    raise TypeError(
                        f"modules_or_model must hold only DropBlock2d, got {type(item).__name__}"
                    )
        if not blocks:
            raise ValueError(
                "modules_or_model must contain at least one DropBlock2d to schedule, got none"
            )
        self.modules: list[DropBlock2d] = blocks
        self.start_p = float(start_p)
        self.end_p = float(end_p)
        self.total_steps = total_steps
        self.last_step = 0
        self._set_p_on_modules()

    @property
    def p(self) -> float:
        """Drop probability of the current step."""
        return drop_block_schedule(
            self.last_step, start_p=self.start_p, end_p=self.end_p, total_steps=self.total_steps
        )

    def _set_p_on_modules(self) -> None:
        p = self.p
        for module in self.modules:
            module.p = p

    def step(self) -> None:
        """Advance one step and set the new ``p`` on every scheduled module."""
        self.last_step += 1
        self._set_p_on_modules()

    def state_dict(self) -> dict[str, Any]:
        """Step counter and ramp settings (the modules are not part of the state)."""
        return {
            "last_step": self.last_step,
            "start_p": self.start_p,
            "end_p": self.end_p,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` and set the ``p`` of its step on every module."""
        missing = {"last_step", "start_p", "end_p", "total_steps"} - set(state_dict)
        if missing:
            raise ValueError(
                f"state_dict must hold last_step, start_p, end_p and total_steps, got it missing "
                f"keys {sorted(missing)}"
            )
        # Validate the whole state before changing anything, so a bad one leaves self intact.
        drop_block_schedule(
            state_dict["last_step"],
            start_p=state_dict["start_p"],
            end_p=state_dict["end_p"],
            total_steps=state_dict["total_steps"],
        )
        self.last_step = int(state_dict["last_step"])
        self.start_p = float(state_dict["start_p"])
        self.end_p = float(state_dict["end_p"])
        self.total_steps = int(state_dict["total_steps"])
        self._set_p_on_modules()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start_p={self.start_p}, end_p={self.end_p}, "
            f"total_steps={self.total_steps}, last_step={self.last_step}, "
            f"modules={len(self.modules)})"
        )


_BERNOULLI_CALL = spec_from_call("bernoulli")
_DROP_BLOCK_SIGNATURE = inspect.signature(drop_block_2d)


def _drop_block_call_spec(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> NoiseSpec | None:
    # drop_block_2d's training flag is its 4th argument, not the 3rd that spec_from_call reads
    # by position, so bind the call to the signature first and pass both by name.
    bound = _DROP_BLOCK_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return _BERNOULLI_CALL((), {"p": bound.arguments["p"], "training": bound.arguments["training"]})


def _drop_block_module_spec(module: nn.Module) -> NoiseSpec | None:
    assert isinstance(module, DropBlock2d)
    return bernoulli_spec(module.p)


register_stochastic(DropBlock2d, _drop_block_module_spec)
register_stochastic_function(drop_block_2d, _drop_block_call_spec)
