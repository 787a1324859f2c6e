"""Multiplicative-noise layers for studying (and avoiding) the dropout/BatchNorm variance shift.

Papers:

* Li, Chen, Hu, Yang. *Understanding the Disharmony between Dropout and Batch Normalization
  by Variance Shift.* CVPR 2019 (arXiv 1801.05134) — the shift, and Uout.
* Srivastava et al. *Dropout.* JMLR 2014 — Bernoulli dropout (test-time scaling, §1) and
  Gaussian dropout (§10).

Multiplying a unit ``x`` (mean ``c``, variance ``v``) by noise ``m`` with ``E[m] = 1`` in
training keeps its mean and grows its variance to ``v + σ²(c² + v)`` with ``σ² = Var[m]``; a
BatchNorm downstream learns that inflated variance and sees only ``v`` at test time
(``Δ = v / (v + σ²(c² + v))``). :func:`gaussian_dropout` and :func:`uout` are such noises,
:func:`classic_dropout` is Bernoulli dropout without the inverted scaling (same ``Δ``), and
:func:`variance_stable_dropout` is Bernoulli dropout that removes the per-feature shift. ``p``
is always the *drop* probability; the keep ratio ``q = 1 − p`` of the papers appears only in
these docs.

Each idea is a function, then a module that holds the hyper-parameters and calls it with its
``training`` flag. The functions accept any shape; where a layer needs a feature axis
(:func:`variance_stable_dropout`) it is dim 1 of ``(N, C, *)``, as in BatchNorm. In eval mode
(``training=False``) and at zero strength every function returns its input tensor itself —
except :func:`classic_dropout`, whose documented test-time rule is to scale by ``q``.

Arguments go through :mod:`varshift.theory.checks` in the constructor and again at every call,
before any early return: ``TypeError`` for a rate that is not a Python or NumPy real number
(bools and tensors, even 0-d, included) and for a non-floating input ``x``; ``ValueError``,
naming the argument, its range and the value, for a rate out of range or not finite.

The functions are ``torch.fx`` leaves (``torch.fx.wrap``): a traced model shows one
``call_function`` node per layer, which :mod:`varshift.layers.registry` recognises.

Speed on CPU. :func:`gaussian_dropout` and :func:`uout` are memory-bound: the noise-free floor
(``x * 1.0`` forward and backward) allocates, writes and reads two full tensors, and a fresh
allocation of a large tensor costs page faults that weigh as much as the arithmetic. When
autograd records the call (eager mode, CPU, ``x.requires_grad``) on a large input (at least 2²⁰
elements; below that its Python overhead outweighs the saving), the layer runs as one
autograd node that draws the noise exactly as the reference expression
``x * torch.empty_like(x).uniform_(…)`` does (same generator calls, so the same numbers under
``torch.manual_seed``) and computes the input gradient ``m·dy`` in the noise's own buffer instead
of a new one. A second backward through the same graph (``retain_graph=True``) re-draws the
noise from the generator state saved in the forward, so it sees the same ``m``. Under
``torch.compile``, ``torch.jit.trace``, ``torch.func`` transforms, ``torch.no_grad`` and on
other devices the reference expression runs as it is. :func:`classic_dropout` takes the same
path with its 0/1 mask, and :func:`variance_stable_dropout` builds its input gradient in its
mask's buffer the same way. What remains above the floor is mostly torch's CPU random-number
generator (a serial Mersenne Twister), whose fill alone costs about as much as the floor; see
``benchmarks/bench_layers.py`` and docs/layers.md ("Performance").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx
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
    UOUT_HALF_WIDTH,
    Interval,
    check_floating,
    check_real,
)

__all__ = [
    "ClassicDropout",
    "GaussianDropout",
    "Uout",
    "VarianceStableDropout",
    "classic_dropout",
    "gaussian_dropout",
    "uout",
    "variance_stable_dropout",
]


_CLASSIC_DROP_PROBABILITY = Interval(
    0.0, 1.0, why="the drop probability; p = 1 zeroes the signal in both modes"
)
_VARIANCE_STABLE_P = Interval(
    0.0, 1.0, high_open=True, why="the drop probability; p = 1 leaves no signal to rescale"
)
_VARIANCE_STABLE_EPS = Interval(
    0.0, 1.0, low_open=True, why="a small constant added to both variances, as in BatchNorm"
)


_Draw = Callable[[Tensor, "torch.Generator | None"], Tensor]
"""Fills its first argument in place with noise from the generator (the default one for
``None``) and returns it."""


def _keep_draw(q: float) -> _Draw:
    """Fills with a 0/1 mask, ``P(1) = q``.

    ``uniform_ < q`` instead of ``bernoulli_(q)``: the same distribution (up to the grid of
    the dtype's uniforms, ``2⁻²⁴`` for float32), several times faster on CPU, where torch's
    ``bernoulli_(q)`` is the bottleneck of ``nn.Dropout``."""
    return lambda buffer, generator: buffer.uniform_(generator=generator).lt_(q)


class _NoiseProduct(torch.autograd.Function):
    """``y = x·m`` for noise ``m = draw(empty_like(x))``, with ``dx = m·dy`` computed in ``m``'s
    own buffer: one full-size allocation fewer than autograd's ``x * m``, which matters on CPU
    where a fresh large tensor costs page faults (see the module docstring, "Speed on CPU").

    ``m`` is drawn exactly as the reference expression draws it (same generator, same calls),
    so the output and gradient are bitwise those of ``x * draw(empty_like(x), None)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, draw: _Draw) -> Tensor:
        # The state before the draw; only the CPU generator's, hence CPU-only (_takes_fast_path).
        ctx.reusable_noise = _ReusableNoise(draw, torch.get_rng_state())
        noise = draw(torch.empty_like(x), None)
        ctx.save_for_backward(noise)
        return x * noise

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (noise,) = ctx.saved_tensors
        return ctx.reusable_noise.times(noise, grad), None


