"""Noise kinds of varshift.theory: their variances, the registry and the samplers.

Samplers are tested by the statistics of what they draw, with tolerances of K standard errors
computed from the sample itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from varshift.theory import (
    noise_kinds,
    noise_variance,
    register_noise_kind,
    sample_noise,
    variance_shift,
)

K = 4.0  # standard errors allowed for one statistic


def test_builtin_kinds_are_listed_in_registration_order() -> None:
    assert noise_kinds()[:3] == ("bernoulli", "gaussian", "uout")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_bernoulli_and_gaussian_variance_is_p_over_keep(p: float) -> None:
    expected = p / (1.0 - p)
    assert noise_variance("bernoulli", p=p) == pytest.approx(expected, rel=1e-12)
    assert noise_variance("gaussian", p=p) == noise_variance("bernoulli", p=p)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_uout_variance_is_that_of_a_uniform(beta: float) -> None:
    assert noise_variance("uout", beta=beta) == pytest.approx(beta**2 / 3.0, rel=1e-12, abs=0)


def test_integer_and_numpy_parameters_are_accepted() -> None:
    import numpy as np

    assert noise_variance("bernoulli", p=0) == 0.0
    assert noise_variance("uout", beta=np.float32(0.5)) == pytest.approx(0.25 / 3.0)


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown noise kind 'dropsy'.*bernoulli, gaussian, uout"):
        noise_variance("dropsy", p=0.5)


def test_missing_and_unexpected_parameters_are_named() -> None:
    with pytest.raises(ValueError, match=r"'uout' takes beta; missing beta"):
        noise_variance("uout")
    with pytest.raises(ValueError, match=r"'bernoulli' takes p; unexpected beta"):
        noise_variance("bernoulli", p=0.5, beta=0.1)
    with pytest.raises(ValueError, match=r"missing beta and unexpected p"):
        noise_variance("uout", p=0.5)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan, math.inf])
@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_drop_probability_out_of_range_is_refused(kind: str, p: float) -> None:
    with pytest.raises(ValueError, match=r"p must be finite and in \[0, 1\).*got"):
        noise_variance(kind, p=p)


@pytest.mark.parametrize("p", [True, "0.5", None, [0.5], np.bool_(False)])
def test_drop_probability_of_the_wrong_type_is_refused(p: object) -> None:
    with pytest.raises(TypeError, match=r"p must be a real number, got"):
        noise_variance("bernoulli", p=p)


@pytest.mark.parametrize("beta", [-0.01, 1.01, math.nan])
def test_uout_beta_out_of_range_is_refused(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta must be finite and in \[0, 1\]"):
        noise_variance("uout", beta=beta)


def _scaled_variance(p: float, scale: float = 2.0) -> float:
    return scale * p


@pytest.mark.usefixtures("noise_registry")
def test_a_registered_kind_serves_every_theory_function() -> None:
    register_noise_kind("scaled", _scaled_variance)
    assert "scaled" in noise_kinds()
    assert noise_variance("scaled", p=0.25) == 0.5
    assert noise_variance("scaled", p=0.25, scale=4.0) == 1.0
    assert variance_shift("scaled", 0.0, 1.0, p=0.25) == pytest.approx(1.0 / 1.5)
    with pytest.raises(ValueError, match=r"takes p, scale \(optional\); unexpected beta"):
        noise_variance("scaled", p=0.25, beta=1.0)


@pytest.mark.usefixtures("noise_registry")
def test_registering_again_needs_replace_unless_it_is_the_same_function() -> None:
    register_noise_kind("scaled", _scaled_variance)
    register_noise_kind("scaled", _scaled_variance)  # the same function: harmless
    with pytest.raises(ValueError, match=r"already registered; pass replace=True"):
        register_noise_kind("scaled", lambda p: p)
    register_noise_kind("scaled", lambda p: 3.0 * p, replace=True)
    assert noise_variance("scaled", p=1.0) == 3.0


@pytest.mark.usefixtures("noise_registry")
def test_bad_registrations_are_refused() -> None:
    with pytest.raises(ValueError, match=r"name must be a non-empty string"):
        register_noise_kind(" ", _scaled_variance)
    with pytest.raises(ValueError, match=r"fn must be callable"):
        register_noise_kind("x", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sampler must be callable"):
        register_noise_kind("x", _scaled_variance, sampler="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cannot have a parameter called 'rho'"):
        register_noise_kind("x", lambda rho: rho)
    with pytest.raises(ValueError, match=r"'p' is positional-only"):
        register_noise_kind("x", lambda p, /: p)
    assert "x" not in noise_kinds()


@pytest.mark.usefixtures("noise_registry")
@pytest.mark.parametrize("returned", [-1.0, math.nan, "1"])
def test_a_variance_function_returning_nonsense_is_caught(returned: object) -> None:
    register_noise_kind("broken", lambda: returned)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match=r"kind 'broken' must be a finite number >= 0, got"):
        noise_variance("broken")


@pytest.mark.usefixtures("noise_registry")
def test_sampling_a_kind_without_sampler_says_how_to_add_one() -> None:
    register_noise_kind("scaled", _scaled_variance)
    with pytest.raises(ValueError, match=r"without a sampler; pass sampler="):
        sample_noise("scaled", torch.zeros(3), p=0.1)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("bernoulli", {"p": 0.3}),
        ("bernoulli", {"p": 0.8}),
        ("gaussian", {"p": 0.5}),
        ("uout", {"beta": 0.7}),
    ],
)
def test_samplers_have_mean_one_and_the_stated_variance(
    kind: str, params: dict[str, Any]
) -> None:
    n = 200_000
    generator = torch.Generator().manual_seed(1)
    m = sample_noise(kind, torch.empty(n, dtype=torch.float64), generator=generator, **params)
    sigma2 = noise_variance(kind, **params)
    mean = float(m.mean())
    assert abs(mean - 1.0) < K * float(m.std()) / math.sqrt(n)
    squared = (m - mean).square()
    variance = float(squared.mean())
    assert abs(variance - sigma2) < K * float(squared.std()) / math.sqrt(n)


def test_noise_follows_the_shape_dtype_of_like_and_the_generator() -> None:
    like = torch.zeros(4, 3, 5, dtype=torch.float32)
    first = sample_noise("uout", like, generator=torch.Generator().manual_seed(7), beta=0.5)
    again = sample_noise("uout", like, generator=torch.Generator().manual_seed(7), beta=0.5)
    assert first.shape == like.shape
    assert first.dtype == torch.float32
    assert torch.equal(first, again)


@pytest.mark.parametrize(("kind", "params"), [("bernoulli", {"p": 0.0}), ("uout", {"beta": 0.0})])
def test_zero_noise_is_exactly_one(kind: str, params: dict[str, Any]) -> None:
    assert torch.equal(sample_noise(kind, torch.zeros(100), **params), torch.ones(100))


def test_sampling_validates_parameters_first() -> None:
    with pytest.raises(ValueError, match=r"p must be finite and in \[0, 1\)"):
        sample_noise("gaussian", torch.zeros(3), p=1.0)
