"""One validation path for every layer argument: the same message form
``<name> must be <requirement>, got <value>``, TypeError for the wrong type (bools, tensors,
strings), ValueError for a value out of range or not finite, and non-floating inputs refused."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from varshift.layers import (
    ClassicDropout,
    DropBlock2d,
    DropBlockScheduler,
    DropConnectConv2d,
    DropConnectLinear,
    GaussianDropout,
    Uout,
    VarianceStableDropout,
    functional,
)

X = torch.randn(4, 3, 5, 5)
W_LINEAR, W_CONV = torch.randn(2, 5), torch.randn(2, 3, 1, 1)

# Every public constructor and functional, as "call with this argument set to a value".
CALLS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "GaussianDropout(p)": ("p", lambda v: GaussianDropout(v)),
    "Uout(beta)": ("beta", lambda v: Uout(v)),
    "ClassicDropout(p)": ("p", lambda v: ClassicDropout(v)),
    "VarianceStableDropout(p)": ("p", lambda v: VarianceStableDropout(v)),
    "VarianceStableDropout(eps)": ("eps", lambda v: VarianceStableDropout(0.5, eps=v)),
    "DropBlock2d(p)": ("p", lambda v: DropBlock2d(v, 3)),
    "DropBlockScheduler(end_p)": (
        "end_p", lambda v: DropBlockScheduler([DropBlock2d(0.0, 3)], end_p=v, total_steps=4)
    ),
    "DropConnectLinear(p)": ("p", lambda v: DropConnectLinear(5, 2, p=v)),
    "DropConnectConv2d(p)": ("p", lambda v: DropConnectConv2d(3, 2, 1, p=v)),
    "gaussian_dropout(p)": ("p", lambda v: functional.gaussian_dropout(X, v)),
    "uout(beta)": ("beta", lambda v: functional.uout(X, v)),
    "classic_dropout(p)": ("p", lambda v: functional.classic_dropout(X, v)),
    "variance_stable_dropout(p)": ("p", lambda v: functional.variance_stable_dropout(X, v)),
    "variance_stable_dropout(eps)": (
        "eps", lambda v: functional.variance_stable_dropout(X, 0.5, eps=v)
    ),
    "drop_block_2d(p)": ("p", lambda v: functional.drop_block_2d(X, v, 3)),
    "drop_block_schedule(end_p)": (
        "end_p", lambda v: functional.drop_block_schedule(1, end_p=v, total_steps=4)
    ),
    "drop_connect_linear(p)": (
        "p", lambda v: functional.drop_connect_linear(X, W_LINEAR, None, v)
    ),
    "drop_connect_conv2d(p)": ("p", lambda v: functional.drop_connect_conv2d(X, W_CONV, None, v)),
}

# Out of every range above (p, beta, eps): ValueError. Not numbers: TypeError. The bools were
# accepted as 1/0 and a 2-element tensor failed with a RuntimeError from deep inside torch.
OUT_OF_RANGE = [-0.5, 1.5, math.nan, math.inf, -math.inf, 10**400]
WRONG_TYPE = [True, False, "0.1", None, torch.tensor(0.1), torch.tensor([0.1, 0.2]), [0.1]]


def _one_line_message(name: str, error: pytest.ExceptionInfo[Exception]) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(rf"{name} must be .+, got .+", message), message


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=repr)
@pytest.mark.parametrize("call", list(CALLS))
def test_values_out_of_range_raise_value_error_in_the_one_format(call: str, value: object) -> None:
    name, fn = CALLS[call]
    with pytest.raises(ValueError) as error:
        fn(value)
    _one_line_message(name, error)


@pytest.mark.parametrize("value", WRONG_TYPE, ids=repr)
@pytest.mark.parametrize("call", list(CALLS))
def test_values_of_the_wrong_type_raise_type_error_in_the_one_format(
    call: str, value: object
) -> None:
    name, fn = CALLS[call]
    with pytest.raises(TypeError) as error:
        fn(value)
    _one_line_message(name, error)


NOISE_FUNCTIONS: dict[str, Callable[[Tensor, bool], Tensor]] = {
    "gaussian_dropout": lambda x, t: functional.gaussian_dropout(x, 0.3, t),
    "uout": lambda x, t: functional.uout(x, 0.3, t),
    "classic_dropout": lambda x, t: functional.classic_dropout(x, 0.3, t),
    "variance_stable_dropout": lambda x, t: functional.variance_stable_dropout(x, 0.3, t),
    "drop_block_2d": lambda x, t: functional.drop_block_2d(x, 0.3, 3, t),
    "drop_connect_conv2d": lambda x, t: functional.drop_connect_conv2d(x, W_CONV, None, 0.3, t),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(NOISE_FUNCTIONS))
def test_non_floating_input_is_refused_in_both_modes(
    name: str, training: bool, dtype: torch.dtype
) -> None:
    # DropBlock turned int64 into float32; the others failed inside torch in training only.
    x = torch.ones(4, 3, 5, 5).to(dtype)
    with pytest.raises(TypeError, match=rf"x must be a floating-point tensor, got dtype {dtype}"):
        NOISE_FUNCTIONS[name](x, training)


@pytest.mark.parametrize("name", list(NOISE_FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_dtypes_are_preserved(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(4, 3, 5, 5).to(dtype)
    if name == "drop_connect_conv2d":
        out = functional.drop_connect_conv2d(x, W_CONV.to(dtype), None, 0.3)
    else:
        out = NOISE_FUNCTIONS[name](x, True)
    assert out.dtype == dtype


def test_flags_must_be_bools() -> None:
    with pytest.raises(TypeError, match=r"shared_channels must be a bool, got 1"):
        DropBlock2d(0.1, 3, shared_channels=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"per_sample must be a bool, got 'yes'"):
        DropConnectConv2d(3, 2, 1, per_sample="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("eps", [1e-300, 1e-320])
def test_variance_stable_dropout_stays_finite_when_eps_times_q_squared_underflows(
    eps: float,
) -> None:
    # ε·q² underflows (float32, or even float64 at 1e-320): an all-dropped feature (v_z = 0)
    # used to come out NaN, or batch_norm refused its own eps of 0.
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    out = functional.variance_stable_dropout(x, p=0.99, eps=eps)
    assert torch.isfinite(out).all()


def test_variance_stable_dropout_gradient_is_the_same_for_expanded_and_dense_upstream() -> None:
    x = torch.randn(16, 4, 3, requires_grad=True)
    torch.manual_seed(1)
    functional.variance_stable_dropout(x, 0.4).sum().backward()  # expanded (stride-0) gradient
    assert x.grad is not None
    expanded = x.grad.clone()
    x.grad = None
    torch.manual_seed(1)
    out = functional.variance_stable_dropout(x, 0.4)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, expanded)