class _ReusableNoise:
    """A saved noise buffer that a backward may overwrite with its gradient ``m·dy`` (saving a
    full-size allocation), and the means to draw the same ``m`` again for any later backward
    through a retained graph: the drawing function and the CPU generator state from before the
    draw.

    With ``create_graph`` the product is computed out of place, as a differentiable ``dy·m``;
    the graph it records keeps the buffer, so from then on the buffer is never overwritten."""

    def __init__(self, draw: _Draw, rng_state: Tensor) -> None:
        self.draw = draw
        self.rng_state = rng_state
        self.consumed = False  # the buffer holds an earlier backward's gradient
        self.shared = False  # a graph recorded with create_graph reads the buffer

    def times(self, noise: Tensor, grad: Tensor) -> Tensor:
        """``noise·grad`` for the saved ``noise`` buffer."""
        if self.consumed:
            noise = _redraw(self.draw, self.rng_state, noise)  # a fresh buffer, ours alone
        elif torch.is_grad_enabled():
            self.shared = True
        if torch.is_grad_enabled() or self.shared:
            return grad * noise
        self.consumed = True
        # `.data`: writing through it does not bump the saved tensor's version, which would
        # make a retained graph refuse to unpack it; `consumed` tells the next call.
        return noise.data.mul_(grad)


def _redraw(draw: _Draw, rng_state: Tensor, like: Tensor) -> Tensor:
    """The noise ``draw`` gave from the CPU generator state ``rng_state``, laid out as ``like``
    (the element order of a fill follows the memory layout)."""
    generator = torch.Generator()
    generator.set_state(rng_state)
    buffer = torch.empty_strided(like.size(), like.stride(), dtype=like.dtype, device=like.device)
    return draw(buffer, generator)


_FAST_PATH_MIN_NUMEL = 1 << 20
"""Smallest input (elements) for the fast path (:class:`_NoiseProduct`, and the reused mask
of :func:`variance_stable_dropout`). The Python overhead of :class:`_NoiseProduct` (about
25 µs forward and backward) outweighs the allocation it saves below a few hundred thousand
elements, where small tensors come from the allocator's cache; from 2²⁰ elements (4 MiB in
float32) on, fresh pages make the saved allocation worth more (measured on CPU, one thread)."""


