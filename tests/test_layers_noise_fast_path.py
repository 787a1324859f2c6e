"""The CPU fast path of the noise layers: when eager autograd records the call on a large
input, Gaussian dropout, Uout and classic dropout (``_NoiseProduct``) draw the same noise as the
reference expression ``x * torch.empty_like(x).<fill>_(…)`` and compute the input gradient in
the noise's buffer; variance-stable dropout builds its input gradient in its mask's buffer.

Checked here: the output and gradient are bitwise those of the reference path under the same
seed (any layout and float dtype); a retained graph gives the same gradient on every backward
(the noise buffer is consumed by the first one and re-drawn for the next); double backward; the
noise law seen through the fast path (moments and a Kolmogorov–Smirnov test); the fast path is
taken exactly where it is meant to be. Every test here lowers the size threshold of the fast
path to zero (fixture), except the one that checks the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from helpers.noise_statistics import (
    assert_distribution_within,
    assert_mean_within,
    assert_variance_within,
)
from varshift.layers import noise
from varshift.layers.noise import (
    GaussianDropout,
    Uout,
    classic_dropout,
    gaussian_dropout,
    uout,
    variance_stable_dropout,
)

N_SAMPLES = 200_000


@pytest.fixture(autouse=True)
def fast_path_for_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small test tensors take the fast path too (by default only large inputs do)."""
    monkeypatch.setattr(noise, "_FAST_PATH_MIN_NUMEL", 0)


@dataclass(frozen=True)
class Law:
    """A layer function with its settings, and the law of its noise ``m``."""

    name: str
    function: Callable[[Tensor], Tensor]
    variance: float  # Var[m]
    fourth: float  # E[(m − 1)^4]
    cdf: Callable[[Tensor], Tensor]  # of m, float64


def _gaussian(p: float) -> Law:
    var = p / (1 - p)
    std = math.sqrt(var)
    return Law(
        f"gaussian-p{p}",
        lambda x: gaussian_dropout(x, p),
        var,
        3 * var**2,
        lambda m: 0.5 * (1 + torch.erf((m - 1) / (std * math.sqrt(2)))),
    )


def _uout(beta: float) -> Law:
    return Law(
        f"uout-beta{beta}",
        lambda x: uout(x, beta),
        beta**2 / 3,
        beta**4 / 5,
        lambda m: ((m - (1 - beta)) / (2 * beta)).clamp(0, 1),
    )


def _classic(p: float) -> Law:
    # Bernoulli(q) is not continuous: no cdf, and only the tests that need none use it.
    q = 1 - p
    return Law(f"classic-p{p}", lambda x: classic_dropout(x, p), p * q, math.nan, torch.erf)


LAWS = [_gaussian(0.3), _gaussian(0.7), _uout(0.1), _uout(0.8)]
LAW_IDS = [law.name for law in LAWS]
# Every layer on _NoiseProduct, for the tests that compare with the reference path.
PRODUCTS = [*LAWS, _classic(0.4)]
PRODUCT_IDS = [law.name for law in PRODUCTS]


def _inputs(dtype: torch.dtype) -> dict[str, Tensor]:
    """Inputs of several layouts: the noise fill follows the memory order, so each must match."""
    base = torch.randn(4, 3, 5, 6, dtype=dtype) + 2.0
    return {
        "contiguous": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "transposed": base.transpose(0, 3),
        "strided": base[:, :, ::2],
        "1-d": base.flatten(),
    }


def _reference(law: Law, x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """``(y, m)`` from the reference path (no autograd recording) under ``seed``; ``m`` is the
    noise itself, from the same draw on ones laid out like ``x``."""
    with torch.no_grad():
        torch.manual_seed(seed)
        y = law.function(x)
        torch.manual_seed(seed)
        m = law.function(torch.ones_like(x))
    return y, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "strided", "1-d"])
