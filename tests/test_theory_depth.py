"""simulate_depth: the shift compounds with depth, fades with width, and its first layer obeys the
formula. Every comparison allows K standard errors, taken from the simulation's own replicate
blocks."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from varshift.theory import DepthProfile, simulate_depth, variance_shift

K = 4.0  # standard errors allowed for one comparison


def _combined(*stderrs: float) -> float:
    return math.sqrt(sum(s * s for s in stderrs))


def test_the_shift_compounds_with_depth() -> None:
    profile = simulate_depth(depth=5, width=16, p=0.3, samples=2048)
    assert isinstance(profile, DepthProfile)
    shift, stderr = profile.shift, profile.shift_stderr
    assert shift.shape == stderr.shape == profile.local.shape == (5,)
    assert shift[0] - shift[-1] > K * _combined(stderr[0], stderr[-1])
    for layer in range(4):  # never a significant step back up
        assert shift[layer + 1] - shift[layer] < K * _combined(stderr[layer], stderr[layer + 1])
    # The first BN has nothing upstream to inherit: compounded and local shifts coincide.
    assert shift[0] == profile.local[0]


def test_the_shift_fades_with_width() -> None:
    profiles = [simulate_depth(depth=3, width=d, p=0.3, samples=2048) for d in (8, 32, 128)]
    for narrow, wide in itertools.pairwise(profiles):
        gap_narrow, gap_wide = 1.0 - narrow.shift, 1.0 - wide.shift
        margin = K * np.hypot(narrow.shift_stderr, wide.shift_stderr)
        assert np.all(gap_wide < gap_narrow - margin), (narrow.shift, wide.shift)
    assert np.all(profiles[-1].shift < 1.0 + K * profiles[-1].shift_stderr)


@pytest.mark.parametrize(
    ("kind", "params", "width", "rho", "cos2"),
    [
        ("bernoulli", {"p": 0.5}, 4, 0.0, 0.25),
        ("gaussian", {"p": 0.3}, 16, 0.5, 0.1),
        ("uout", {"beta": 0.9}, 64, 0.3, 0.4),
    ],
)
def test_the_first_layer_obeys_the_formula(
    kind: str, params: dict[str, Any], width: int, rho: float, cos2: float
) -> None:
    profile = simulate_depth(
        depth=2, width=width, kind=kind, rho=rho, cos2=cos2, samples=4096, **params
    )
    # Standard-normal inputs: c = 0, v = 1.
    expected = variance_shift(kind, 0.0, 1.0, width=width, cos2=cos2, rho=rho, **params)
    assert abs(profile.local[0] - expected) < K * profile.local_stderr[0]


def test_without_noise_there_is_no_shift_anywhere() -> None:
    profile = simulate_depth(depth=3, width=8, kind="uout", beta=0.0, samples=256)
    np.testing.assert_allclose(profile.shift, 1.0, rtol=1e-12)
    np.testing.assert_allclose(profile.local, 1.0, rtol=1e-12)


def test_uneven_blocks_and_gaussian_weights_run() -> None:
    profile = simulate_depth(depth=2, width=6, cos2=None, samples=1001, blocks=7, p=0.2)
    assert (profile.samples, profile.blocks, profile.width, profile.depth) == (1001, 7, 6, 2)
    assert np.all(np.isfinite(profile.shift))
    assert np.all(profile.shift_stderr > 0)


def test_a_seed_reproduces_the_profile() -> None:
    first = simulate_depth(depth=2, width=8, p=0.4, samples=512, seed=4)
    again = simulate_depth(depth=2, width=8, p=0.4, samples=512, seed=4)
    np.testing.assert_array_equal(first.shift, again.shift)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 0}, r"depth must be an integer in \[1, inf\], got 0"),
        ({"width": 0}, r"width must be an integer in \[1, inf\], got 0"),
        ({"blocks": 1}, r"blocks must be an integer in \[2, inf\], got 1"),
        ({"samples": 100}, r"samples must be an integer in \[128, inf\], got 100"),
        ({"rho": 1.5}, r"rho must be finite and in"),
        ({"cos2": 2.0}, r"cos2 must be finite and in \[0, 1\]"),
        ({"seed": -3}, r"seed must be an integer in \[0, inf\]"),
        ({"kind": "nope"}, r"unknown noise kind 'nope'"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"depth": 2, "width": 8, "p": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        simulate_depth(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": None}, r"p must be a real number, got None"),
        ({"p": True}, r"p must be a real number, got True"),
        ({"depth": 2.0}, r"depth must be an integer, got 2.0"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error(
    kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"depth": 2, "width": 8, "p": 0.5, **kwargs}
    with pytest.raises(TypeError, match=message):
        simulate_depth(**arguments)  # type: ignore[arg-type]


def test_a_stack_beyond_the_memory_limit_is_refused_before_drawing() -> None:
    with pytest.raises(ValueError, match=r"at most 4 GiB.*lower the width or depth"):
        simulate_depth(depth=2, width=10**6, p=0.5)
    with pytest.raises(ValueError, match=r"at most 4 GiB.*pass at most \d+ samples"):
        simulate_depth(depth=2, width=64, p=0.5, samples=10**9)