def _takes_fast_path(x: Tensor) -> bool:
    """Whether ``x`` is large and eager autograd records an op on it on CPU: where
    :class:`_NoiseProduct` pays.

    Tracers, compilers and ``torch.func`` transforms get the plain expression:
    ``torch.compile`` fuses it itself, and ``torch.jit.trace`` should record ordinary ops."""
    return (
        x.numel() >= _FAST_PATH_MIN_NUMEL
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()  # torch.jit.is_tracing, which is untyped
        # torch.func (grad, vmap) needs a setup_context-style Function: plain ops there.
        and not torch._C._are_functorch_transforms_active()
    )


def _multiply_by_noise(x: Tensor, draw: _Draw) -> Tensor:
    """``x * draw(empty_like(x), None)``, through :class:`_NoiseProduct` where it is faster."""
    if _takes_fast_path(x):
        # torch types Function.apply as untyped; _NoiseProduct.forward returns a Tensor.
        product: Tensor = _NoiseProduct.apply(x, draw)  # type: ignore[no-untyped-call, unused-ignore]
        return product
    return x * draw(torch.empty_like(x), None)


class _DropWithMoments(torch.autograd.Function):
    """``(x·mask, mean(x), var(x))`` for ``x: Tensor[N, C, L]``, the moments per feature (over
    dims 0 and 2, biased variance), differentiable in ``x``; for
    :func:`variance_stable_dropout`.

    One node instead of autograd's three (masking, mean, variance) for speed on CPU, where
    the layer is memory-bound: the moments come from BatchNorm's statistics kernel
    (``torch.batch_norm_update_stats``, two passes without temporaries, stable when
    ``|mean| ≫ std``; ``torch.var_mean`` over (0, 2) is several times slower), and the whole
    input gradient ``dx = mask·d_dropped + (d_mean + 2·d_var·(x − mean))/n`` is built in one
    full-size buffer (autograd would allocate one per term and sum them): the mask's own, where
    ``reusable`` (given on the noise layers' fast path) can draw the mask again for a later
    backward through a retained graph.
    """

    @staticmethod
    def forward(
        ctx: Any, flat: Tensor, mask: Tensor, reusable: _ReusableNoise | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        # No running statistics are passed, so none are updated and momentum is unused.
        mean, var = torch.batch_norm_update_stats(flat, None, None, 0.0)
        ctx.save_for_backward(flat, mask, mean)
        ctx.reusable_mask = reusable
        return flat * mask, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_dropped: Tensor | None, grad_mean: Tensor | None, grad_var: Tensor | None
    ) -> tuple[Tensor, None, None]:
        flat, mask, mean = ctx.saved_tensors
        n = flat.shape[0] * flat.shape[2]
        zeros = torch.zeros_like(mean)
        slope = zeros if grad_var is None else 2.0 * grad_var / n
        offset = (zeros if grad_mean is None else grad_mean / n) - slope * mean
        # Full-size operands first, per-feature broadcasts in place after: measured faster
        # on CPU than addcmul with a broadcast `self`.
        reusable: _ReusableNoise | None = ctx.reusable_mask
        if grad_dropped is None:
            grad = torch.zeros_like(flat)
        elif reusable is None:
            grad = grad_dropped * mask
        else:  # the mask's buffer becomes the gradient (see _ReusableNoise)
            grad = reusable.times(mask, grad_dropped)
        return grad.addcmul_(flat, slope[:, None]).add_(offset[:, None]), None, None


