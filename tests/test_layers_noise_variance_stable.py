"""VarianceStableDropout: the batch statistics it promises (per-feature mean and biased variance
of the input, exactly), the Bernoulli noise it still applies, its gradient through the
statistics, and its edge cases (one sample per feature, constant features, empty batches)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from varshift.layers.noise import VarianceStableDropout, variance_stable_dropout
from varshift.theory import shift_parts

K = 5.0  # standard errors allowed in the statistical checks


def feature_moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature batch mean and biased variance, features on dim 1 (dim 0 for 1-D)."""
    flat = t.reshape(t.shape[0], -1 if t.dim() == 1 else t.shape[1], 1) if t.dim() < 3 else t
    dims = [0, *range(2, flat.dim())]
    return flat.mean(dim=dims), flat.var(dim=dims, unbiased=False)


def shifted_input(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    """Non-zero, distinct per-feature means (1, 2, 3, ...) and variance 4; not normal (a
    shifted exponential), since the layer promises moments for any distribution."""
    x = torch.empty(shape, dtype=dtype).exponential_().mul_(2.0)
    if x.dim() == 1:
        return x + 1.0
    means = torch.arange(1, shape[1] + 1, dtype=dtype).view(1, -1, *([1] * (x.dim() - 2)))
    return x + means


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(64,), (64, 5), (32, 5, 7), (16, 3, 4, 5), (8, 3, 2, 3, 4)], ids=str
)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_output_keeps_each_features_batch_mean_and_variance(
    p: float, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    eps = 1e-5
    x = shifted_input(shape, dtype)
    y = variance_stable_dropout(x, p, training=True, eps=eps)
    mean_x, var_x = feature_moments(x)
    mean_y, var_y = feature_moments(y)
    # Exact up to rounding and ε: var(y) = (v_x + ε)·v_z/(v_z + ε) (v_z of the inverted-dropped
    # signal), whose relative gap to v_x, ε·|v_z − v_x|/(v_x·(v_z + ε)), is below 2ε/v_x when
    # v_z ≥ v_x/2 — dropout inflates v_z well above v_x here.
    rounding = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(mean_y, mean_x, rtol=rounding, atol=rounding * 10)
    var_gap = 2 * eps / var_x.min().item() + rounding
    torch.testing.assert_close(var_y, var_x, rtol=var_gap, atol=0.0)


def test_plain_dropout_inflates_the_variance_the_stable_one_keeps() -> None:
    # Li et al.: inverted dropout keeps the mean c but gives variance (c² + v)/q − c².
    p, c, v = 0.4, 2.0, 1.0
    x = c + math.sqrt(v) * torch.randn(100_000, 2, dtype=torch.float64)
    plain = F.dropout(x, p, training=True)
    stable = variance_stable_dropout(x, p, training=True)
    inflated = shift_parts("bernoulli", c, v, p=p).train_var
    assert inflated == pytest.approx((c**2 + v) / (1 - p) - c**2)
    sample = plain.flatten()
    n = sample.numel()
    fourth = ((sample - sample.mean()) ** 4).mean().item()
    stderr = math.sqrt((fourth - sample.var().item() ** 2) / n)
    assert abs(sample.var().item() - inflated) <= K * stderr
    assert inflated - v > 20 * stderr  # the contrast is far outside the noise
    torch.testing.assert_close(feature_moments(stable)[1], feature_moments(x)[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_each_sample_still_gets_bernoulli_noise_at_rate_p(p: float) -> None:
    # Dropped positions of a feature all leave as the same value μ_x − s·μ_z (z = 0 there);
    # kept ones are distinct (continuous input). The share of that value estimates p.
    n, features = 4000, 8
    x = torch.randn(n, features, dtype=torch.float64) + 3.0
    y = variance_stable_dropout(x, p, training=True)
    dropped_value = torch.mode(y, dim=0).values
    dropped = (y == dropped_value).double()
    stderr = math.sqrt(p * (1 - p) / dropped.numel())
    assert abs(dropped.mean().item() - p) <= K * stderr
    kept = dropped == 0
    # Kept values are an affine map of x with a positive slope: order within a feature is kept.
    for j in range(features):
        order = torch.argsort(x[kept[:, j], j])
        assert bool((y[kept[:, j], j][order].diff() > 0).all())


def test_gradient_flows_through_the_statistics() -> None:
    # mean(y) ≡ mean(x) as functions of x, so d mean_j(y)/dx_ij = 1/n exactly, as at test time
    # (identity). Detached statistics would give s·m/q instead, whose mean is not 1/n.
    x = (torch.randn(50, 3, dtype=torch.float64) * 2 + 5).requires_grad_()
    y = variance_stable_dropout(x, 0.5, training=True)
    (grad,) = torch.autograd.grad(y.mean(dim=0).sum(), x, retain_graph=True)
    torch.testing.assert_close(grad, torch.full_like(x, 1 / 50), rtol=0, atol=1e-12)
    # Likewise the biased variance of y is v_x·v_z/(v_z + ε): its gradient is that of v_x.
    (grad_var,) = torch.autograd.grad(y.var(dim=0, unbiased=False).sum(), x)
    expected = 2 * (x - x.mean(dim=0)) / 50
    torch.testing.assert_close(grad_var, expected.detach(), rtol=1e-4, atol=1e-8)


def test_gradgradcheck_with_fixed_noise() -> None:
    def fixed_noise(t: Tensor) -> Tensor:
        torch.manual_seed(5)
        return variance_stable_dropout(t, 0.3)

    x = (torch.randn(6, 2, 3, dtype=torch.float64) + 1).requires_grad_()
    assert torch.autograd.gradgradcheck(fixed_noise, (x,))


@pytest.mark.parametrize("shape", [(1, 4), (1, 3, 1), (1, 2, 1, 1)], ids=str)
def test_one_sample_per_feature_is_refused_in_training_only(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=r"more than 1 sample per feature.*got input of shape"):
        variance_stable_dropout(x, 0.5, training=True)
    assert VarianceStableDropout(0.5).eval()(x) is x


def test_scalar_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"x must have a batch dimension.*got a scalar"):
        variance_stable_dropout(torch.tensor(1.0), 0.5, training=False)


def test_one_dimensional_input_is_a_batch_of_one_feature() -> None:
    x = torch.randn(500, dtype=torch.float64) * 3 + 2
    y = variance_stable_dropout(x, 0.5)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=1e-12)
    assert y.var().item() == pytest.approx(x.var().item(), rel=1e-5)


def test_constant_features_stay_near_constant_with_finite_gradients() -> None:
    eps = 1e-5
    x = torch.randn(64, 3, dtype=torch.float64)
    x[:, 0] = 0.0  # a dead ReLU channel
    x[:, 1] = 5.0  # a constant, non-zero feature: plain dropout would give it 25·p/q
    x.requires_grad_()
    y = variance_stable_dropout(x, 0.5, training=True, eps=eps)
    assert torch.equal(y[:, 0], torch.zeros(64, dtype=torch.float64))
    assert y[:, 1].mean().item() == pytest.approx(5.0, rel=1e-12)
    assert y[:, 1].var(unbiased=False).item() <= eps
    y.pow(2).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


def test_empty_batch_passes_through() -> None:
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = variance_stable_dropout(x, 0.5)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape


def test_channels_last_input_gives_the_same_statistics() -> None:
    x = shifted_input((8, 3, 4, 5), torch.float64).to(memory_format=torch.channels_last)
    y = variance_stable_dropout(x, 0.5)
    assert y.shape == x.shape
    torch.testing.assert_close(feature_moments(y)[0], feature_moments(x)[0])
    torch.testing.assert_close(feature_moments(y)[1], feature_moments(x)[1], rtol=1e-5, atol=0)