@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_output_and_gradient_are_the_reference_ones(
    law: Law, layout: str, dtype: torch.dtype
) -> None:
    x = _inputs(dtype)[layout]
    y_ref, m = _reference(law, x, seed=11)
    leaf = x.detach().requires_grad_()
    torch.manual_seed(11)
    y = law.function(leaf)
    assert torch.equal(y, y_ref)
    assert (y.dtype, y.shape, y.stride()) == (y_ref.dtype, y_ref.shape, y_ref.stride())
    grad = torch.randn_like(y)
    y.backward(grad)
    assert leaf.grad is not None
    assert leaf.grad.dtype == dtype
    assert torch.equal(leaf.grad, m * grad)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_retained_graph_gives_the_same_gradient_on_every_backward(law: Law, layout: str) -> None:
    x = _inputs(torch.float32)[layout]
    _, m = _reference(law, x, seed=5)
    leaf = x.detach().requires_grad_()
    torch.manual_seed(5)
    y = law.function(leaf)
    torch.randn(3)  # the generator moves on between the forward and the backward passes
    grads = []
    for _ in range(3):
        grad = torch.randn_like(y)
        y.backward(grad, retain_graph=True)
        assert leaf.grad is not None
        assert torch.equal(leaf.grad, m * grad)
        grads.append(leaf.grad)
        leaf.grad = None
    # Each gradient is its own tensor: a later backward must not write into an earlier one.
    assert len({g.data_ptr() for g in grads}) == len(grads)


@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_gradcheck_and_double_backward(law: Law) -> None:
    def reseeded(x: Tensor) -> Tensor:
        torch.manual_seed(1234)
        return law.function(x)

    x = (torch.randn(5, 3, dtype=torch.float64) + 1.0).requires_grad_()
    assert torch.autograd.gradcheck(reseeded, (x,))
    assert torch.autograd.gradgradcheck(reseeded, (x,))
    # create_graph after an ordinary backward that consumed the noise buffer: the gradient
    # v·m is differentiable in the upstream gradient v, with derivative m.
    y = reseeded(x)
    y.backward(torch.randn_like(y), retain_graph=True)
    v = torch.ones_like(y, requires_grad=True)
    (grad,) = torch.autograd.grad(y, x, v, create_graph=True)
    (grad_of_grad,) = torch.autograd.grad(grad.sum(), v)
    _, m = _reference(law, x.detach(), seed=1234)
    assert torch.equal(grad.detach(), m)
    assert torch.equal(grad_of_grad, m)


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_noise_law_through_the_fast_path(law: Law) -> None:
    # y = c·m forward; y.sum().backward() sends an expanded gradient of ones, so x.grad = m.
    c = 2.5
    torch.manual_seed(2024)
    x = torch.full((N_SAMPLES,), c, dtype=torch.float64, requires_grad=True)
    y = law.function(x)
    assert_mean_within(y, c, c**2 * law.variance)
    assert_variance_within(y, c**2 * law.variance, c**4 * law.fourth)
    y.sum().backward()
    assert x.grad is not None
    m = x.grad
    torch.testing.assert_close(m * c, y.detach(), rtol=1e-15, atol=0)
    assert_distribution_within(m, law.cdf)
    if law.name.startswith("uout"):
        beta = math.sqrt(3 * law.variance)
        assert m.min().item() >= 1 - beta
        assert m.max().item() <= 1 + beta


@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_same_seed_same_noise_other_seed_other_noise(law: Law) -> None:
    x = torch.randn(64, 16, requires_grad=True)
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        y = law.function(x)
        y.backward(torch.ones_like(y))
        assert x.grad is not None
        draws.append((y.detach(), x.grad))
        x.grad = None
    assert torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("make", [lambda: GaussianDropout(0.4), lambda: Uout(0.3)])
