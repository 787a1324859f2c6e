"""ChannelMoments' fast paths give the numbers of the straightforward computation: the unshifted
sums of large CPU batches (with ill-conditioned channels summed again about their mean), the
deferred nan/inf check over many layers at once, and measure on batches large enough to take
that path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from varshift.diagnose import bn_stats, measure
from varshift.diagnose.bn_stats import ChannelMoments


def _reference(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of the concatenated batches, in float64."""
    x = torch.cat(batches).double()
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1)


def _hard_batches(seed: int, count: int = 5) -> list[Tensor]:
    """float32 ``[4, 6, 64, 64]`` batches (above the small-batch size) whose channels range
    from centred to a mean 1e4 times the standard deviation, plus a constant channel."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 3.0, 0.5, 1.0, 1.0, 0.0])[:, None, None]
    offset = torch.tensor([0.0, 1.0, -2.0, 30.0, -1e4, 7.0])[:, None, None]
    return [torch.randn(4, 6, 64, 64, generator=generator) * scale + offset for _ in range(count)]


def _moments_of(batches: list[Tensor]) -> ChannelMoments:
    moments = ChannelMoments()
    for batch in batches:
        moments.add(batch)
    return moments


def test_the_unshifted_sums_match_the_float64_statistics_on_every_channel() -> None:
    batches = _hard_batches(0)
    assert batches[0].numel() > bn_stats._SMALL_BATCH  # the path under test
    mean, var = _moments_of(batches).result()
    expected_mean, expected_var = _reference(batches)
    # float32 data: the mean to a few float32 ulps of its size, the variance to ~1e-6.
    torch.testing.assert_close(mean, expected_mean, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(var, expected_var, rtol=2e-6, atol=1e-9)


def test_both_cpu_paths_and_any_batch_split_give_the_same_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches = _hard_batches(1, count=4)
    fast = _moments_of(batches).result()
    resplit = _moments_of(list(torch.split(torch.cat(batches), 3))).result()  # 3, 3, ..., 1 samples
    monkeypatch.setattr(bn_stats, "_SMALL_BATCH", 1 << 40)  # every batch takes the shifted path
    shifted = _moments_of(batches).result()
    for other in (resplit, shifted):
        torch.testing.assert_close(other[0], fast[0], rtol=1e-7, atol=1e-6)
        torch.testing.assert_close(other[1], fast[1], rtol=2e-6, atol=1e-9)


def test_batches_of_one_observation_per_channel_are_not_flagged() -> None:
    """One sample of many channels: each batch has no spread of its own, not a nan one."""
    batches = [torch.randn(1, 70_000) * 3 + 5 for _ in range(2)]
    assert batches[0].numel() > bn_stats._SMALL_BATCH
    moments = _moments_of(batches)
    assert moments.finite
    mean, var = moments.result()
    expected_mean, expected_var = _reference(batches)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(8, 4), (2, 4, 200, 200)], ids=["small", "large"])
def test_a_group_check_finds_each_culprit_and_the_flag_stays(size: tuple[int, ...]) -> None:
    good, bad, later = ChannelMoments(), ChannelMoments(), ChannelMoments()
    for moments in (good, bad, later):
        moments.add(torch.randn(size))
    assert ChannelMoments.all_finite([good, bad, later])
    poisoned = torch.randn(size)
    poisoned[0, 1] = float("nan")
    bad.add(poisoned)
    good.add(torch.randn(size))
    assert not ChannelMoments.all_finite([good, bad, later])
    assert good.finite
    assert later.finite
    assert not bad.finite
    bad.add(torch.randn(size))  # a finite batch later does not clear it
    assert not ChannelMoments.all_finite([bad])
    assert not bad.finite


def test_unchecked_summaries_stay_bounded_without_a_check() -> None:
    moments = ChannelMoments()
    for _ in range(3 * bn_stats._MERGE_EVERY):
        moments.add(torch.randn(2, 3))
    assert len(moments._unchecked) <= bn_stats._MERGE_EVERY
    moments.add(torch.tensor([[float("inf"), 0.0, 0.0], [1.0, 2.0, 3.0]]))
    for _ in range(2 * bn_stats._MERGE_EVERY):  # merged (and checked) before it is forgotten
        moments.add(torch.randn(2, 3))
    assert not moments.finite


def _conv_net() -> nn.Sequential:
    """Conv-BN blocks with dropout before the second BN; BN inputs of 8x16x32x32 (above the
    small-batch size) with channels far from centred, as in trained networks."""
    torch.manual_seed(0)
    first = nn.Conv2d(3, 16, 3, padding=1)
    assert first.bias is not None
    with torch.no_grad():
        first.bias.copy_(torch.linspace(-20.0, 20.0, 16))  # means up to ~40 std
    model = nn.Sequential(
        first,
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Dropout(0.3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    return model


def _inputs_in_mode(model: nn.Module, data: list[Tensor], train: bool) -> list[list[Tensor]]:
    """Every BatchNorm's inputs over ``data`` with the whole model in train or eval mode (BN
    statistics left as they were)."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: list[list[Tensor]] = [[] for _ in norms]
    for norm, store in zip(norms, seen):
        norm.register_forward_pre_hook(lambda m, a, store=store: store.append(a[0].clone()))
    model.train(train)
    with torch.no_grad():
        for x in data:
            model(x)
    return seen


def test_measure_on_large_batches_equals_the_direct_computation() -> None:
    model = _conv_net()
    data = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    torch.manual_seed(7)
    report = measure(model, data, recalibrate=False, progress=False)
    eval_inputs = _inputs_in_mode(model, data, train=False)
    torch.manual_seed(7)  # the same noise draws, in the same order as measure's
    train_inputs = _inputs_in_mode(model, data, train=True)
    assert eval_inputs[1][0].numel() > bn_stats._SMALL_BATCH
    for layer, evals, trains in zip(report.layers, eval_inputs, train_inputs):
        for (mean, var), (expected_mean, expected_var) in (
            ((layer.eval_mean, layer.eval_var), _reference(evals)),
            ((layer.train_mean, layer.train_var), _reference(trains)),
        ):
            torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-9)