class _DenseGradient(torch.autograd.Function):
    """The identity, whose backward hands on a dense copy of an *expanded* gradient.

    ``out.sum().backward()`` sends a stride-0 gradient of ones, and ``native_batch_norm_backward``
    on CPU reads it far more slowly than a dense one when there is one position per feature
    (the ``(N, C, 1)`` layout of a 2-D input; measured on 4096×1024 float32: 186 ms instead of
    19 ms), much more than one ``contiguous()`` copy costs. With a spatial extent it makes no
    difference. A dense gradient is passed on as it is."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def gaussian_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Gaussian dropout (Srivastava et al. 2014, §10): ``y = x·m``, ``m ~ N(1, p/(1−p))``.

    ``σ² = Var[m] = p/(1−p) = (1−q)/q`` matches inverted Bernoulli dropout of drop rate ``p``,
    so the train-time variance and the variance shift are the same:
    ``Var_train = v + σ²(c² + v)`` (Keras' ``GaussianDropout(rate)`` convention).

    Args:
        x: ``Tensor[*]``, any shape; noise is drawn independently per element.
        p: drop probability in ``[0, 1)``; ``p = 1`` would need infinite noise variance.
        training: apply noise when ``True``; otherwise return ``x`` itself.

    Returns:
        ``Tensor[*]`` shaped like ``x``.
    """
    p = check_real("p", p, DROP_PROBABILITY)
    check_floating("x", x)
    if not training or p == 0.0:
        return x
    std = math.sqrt(p / (1.0 - p))
    return _multiply_by_noise(x, lambda buffer, gen: buffer.normal_(1.0, std, generator=gen))


def uout(x: Tensor, beta: float = 0.1, training: bool = True) -> Tensor:
    """Uout (Li et al. 2019, §6): ``y = x·(1 + r)``, ``r ~ U(−β, β)``.

    ``Var[m] = β²/3``, far below dropout's ``p/(1−p)`` at usual rates, so the shift is small:
    for ``c = 0``, ``Δ = 3/(3 + β²)`` (β = 0.1 → 0.9967).

    Args:
        x: ``Tensor[*]``, any shape; noise is drawn independently per element.
        beta: half-width of the uniform noise, in ``[0, 1]`` (so ``m ≥ 0``: no sign flips).
        training: apply noise when ``True``; otherwise return ``x`` itself.

    Returns:
        ``Tensor[*]`` shaped like ``x``.
    """
    beta = check_real("beta", beta, UOUT_HALF_WIDTH)
    check_floating("x", x)
    if not training or beta == 0.0:
        return x
    low, high = 1.0 - beta, 1.0 + beta
    return _multiply_by_noise(x, lambda buffer, gen: buffer.uniform_(low, high, generator=gen))


def classic_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """The original, *non-inverted* dropout (Srivastava et al. 2014, §1): ``y = x·b`` in
    training with ``b ~ Bernoulli(q)``, and ``y = q·x`` at test time.

    Not the identity in eval mode, by design (the one exception in varshift): the test-time
    output is scaled by the keep ratio ``q = 1 − p`` so that it matches the training mean
    ``E[x·b] = q·c``. Its variance shift is *identical* to inverted dropout's, because ``Δ``
    is a ratio and both variances carry the same ``q²``:
    ``Var_test / Var_train = q²v / (q(c² + v) − q²c²) = v / ((c² + v)/q − c²)``.

    Args:
        x: ``Tensor[*]``, any shape; one Bernoulli draw per element.
        p: drop probability in ``[0, 1]`` (``p = 1`` zeroes the signal in both modes).
        training: drop without rescaling when ``True``; otherwise return ``q·x``
            (``x`` itself when ``p = 0``).

    Returns:
        ``Tensor[*]`` shaped like ``x``.
    """
    p = check_real("p", p, _CLASSIC_DROP_PROBABILITY)
    check_floating("x", x)
    if p == 0.0:
        return x
    q = 1.0 - p
    if not training:
        return x * q
    return _multiply_by_noise(x, _keep_draw(q))


