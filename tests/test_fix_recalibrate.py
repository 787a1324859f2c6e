"""recalibrate_bn: population statistics weighted by samples, dropout off, state restored."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from varshift.fix import recalibrate_bn


def _mlp(p: float = 0.5) -> nn.Sequential:
    """dropout → linear → BN → ReLU → dropout → linear → BN: both BNs fed by noise."""
    return nn.Sequential(
        nn.Linear(6, 12),
        nn.Dropout(p),
        nn.Linear(12, 10),
        nn.BatchNorm1d(10),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
        nn.Linear(10, 8),
        nn.BatchNorm1d(8),
    )


def _linear_bn(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out)]


def _convnet(p: float = 0.3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout2d(p),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
    )


def _bn_inputs(model: nn.Module, x: Tensor) -> dict[nn.Module, Tensor]:
    """The input of every BatchNorm in one eval-mode forward of ``x`` (float64)."""
    seen: dict[nn.Module, Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].double()))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(x)
    for m, flag in was:
        m.training = flag
    for h in handles:
        h.remove()
    return seen


def _population(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of ``Tensor[N, C, *]``, every position a sample."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


def _stats(model: nn.Module) -> list[Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("build", [_mlp, _convnet])
@pytest.mark.parametrize("exact", [False, True])
def test_statistics_do_not_depend_on_the_batch_split(build: type[nn.Module], exact: bool) -> None:
    model = build()
    shape = (150, 6) if build is _mlp else (150, 3, 5, 5)
    x = torch.randn(shape) * 2 + 3
    results = []
    for size in (7, 64, 150):
        recalibrated = recalibrate_bn(
            copy.deepcopy(model), list(x.split(size)), exact=exact, progress=False
        )
        results.append(_stats(recalibrated))
    # Without exact, a BN behind another BN sees inputs normalised by *batch* statistics,
    # which do depend on the batch size (as in training): only the first BN is split-free.
    compared = slice(None) if exact else slice(0, 2)
    for other in results[1:]:
        for a, b in zip(results[0][compared], other[compared]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_equals_population_statistics_of_the_bn_input() -> None:
    # A mean far from zero: E[x²] − mean² in float32 would lose digits; ours must not.
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    x = torch.randn(300, 4) + 40.0
    recalibrate_bn(model, list(x.split(32)), progress=False)
    with torch.no_grad():
        mean, var = _population(model[0](x))
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_a_small_last_batch_does_not_skew_the_estimate_as_update_bn_does() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.cat([torch.randn(64, 3), torch.randn(2, 3) + 10.0])  # two outliers, own batch
    ours = recalibrate_bn(copy.deepcopy(model), [x[:64], x[64:]], progress=False)
    theirs = copy.deepcopy(model)
    update_bn([x[:64], x[64:]], theirs)
    with torch.no_grad():
        mean, _ = _population(model[0](x))
    torch.testing.assert_close(ours[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    # update_bn gives the 2-sample batch the weight of the 64-sample one.
    assert (theirs[1].running_mean.double() - mean).abs().max() > 0.1


def test_samples_and_batches_limit_the_data() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.randn(200, 3)
    by_samples = recalibrate_bn(
        copy.deepcopy(model), list(x.split(64)), samples=100, progress=False
    )
    by_batches = recalibrate_bn(copy.deepcopy(model), list(x.split(50)), batches=2, progress=False)
    with torch.no_grad():
        mean, var = _population(model[0](x[:100]))
    for result in (by_samples, by_batches):
        torch.testing.assert_close(result[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result[1].running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_exact_matches_the_eval_mode_input_of_every_bn() -> None:
    model = nn.Sequential(*_linear_bn(5, 8), nn.ReLU(), nn.Dropout(0.4), *_linear_bn(8, 6))
    with torch.no_grad():  # stored statistics far from the truth, as after a short training
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(0.1)
    x = torch.randn(240, 5) * 1.5 + 0.5
    exact = recalibrate_bn(copy.deepcopy(model), list(x.split(50)), exact=True, progress=False)
    for bn, inputs in _bn_inputs(exact, x).items():
        mean, var = _population(inputs)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    # Without exact, the second BN saw batch-normalised inputs: close, but not equal.
    plain = recalibrate_bn(copy.deepcopy(model), list(x.split(50)), progress=False)
    assert not torch.allclose(plain[5].running_var, exact[5].running_var, rtol=1e-4)


class _Branches(nn.Module):
    """Two parallel conv-BN branches (the same depth level), added, then a third BN: two levels.
    Counts its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
        self.relu = nn.ReLU(inplace=True)
        self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        h = self.c(self.relu(self.a(x) + self.b(x)))
        return self.head(h.mean(dim=(2, 3)))


def test_exact_costs_one_pass_per_depth_level_and_is_exact_on_branches() -> None:
    model = _Branches()
    x = torch.randn(60, 2, 6, 6)
    batches = list(x.split(20))
    heads = []
    model.head.register_forward_hook(lambda *args: heads.append(1))
    recalibrate_bn(model, batches, exact=True, progress=False)
    # One traced forward on the first batch, then a pass per level (2 levels); the level-1
    # pass stops after its BatchNorm, so the head does not run there.
    assert model.forwards == 1 + 2 * len(batches)
    assert len(heads) == 1 + len(batches)
    for bn, inputs in _bn_inputs(model, x).items():
        mean, var = _population(inputs)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_exact_reads_a_one_shot_iterator_once() -> None:
    model = _mlp()
    x = torch.randn(90, 6)
    from_list = recalibrate_bn(copy.deepcopy(model), list(x.split(30)), exact=True, progress=False)
    from_generator = recalibrate_bn(
        copy.deepcopy(model), (b for b in x.split(30)), samples=90, exact=True, progress=False
    )
    for a, b in zip(_stats(from_list), _stats(from_generator)):
        torch.testing.assert_close(a, b)


