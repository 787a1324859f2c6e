"""DropBlock2d, drop_block_2d, drop_block_schedule and DropBlockScheduler.

Statistical checks use fixed seeds and tolerances of K standard errors computed from the sample
itself, so they fail when the distribution is wrong, not when the seed changes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varshift.layers.dropblock import (
    DropBlock2d,
    DropBlockScheduler,
    _expand_seeds,
    drop_block_2d,
    drop_block_schedule,
)
from varshift.layers.registry import (
    NoiseSpec,
    function_noise_spec,
    is_stochastic,
    is_stochastic_function,
    noise_spec,
)

K = 4.5  # standard errors allowed for one statistic
K_MANY = 5.5  # per-position checks: ~100 positions tested at once


def _drop_masks(samples: int, h: int, w: int, p: float, block_size: int) -> Tensor:
    """``samples`` independent drop indicators ``Tensor[samples, H, W]`` (1.0 = dropped)."""
    out = drop_block_2d(torch.ones(samples, 1, h, w, dtype=torch.float64), p, block_size)
    return (out[:, 0] == 0).double()


def _regions(h: int, w: int) -> dict[str, Tensor]:
    rows = torch.arange(h).view(-1, 1).expand(h, w)
    cols = torch.arange(w).view(1, -1).expand(h, w)
    on_row_edge = (rows == 0) | (rows == h - 1)
    on_col_edge = (cols == 0) | (cols == w - 1)
    corner = on_row_edge & on_col_edge
    edge = (on_row_edge | on_col_edge) & ~corner
    return {"corner": corner, "edge": edge, "interior": ~(on_row_edge | on_col_edge)}


@pytest.mark.parametrize(
    ("h", "w", "block_size"),
    [(9, 9, 1), (9, 9, 3), (9, 9, 4), (7, 10, 5), (6, 6, 11)],
)
def test_every_position_is_dropped_with_probability_p(h: int, w: int, block_size: int) -> None:
    p, samples = 0.3, 6000
    dropped = _drop_masks(samples, h, w, p, block_size)

    # Each position separately: a Binomial(samples, p) count.
    freq = dropped.mean(0)
    se_position = math.sqrt(p * (1 - p) / samples)
    worst = ((freq - p).abs() / se_position).max().item()
    assert worst < K_MANY, f"some position is off by {worst:.1f} standard errors"

    # Region averages (units of one sample are correlated; samples are independent, so the
    # standard error comes from the spread of the per-sample region means).
    for name, region in _regions(h, w).items():
        if not region.any():
            continue
        per_sample = dropped[:, region].mean(1)
        se = per_sample.std().item() / math.sqrt(samples)
        z = abs(per_sample.mean().item() - p) / se
        assert z < K, f"{name}: drop rate {per_sample.mean().item():.4f} vs p={p} ({z:.1f} SE)"


def test_noise_has_mean_one_and_bernoulli_variance() -> None:
    # Per unit the multiplier must be inverted Bernoulli dropout's: E[m] = 1, E[m²] = 1/(1 − p).
    p, samples = 0.25, 4000
    m = drop_block_2d(torch.ones(samples, 2, 8, 8, dtype=torch.float64), p, 3)
    for statistic, expected in ((m, 1.0), (m**2, 1.0 / (1.0 - p))):
        per_sample = statistic.flatten(1).mean(1)
        se = per_sample.std().item() / math.sqrt(samples)
        assert abs(per_sample.mean().item() - expected) < K * se


def test_mean_is_kept_for_every_element() -> None:
    p, samples = 0.4, 3000
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    out = drop_block_2d(x.expand(samples, -1, -1, -1), p, 2)
    se = x.abs()[0] * math.sqrt(p / (1 - p) / samples)
    z = ((out.mean(0) - x[0]).abs() / se).max().item()
    assert z < K_MANY


@pytest.mark.parametrize(("i", "j"), [(0, 0), (2, 5), (7, 7), (9, 3)])
@pytest.mark.parametrize("block_size", [3, 4])
def test_one_seed_drops_one_square(i: int, j: int, block_size: int) -> None:
    h = w = 8
    seeds = torch.zeros(1, 1, h + block_size - 1, w + block_size - 1)
    seeds[0, 0, i, j] = 1.0
    dropped = _expand_seeds(seeds, block_size)[0, 0]
    expected = torch.zeros(h, w)
    # The seed at padded (i, j) is the bottom-right corner of rows/cols i-b+1 .. i of the map.
    expected[max(0, i - block_size + 1) : i + 1, max(0, j - block_size + 1) : j + 1] = 1.0
    assert torch.equal(dropped, expected)


@pytest.mark.parametrize("block_size", [3, 4])
def test_dropped_region_is_a_union_of_full_squares(block_size: int) -> None:
    # Morphological opening: every dropped unit must lie in some block_size² square (possibly
    # hanging over the border) that is dropped entirely.
    dropped = _drop_masks(200, 12, 12, 0.1, block_size).unsqueeze(1)
    pad = block_size - 1
    outside_counts_as_dropped = F.pad(dropped, (pad, pad, pad, pad), value=1.0)
    fully_dropped_squares = -F.max_pool2d(-outside_counts_as_dropped, block_size, stride=1)
    assert dropped.sum() > 0
    assert torch.equal(_expand_seeds(fully_dropped_squares, block_size), dropped)


def test_channels_independent_by_default_and_shared_on_request() -> None:
    x = torch.ones(16, 4, 10, 10)
    own = drop_block_2d(x, 0.3, 3)
    assert not all(torch.equal(own[:, 0], own[:, c]) for c in range(1, 4))
    shared = drop_block_2d(x, 0.3, 3, shared_channels=True)
    assert all(torch.equal(shared[:, 0], shared[:, c]) for c in range(1, 4))


def test_identity_in_eval_and_at_p_zero() -> None:
    x = torch.randn(2, 3, 5, 5)
    assert drop_block_2d(x, 0.5, 3, training=False) is x
    assert drop_block_2d(x, 0.0, 3) is x
    layer = DropBlock2d(0.5, 3).eval()
    assert layer(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_preserved(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 7, 5, dtype=dtype)
    out = DropBlock2d(0.3, 4)(x)
    assert out.dtype == dtype
    assert out.shape == x.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.7)


def test_generator_makes_the_mask_reproducible() -> None:
    x = torch.randn(2, 3, 9, 9)
    first = drop_block_2d(x, 0.3, 3, generator=torch.Generator().manual_seed(7))
    second = drop_block_2d(x, 0.3, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_gradcheck() -> None:
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def fixed_mask(inp: Tensor) -> Tensor:
        return drop_block_2d(inp, 0.3, 2, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(fixed_mask, (x,))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_p_is_refused_even_in_eval(p: float) -> None:
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"p must be finite and in \[0, 1\) .*, got"):
        drop_block_2d(x, p, 3, training=False)
    with pytest.raises(ValueError, match="p must be"):
        DropBlock2d(p, 3)


@pytest.mark.parametrize("p", [True, "0.1", torch.tensor(0.1)])
def test_p_of_the_wrong_type_is_refused(p: object) -> None:
    with pytest.raises(TypeError, match=r"p must be a real number, got"):
        drop_block_2d(torch.randn(1, 1, 4, 4), p, 3, training=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("block_size", "error", "message"),
    [
        (0, ValueError, r"block_size must be an integer in \[1, inf\], got 0"),
        (-3, ValueError, r"block_size must be an integer in \[1, inf\], got -3"),
        (2.0, TypeError, r"block_size must be an integer, got 2.0"),
        (True, TypeError, r"block_size must be an integer, got True"),
    ],
)
def test_bad_block_size_is_refused(
    block_size: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        drop_block_2d(torch.ones(1, 1, 4, 4), 0.1, block_size)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        DropBlock2d(0.1, block_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5), (2, 3, 0, 5)])
def test_an_empty_input_gives_an_empty_output(shape: tuple[int, ...]) -> None:
    # Zero channels used to fail inside max_pool2d.
    x = torch.empty(shape)
    out = DropBlock2d(0.3, 3).train()(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_input_is_refused_in_both_modes(dtype: torch.dtype) -> None:
    # int64 input used to come back as float32.
    x = torch.ones(1, 1, 4, 4, dtype=dtype)
    for training in (True, False):
        with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype"):
            drop_block_2d(x, 0.3, 3, training=training)


def test_non_4d_input_is_refused_with_its_shape() -> None:
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 4\)"):
        drop_block_2d(torch.ones(3, 4, 4), 0.1, 3, training=False)


def test_module_repr_and_fx_trace() -> None:
    layer = DropBlock2d(0.2, 5, shared_channels=True)
    assert "p=0.2" in repr(layer)
    assert "block_size=5" in repr(layer)
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1), layer).eval())
    x = torch.randn(1, 2, 6, 6)
    assert torch.equal(traced(x), traced.get_submodule("0")(x))


# -- schedule ---------------------------------------------------------------------------------


def test_schedule_ramps_linearly_and_clamps() -> None:
    values = [drop_block_schedule(s, start_p=0.1, end_p=0.3, total_steps=4) for s in range(7)]
    expected = [0.1, 0.15, 0.2, 0.25, 0.3, 0.3, 0.3]
    assert values == pytest.approx(expected)
    assert drop_block_schedule(5, end_p=0.2, total_steps=10) == pytest.approx(0.1)
    # A decreasing ramp is allowed.
    assert drop_block_schedule(1, start_p=0.4, end_p=0.0, total_steps=2) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1}, r"step must be an integer in \[0, inf\], got -1"),
        ({"total_steps": 0}, r"total_steps must be an integer in \[1, inf\], got 0"),
        ({"end_p": 1.0}, r"end_p must be finite and in \[0, 1\) .*, got 1.0"),
        ({"start_p": -0.2}, "start_p must be"),
    ],
)
def test_schedule_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"step": 0, "start_p": 0.0, "end_p": 0.2, "total_steps": 5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        drop_block_schedule(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"step": 1.5}, {"step": True}, {"total_steps": 5.0}, {"end_p": False}]
)
def test_schedule_arguments_of_the_wrong_type_raise_type_error(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"step": 0, "start_p": 0.0, "end_p": 0.2, "total_steps": 5}
    args.update(kwargs)
    with pytest.raises(TypeError, match=rf"{next(iter(kwargs))} must be"):
        drop_block_schedule(**args)  # type: ignore[arg-type]


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), DropBlock2d(0.5, 3), nn.Sequential(nn.ReLU(), DropBlock2d(0.5, 2))
    )


def _scheduled_ps(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, DropBlock2d)]


def test_scheduler_sets_every_dropblock() -> None:
    model = _model()
    scheduler = DropBlockScheduler(model, end_p=0.2, total_steps=4)
    assert _scheduled_ps(model) == [0.0, 0.0]
    for step in range(1, 7):
        scheduler.step()
        expected = drop_block_schedule(step, end_p=0.2, total_steps=4)
        assert _scheduled_ps(model) == [expected, expected]
        assert scheduler.p == expected


def test_scheduler_resumes_from_state_dict() -> None:
    model = _model()
    scheduler = DropBlockScheduler(model, start_p=0.05, end_p=0.25, total_steps=10)
    for _ in range(3):
        scheduler.step()
    state = scheduler.state_dict()

    resumed_model = _model()
    resumed = DropBlockScheduler(resumed_model, end_p=0.9, total_steps=2)
    resumed.load_state_dict(state)
    assert _scheduled_ps(resumed_model) == _scheduled_ps(model)
    for _ in range(4):
        scheduler.step()
        resumed.step()
        assert _scheduled_ps(resumed_model) == _scheduled_ps(model)
    assert resumed.state_dict() == scheduler.state_dict()


def test_scheduler_takes_a_list_and_validates() -> None:
    blocks = [DropBlock2d(0.1, 3), DropBlock2d(0.1, 3)]
    DropBlockScheduler(blocks, start_p=0.02, end_p=0.1, total_steps=3)
    assert [b.p for b in blocks] == [0.02, 0.02]
    with pytest.raises(TypeError, match="only DropBlock2d, got Conv2d"):
        DropBlockScheduler([nn.Conv2d(1, 1, 1)], end_p=0.1, total_steps=3)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one DropBlock2d to schedule, got none"):
        DropBlockScheduler(nn.Linear(2, 2), end_p=0.1, total_steps=3)
    with pytest.raises(ValueError, match="total_steps must be"):
        DropBlockScheduler(blocks, end_p=0.1, total_steps=0)


def test_scheduler_rejects_a_bad_state_and_stays_intact() -> None:
    scheduler = DropBlockScheduler(_model(), end_p=0.2, total_steps=4)
    scheduler.step()
    before = scheduler.state_dict()
    with pytest.raises(ValueError, match=r"state_dict must hold .*missing keys \['end_p'"):
        scheduler.load_state_dict({"last_step": 2})
    with pytest.raises(ValueError, match="end_p must be"):
        scheduler.load_state_dict({**before, "end_p": 2.0})
    assert scheduler.state_dict() == before


# -- registry ---------------------------------------------------------------------------------


def test_registered_as_bernoulli_noise_following_the_schedule() -> None:
    layer = DropBlock2d(0.2, 3)
    assert is_stochastic(layer)
    assert noise_spec(layer) == NoiseSpec("bernoulli", {"p": 0.2})
    DropBlockScheduler([layer], start_p=0.05, end_p=0.1, total_steps=2)
    assert noise_spec(layer) == NoiseSpec("bernoulli", {"p": 0.05})


@pytest.mark.parametrize(
    ("args", "kwargs", "expected_p"),
    [
        ((0.3, 5), {}, 0.3),
        ((0.3, 5, False), {}, 0.0),
        ((), {"block_size": 3}, 0.1),
        ((0.25,), {"training": True, "shared_channels": True}, 0.25),
    ],
)
def test_functional_call_spec_reads_p_and_training_wherever_passed(
    args: tuple[object, ...], kwargs: dict[str, object], expected_p: float
) -> None:
    x = torch.ones(1, 1, 4, 4)
    assert is_stochastic_function(drop_block_2d)
    spec = function_noise_spec(drop_block_2d, (x, *args), kwargs)
    assert spec == NoiseSpec("bernoulli", {"p": expected_p})


def test_traced_call_carries_its_spec() -> None:
    traced = torch.fx.symbolic_trace(nn.Sequential(DropBlock2d(0.15, 3)))
    calls = [node for node in traced.graph.nodes if node.op == "call_function"]
    assert [node.target for node in calls] == [drop_block_2d]
    spec = function_noise_spec(calls[0].target, calls[0].args, calls[0].kwargs)
    assert spec == NoiseSpec("bernoulli", {"p": 0.15})


def test_torch_compile_fullgraph_keeps_the_drop_rate() -> None:
    # backend="eager" checks that dynamo captures the whole layer without needing a C compiler;
    # compiled random numbers differ from eager ones, so compare statistics, not values.
    p, samples = 0.3, 2000
    compiled = torch.compile(DropBlock2d(p, 3), backend="eager", fullgraph=True)
    dropped = (compiled(torch.ones(samples, 1, 9, 9)) == 0).double().flatten(1).mean(1)
    se = dropped.std().item() / math.sqrt(samples)
    assert abs(dropped.mean().item() - p) < K * se