def test_modules_keep_dtype_shape_and_layout(
    make: Callable[[], torch.nn.Module], dtype: torch.dtype
) -> None:
    x = torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = make().train()(x)
    assert (y.dtype, y.shape) == (dtype, x.shape)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad is not None
    assert (x.grad.dtype, x.grad.shape) == (dtype, x.shape)
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_fast_path_only_where_eager_autograd_records(law: Law) -> None:
    # One autograd node for the layer where autograd records on CPU; plain ops elsewhere.
    x = torch.randn(8, 4, requires_grad=True)
    recorded = law.function(x)
    assert recorded.grad_fn is not None
    assert type(recorded.grad_fn).__name__ == "_NoiseProductBackward"
    with torch.no_grad():
        assert law.function(x).grad_fn is None
    assert type(law.function(x.detach() + 0).grad_fn).__name__ != "_NoiseProductBackward"
    assert type(law.function(x * 1.0).grad_fn).__name__ == "_NoiseProductBackward"


@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_fast_path_from_the_size_threshold_on(law: Law, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the default threshold
    threshold = noise._FAST_PATH_MIN_NUMEL
    large = torch.zeros(threshold, requires_grad=True)
    small = torch.zeros(threshold - 1, requires_grad=True)
    assert type(law.function(large).grad_fn).__name__ == "_NoiseProductBackward"
    assert type(law.function(small).grad_fn).__name__ == "MulBackward0"


@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_plain_backward_keeps_the_noise_a_create_graph_gradient_reads(law: Law) -> None:
    # The graph recorded with create_graph keeps the noise buffer; a plain backward through
    # the retained first graph afterwards must not overwrite it.
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(21)
    y = law.function(x)
    v = torch.ones_like(y, requires_grad=True)
    (grad,) = torch.autograd.grad(y, x, v, create_graph=True)
    y.backward(torch.randn_like(y), retain_graph=True)
    (grad_of_grad,) = torch.autograd.grad(grad.sum(), v)
    _, m = _reference(law, x.detach(), seed=21)
    assert torch.equal(grad_of_grad, m)


def _variance_stable_run(
    x: Tensor, grads: list[Tensor], monkeypatch: pytest.MonkeyPatch, *, fast: bool
) -> tuple[Tensor, list[Tensor]]:
    """Output and the gradient of each backward through one retained graph, under seed 9."""
    monkeypatch.setattr(noise, "_FAST_PATH_MIN_NUMEL", 0 if fast else x.numel() + 1)
    leaf = x.detach().requires_grad_()
    torch.manual_seed(9)
    y = variance_stable_dropout(leaf, 0.4)
    torch.randn(3)  # the generator moves on between the passes
    results = []
    for grad in grads:
        y.backward(grad, retain_graph=True)
        assert leaf.grad is not None
        results.append(leaf.grad)
        leaf.grad = None
    return y.detach(), results


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 5, 6)], ids=str)
def test_variance_stable_gradient_in_the_mask_buffer_is_the_reference_one(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(shape) * 2 + 1
    grads = [torch.randn(shape) for _ in range(3)]
    y_ref, reference = _variance_stable_run(x, grads, monkeypatch, fast=False)
    y, fast = _variance_stable_run(x, grads, monkeypatch, fast=True)
    assert torch.equal(y, y_ref)
    for got, expected in zip(fast, reference, strict=True):
        assert torch.equal(got, expected)
    assert len({g.data_ptr() for g in fast}) == len(fast)


def test_variance_stable_double_backward_on_the_fast_path() -> None:
    def reseeded(x: Tensor) -> Tensor:
        torch.manual_seed(77)
        return variance_stable_dropout(x, 0.3)

    x = (torch.randn(6, 2, 3, dtype=torch.float64) + 1.0).requires_grad_()
    assert torch.autograd.gradcheck(reseeded, (x,))
    assert torch.autograd.gradgradcheck(reseeded, (x,))


@pytest.mark.parametrize("law", PRODUCTS, ids=PRODUCT_IDS)
def test_torch_func_grad_takes_the_reference_path(law: Law) -> None:
    # A classic autograd.Function cannot run under torch.func transforms.
    x = torch.randn(6, 4, dtype=torch.float64)
    _, m = _reference(law, x, seed=31)
    torch.manual_seed(31)
    grad = torch.func.grad(lambda t: law.function(t).sum())(x)
    assert torch.equal(grad, m)