class _Boom(nn.Module):
    """Raises on its third call, like a corrupt batch half-way through a loader."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("exact", [False, True])
def test_state_is_restored_when_the_forward_raises(exact: bool) -> None:
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.2),
        _Boom(),
        nn.Linear(6, 3),
        nn.BatchNorm1d(3, momentum=None),
    )
    model.train()
    model[2].eval()  # mixed flags must come back as they were
    model[1].num_batches_tracked.fill_(7)
    before_state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_bn(model, list(torch.randn(80, 4).split(20)), exact=exact, progress=False)
    assert [m.training for m in model.modules()] == flags
    assert model[1].momentum == 0.1
    assert model[5].momentum is None
    assert model[1].track_running_stats
    assert model[5].track_running_stats
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_flags_momenta_and_counters_are_kept_and_the_model_is_returned() -> None:
    model = _mlp()
    model[3].momentum = None
    model.train()
    counters = [model[3].num_batches_tracked.clone(), model[7].num_batches_tracked.clone()]
    with torch.no_grad():  # also under the caller's no_grad
        result = recalibrate_bn(model, [torch.randn(32, 6)], progress=False)
    assert result is model
    assert all(m.training for m in model.modules())
    assert model[3].momentum is None
    assert model[7].momentum == 0.1
    assert torch.equal(model[3].num_batches_tracked, counters[0])
    assert torch.equal(model[7].num_batches_tracked, counters[1])
    assert model[3].running_var.grad_fn is None


def test_data_as_tuples_and_dicts_with_input_fn() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    tuples = recalibrate_bn(
        copy.deepcopy(model), list(zip(x.split(16), y.split(16))), progress=False
    )
    dicts = recalibrate_bn(
        copy.deepcopy(model),
        [{"features": a, "label": b} for a, b in zip(x.split(16), y.split(16))],
        input_fn=lambda item: item["features"],
        progress=False,
    )
    single = recalibrate_bn(copy.deepcopy(model), x, progress=False)  # a tensor is one batch
    for other in (dicts, single):
        for a, b in zip(_stats(tuples), _stats(other)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_progress_bar_on_stderr_when_the_data_has_a_length(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recalibrate_bn(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), list(torch.randn(40, 3).split(10))
    )
    assert "recalibrate_bn" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batches": 0}, "batches must be None or an integer >= 1, got 0"),
        ({"samples": -3}, "samples must be None or an integer >= 1, got -3"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=message):
        recalibrate_bn(model, [torch.randn(8, 3)], progress=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("keep_noise", ["on", 1, None])
def test_keep_noise_must_be_a_bool(keep_noise: object) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="keep_noise must be a bool"):
        recalibrate_bn(model, [torch.randn(8, 3)], progress=False, keep_noise=keep_noise)  # type: ignore[arg-type]


def test_clear_errors_for_no_batchnorm_and_empty_data() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        recalibrate_bn(nn.Linear(3, 4), [torch.randn(8, 3)], progress=False)
    with pytest.raises(ValueError, match=r"lazy BatchNorm layer\(s\) \['1'\] are not initialised"):
        recalibrate_bn(nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d()), [torch.randn(8, 3)])
    with pytest.raises(ValueError, match="data is empty"):
        recalibrate_bn(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), [], progress=False)


# --- keep_noise=False against "on" (what torch.optim.swa_utils.update_bn does) ---------------


def _train_dropout_before_bn(x: Tensor, y: Tensor) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(10, 64), nn.ReLU()]
    for _ in range(2):  # BNs at indexes 4 and 8, each right after dropout → linear
        layers += [nn.Dropout(0.5), *_linear_bn(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_dropout_off_beats_dropout_on_on_a_trained_dropout_before_bn_model() -> None:
    centers = torch.randn(4, 10) * 1.2
    y = torch.randint(0, 4, (1200,))
    x = centers[y] + torch.randn(1200, 10)
    model = _train_dropout_before_bn(x[:800], y[:800])
    data = list(x[:800].split(100))
    off = recalibrate_bn(copy.deepcopy(model), data, keep_noise=False, progress=False)
    on = recalibrate_bn(copy.deepcopy(model), data, keep_noise=True, progress=False)
    # The shift itself: with dropout on, the stored variance is inflated (Var_train > Var_test).
    assert float((on[4].running_var / off[4].running_var).mean()) > 1.2
    assert _accuracy(off, x[800:], y[800:]) >= _accuracy(on, x[800:], y[800:])


def test_dropout_on_stores_the_noisy_input_variance() -> None:
    """Dropout straight into BN: Var_train = (c² + v)/q − c² (Li et al. 2019) with c, v the
    noise-free mean and variance; 'on' must store that, within its sampling error."""
    p, n = 0.4, 20000
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(p), nn.BatchNorm1d(8))
    x = torch.randn(n, 6)
    data = list(x.split(500))
    off = recalibrate_bn(copy.deepcopy(model), data, keep_noise=False, progress=False)
    on = recalibrate_bn(copy.deepcopy(model), data, keep_noise=True, progress=False)
    q = 1 - p
    c, v = off[3].running_mean.double(), off[3].running_var.double()
    predicted = (c.square() + v) / q - c.square()
    # Standard error of a variance estimate: sd((y − ȳ)²)/sqrt(n), from one noisy draw.
    with torch.no_grad():
        noisy = nn.functional.relu(model[0](x)).double() * (torch.rand(n, 8) < q) / q
    stderr = (noisy - noisy.mean(0)).square().std(0) / math.sqrt(n)
    assert ((on[3].running_var.double() - predicted).abs() < 5 * stderr).all()