def variance_stable_dropout(
    x: Tensor, p: float = 0.5, training: bool = True, eps: float = 1e-5
) -> Tensor:
    """Bernoulli dropout whose output has, per feature, exactly the batch mean and variance of
    its input, so a BatchNorm downstream learns the statistics it will see at test time.

    Plain inverted dropout keeps the mean ``c`` but inflates the variance to
    ``(c² + v)/q − c²``. Here the dropped signal ``z = x·b/q`` (``b ~ Bernoulli(q)``) is
    re-standardized with its *realized* batch statistics and given those of ``x``:

        ``y = μ_x + (z − μ_z)·sqrt((v_x + ε) / (v_z + ε))``

    where ``μ``, ``v`` are the per-feature batch mean and *biased* variance (divide by the
    number of samples ``n``, like BatchNorm's normalization). Then, exactly for the batch,
    ``mean(y) = μ_x`` and ``var(y) = (v_x + ε)·v_z/(v_z + ε) = v_x + O(ε)``; nothing about
    ``x`` beyond its first two moments is assumed, so it holds for non-zero means and
    non-normal data alike. Each sample still gets Bernoulli noise (the regularizer); only
    the batch's per-feature moments are pinned.

    Design choices:

    * **Features and samples.** ``x`` is ``(N, C, *)`` with features on dim 1 and every other
      position a sample, as in ``BatchNorm1d/2d/3d``; ``(N, C)`` has ``n = N`` samples per
      feature. A 1-D ``x`` is read as ``(N,)``: ``N`` samples of one feature.
    * **Gradients flow through the statistics** (nothing is detached). The output's batch
      moments follow the input's exactly, so a per-feature shift or scale of ``x`` shifts or
      scales ``y`` the same way — with gradient 1, as at test time, where the layer is the
      identity. Detached statistics would report a gradient of only about
      ``sqrt((v_x+ε)/(v_z+ε)) < 1`` for a shift the output follows one for one: a biased
      gradient, the mismatch Ioffe & Szegedy (2015, §2) warn of when normalization statistics
      are left out of the gradient.
    * **Fewer than two samples per feature** (batch size 1 on ``(N, C)``, a scalar): the
      variance is undefined, so it raises ``ValueError`` in training, like BatchNorm. An empty
      input (no samples or no features) is returned as it is.
    * **Near-constant features** (``v_x ≈ 0``, e.g. a dead ReLU channel): ``ε`` enters both
      variances, so the scale stays finite with finite gradients and a constant feature leaves
      with variance at most ``ε`` (plain dropout would give it ``c²·p/q``); an all-zero
      feature stays exactly zero. If every sample of a feature is dropped, ``v_z = 0`` and the
      feature leaves as the constant ``μ_x``.
    * **Correlated features.** Masks are independent across features, so covariances between
      features shrink by the product of their scales: a weighted sum of correlated features
      after this layer still sees a (smaller) variance shift. Per feature there is none.

    Args:
        x: ``Tensor[N, C, *]`` or ``Tensor[N]``.
        p: drop probability in ``[0, 1)`` (``p = 1`` leaves nothing to take statistics of).
        training: apply the noise when ``True``; otherwise return ``x`` itself.
        eps: ``ε > 0`` added to both variances, as in BatchNorm.

    Returns:
        Tensor shaped like ``x``.
    """
    p = check_real("p", p, _VARIANCE_STABLE_P)
    eps = check_real("eps", eps, _VARIANCE_STABLE_EPS)
    check_floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, shape (N,) or (N, C, *), got a scalar")
    if not training or p == 0.0:
        return x
    q = 1.0 - p
    # (N,) → (N, 1, 1) and (N, C, *) → (N, C, L): one code path, BatchNorm's layout.
    features = x.shape[1] if x.dim() > 1 else 1
    length = math.prod(x.shape[2:])
    if x.numel() == 0:  # nothing to drop (empty batch or no features)
        return x
    if x.shape[0] * length == 1:
        raise ValueError(
            f"variance_stable_dropout needs more than 1 sample per feature in training, "
            f"got input of shape {tuple(x.shape)}"
        )
    flat = x.reshape(x.shape[0], features, length)
    draw = _keep_draw(q)
    # The mask's buffer can hold the gradient where the noise layers' fast path applies.
    reusable = _ReusableNoise(draw, torch.get_rng_state()) if _takes_fast_path(flat) else None
    mask = draw(torch.empty_like(flat), None)
    # torch types Function.apply as untyped; _DropWithMoments.forward fixes what it returns.
    dropped, mean, var = _DropWithMoments.apply(flat, mask, reusable)  # type: ignore[no-untyped-call, unused-ignore]
    # F.batch_norm standardizes z with its realized batch moments and applies the affine
    # weight = sqrt(v_x + ε), bias = μ_x in one fused kernel. Standardizing is invariant to
    # the 1/q of inverted dropout, so z is left unscaled and ε is scaled by q² instead:
    # (z/q − μ_{z/q})/sqrt(v_{z/q} + ε) = (z − μ_z)/sqrt(v_z + ε·q²).
    # The floor keeps 1/sqrt(v_z + ε·q²) finite for an all-dropped feature (v_z = 0) when ε·q²
    # underflows the dtype (tiny ε, p near 1); it never matters where v_z > 0.
    scaled_eps = max(eps * q * q, torch.finfo(x.dtype).tiny)
    out = F.batch_norm(
        dropped, None, None, weight=(var + eps).sqrt(), bias=mean, training=True, eps=scaled_eps
    )
    # batch_norm's backward is slow on an expanded gradient: hand it a dense one (see the class).
    dense: Tensor = _DenseGradient.apply(out)  # type: ignore[no-untyped-call, unused-ignore]
    return dense.reshape(x.shape)


class _NoiseLayer(nn.Module):
    """Base of the modules here: hyper-parameters live in the attributes named by
    ``_settings`` (read again at every forward), and ``extra_repr`` shows them."""

    _settings: ClassVar[tuple[str, ...]] = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in self._settings)


class GaussianDropout(_NoiseLayer):
    """Module form of :func:`gaussian_dropout`: multiplies by ``N(1, p/(1−p))`` noise in
    training, identity in eval. Shape: any; output shaped like the input."""

    _settings = ("p",)

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_real("p", p, DROP_PROBABILITY)

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_dropout(x, self.p, self.training)


class Uout(_NoiseLayer):
    """Module form of :func:`uout`: multiplies by ``1 + U(−β, β)`` noise in training,
    identity in eval. Shape: any; output shaped like the input."""

    _settings = ("beta",)

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_real("beta", beta, UOUT_HALF_WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return uout(x, self.beta, self.training)


class ClassicDropout(_NoiseLayer):
    """Module form of :func:`classic_dropout`: drops without rescaling in training and scales by
    ``q = 1 − p`` in eval (**not** the identity in eval, by design). Shape: any."""

    _settings = ("p",)

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_real("p", p, _CLASSIC_DROP_PROBABILITY)

    def forward(self, x: Tensor) -> Tensor:
        return classic_dropout(x, self.p, self.training)


class VarianceStableDropout(_NoiseLayer):
    """Module form of :func:`variance_stable_dropout`: Bernoulli dropout that keeps each
    feature's batch mean and variance in training; identity in eval.
    Shape: ``(N, C, *)`` (features on dim 1) or ``(N,)``; output shaped like the input."""

    _settings = ("p", "eps")

    def __init__(self, p: float = 0.5, eps: float = 1e-5) -> None:
        super().__init__()
        self.p = check_real("p", p, _VARIANCE_STABLE_P)
        self.eps = check_real("eps", eps, _VARIANCE_STABLE_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return variance_stable_dropout(x, self.p, self.training, self.eps)


# torch.fx leaves: a traced model records one call per layer (the registry recognises it)
# instead of the random-number calls inside, and the batch-size check above, which reads
# shapes, does not meet fx proxies.
for _fn in (gaussian_dropout, uout, classic_dropout, variance_stable_dropout):
    torch.fx.wrap(_fn.__name__)


register_stochastic(GaussianDropout, lambda m: NoiseSpec("gaussian", {"p": m.p}))
register_stochastic(Uout, lambda m: NoiseSpec("uout", {"beta": m.beta}))
# Δ is a ratio of variances, so the non-inverted form has the same shift as "bernoulli".
register_stochastic(ClassicDropout, lambda m: bernoulli_spec(m.p))
# Not a kind theory models: the per-feature batch variance is kept exactly (no shift per
# feature), with a residual shift only through correlations (see variance_stable_dropout).
register_stochastic(VarianceStableDropout)

register_stochastic_function(gaussian_dropout, spec_from_call("gaussian"))
register_stochastic_function(uout, spec_from_call("uout", strength="beta", default=0.1))
register_stochastic_function(classic_dropout, spec_from_call("bernoulli"))
register_stochastic_function(variance_stable_dropout)
