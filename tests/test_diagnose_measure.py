"""measure: the train/eval/running variances at each BatchNorm, with no lasting change."""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings

import pytest
import torch
from torch import Tensor, nn

from helpers.models_zoo import ZOO, RegistrationOrderNet
from varshift.diagnose import LayerShift, ShiftReport, measure
from varshift.fix import recalibrate_bn


def _dropout_bn(p: float = 0.4) -> nn.Sequential:
    """linear → ReLU → dropout → BN → linear → BN → linear: noise straight into the first BN."""
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.Dropout(p),
        nn.BatchNorm1d(8),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 3),
    )


def _bn_input_variance(model: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
    """Unbiased per-channel variance of ``bn``'s input in one forward in the current modes."""
    seen: list[Tensor] = []
    handle = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return torch.cat(seen).var(dim=0)


def _state(model: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[object], Tensor]:
    return (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [getattr(m, "momentum", None) for m in model.modules()],
        torch.get_rng_state(),
    )


@pytest.mark.parametrize("train", [True, False])
def test_leaves_no_trace_on_the_model_or_the_random_state(train: bool) -> None:
    model = _dropout_bn()
    model.train(train)
    model[2].train(not train)  # mixed flags come back as they were
    model[5].momentum = None
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    before = _state(model)
    measure(model, list(zip(x.split(32), y.split(32))), progress=False)
    after = _state(model)
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert before[1:3] == after[1:3]
    assert torch.equal(before[3], after[3])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_state_is_restored_when_the_forward_raises() -> None:
    class Boom(nn.Module):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            Boom.calls += 1
            if Boom.calls == 4:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), Boom(), nn.Dropout(), nn.Linear(5, 2))
    data = list(torch.randn(60, 4).split(20))
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        measure(model, data, progress=False)
    after = _state(model)
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert before[1:3] == after[1:3]
    assert torch.equal(before[3], after[3])


def test_variances_equal_direct_computations_in_each_mode() -> None:
    model = _dropout_bn()
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(64, 6))  # running statistics of a briefly trained model
    x = torch.randn(256, 6)
    batches = list(x.split(64))
    torch.manual_seed(123)
    report = measure(model, batches, progress=False, recalibrate=False)
    first, second = report.layers
    # Eval forward: exactly model.eval().
    model.eval()
    torch.testing.assert_close(first.eval_var, _bn_input_variance(model, model[3], x))
    torch.testing.assert_close(second.eval_var, _bn_input_variance(model, model[5], x))
    # Training-style forward: same noise draws as measure's (same seed, same order of draws),
    # BatchNorm on batch statistics; measure must not have stored them.
    stored = copy.deepcopy(model.state_dict())
    model.train()
    torch.manual_seed(123)
    seen: list[Tensor] = []
    handle = model[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    model.load_state_dict(stored)
    torch.testing.assert_close(first.train_var, torch.cat(seen).var(dim=0))
    torch.testing.assert_close(first.running_var, model[3].running_var.double())
    # The paper's figure of merit, by hand.
    by_hand = torch.maximum(
        first.eval_var / first.running_var, first.running_var / first.eval_var
    ).mean()
    assert first.figure_of_merit == pytest.approx(float(by_hand))
    torch.testing.assert_close(first.ratio, first.eval_var / first.train_var)


def test_ratio_follows_the_papers_formula_for_dropout_before_bn() -> None:
    """Δ = v / ((c² + v)/q − c²) per channel (Li et al. 2019), within the sampling error."""
    p, n = 0.4, 16000
    model = _dropout_bn(p)
    x = torch.randn(n, 6)
    report = measure(model, list(x.split(500)), recalibrate=False, progress=False)
    layer = report.layers[0]
    c, v, q = layer.eval_mean, layer.eval_var, 1 - p
    predicted_train = (c.square() + v) / q - c.square()
    with torch.no_grad():  # sampling error of a variance estimate: sd((y − ȳ)²)/sqrt(n)
        noisy = nn.functional.relu(model[0](x)).double() * (torch.rand(n, 8) < q) / q
    stderr = (noisy - noisy.mean(0)).square().std(0) / math.sqrt(n)
    assert ((layer.train_var - predicted_train).abs() < 5 * stderr).all()
    assert (layer.ratio < 1).all()


def test_precise_statistics_and_accuracy_after_match_recalibrate_bn() -> None:
    model = _dropout_bn()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 6) * 2)  # stale: statistics of other data
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    data = list(zip(x.split(50), y.split(50)))
    report = measure(model, data, progress=False)
    recalibrated = recalibrate_bn(copy.deepcopy(model), data, progress=False)
    for layer, bn in zip(report.layers, (recalibrated[3], recalibrated[5])):
        assert layer.precise_var is not None
        torch.testing.assert_close(layer.precise_var, bn.running_var.double(), rtol=1e-5, atol=1e-7)

    def evaluate(m: nn.Module) -> tuple[float, float]:
        m.eval()
        with torch.no_grad():
            out = m(x)
        loss = float(nn.functional.cross_entropy(out, y))
        return loss, float((out.argmax(1) == y).float().mean())

    loss_before, acc_before = evaluate(copy.deepcopy(model))
    loss_after, acc_after = evaluate(recalibrated)
    assert report.loss_before == pytest.approx(loss_before, rel=1e-5)
    assert report.accuracy_before == pytest.approx(acc_before)
    assert report.loss_after == pytest.approx(loss_after, rel=1e-4)
    assert report.accuracy_after == pytest.approx(acc_after)


def test_separates_staleness_from_the_dropout_shift() -> None:
    # Dropout only after the last BN: no noise shift, but a stale moving average.
    stale = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    x = torch.randn(4000, 6)
    data = list(x.split(500))
    recalibrate_bn(stale, data, progress=False)
    with torch.no_grad():
        stale[1].running_var.mul_(2.0)
    layer = measure(stale, data, progress=False).layers[0]
    assert layer.staleness == pytest.approx(2.0, rel=1e-4)
    assert layer.inference_mismatch == pytest.approx(2.0, rel=1e-4)
    assert layer.noise_shift == pytest.approx(1.0, rel=1e-6)
    assert layer.mean_ratio == pytest.approx(1.0, rel=1e-6)
    # Dropout before BN with a fresh moving average (statistics of the noisy input): no
    # staleness, all of the mismatch is the noise. Tolerance: a few standard errors of a
    # variance estimate from 4000 samples with dropout noise.
    noisy = _dropout_bn(0.5)[:4]
    recalibrate_bn(noisy, data, keep_noise=True, progress=False)
    layer = measure(noisy, data, progress=False).layers[0]
    assert layer.staleness == pytest.approx(1.0, abs=0.1)
    assert layer.noise_shift is not None
    assert layer.noise_shift < 0.75
    assert layer.inference_mismatch is not None
    assert layer.inference_mismatch > 1.3


def test_eval_and_precise_statistics_do_not_depend_on_the_batch_split() -> None:
    model = _dropout_bn()[:4]  # one BN: its input does not depend on another BN's batch stats
    x = torch.randn(150, 6) + 2
    reports = [measure(model, list(x.split(size)), progress=False) for size in (7, 64, 150)]
    for report in reports[1:]:
        for a, b in zip(reports[0].layers, report.layers):
            torch.testing.assert_close(a.eval_var, b.eval_var, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(a.eval_mean, b.eval_mean, rtol=1e-5, atol=1e-6)
            assert a.precise_var is not None
            assert b.precise_var is not None
            torch.testing.assert_close(a.precise_var, b.precise_var, rtol=1e-5, atol=1e-8)
    assert [r.samples for r in reports] == [150] * 3
    assert [r.batches for r in reports] == [22, 3, 1]


def test_depth_follows_the_forward_not_the_registration_order() -> None:
    report = measure(RegistrationOrderNet(), torch.randn(64, 8), progress=False)
    assert [(layer.depth, layer.name) for layer in report.layers] == [
        (0, "second_bn"),
        (1, "first_bn"),
    ]


@pytest.mark.parametrize(
    "case", [c for c in ZOO if "norm" not in c.name and c.flagged], ids=lambda c: c.name
)
def test_zoo_bns_fed_by_noise_lose_variance_at_eval(case: object) -> None:
    model = case.build()  # type: ignore[attr-defined]
    data = [case.example() for _ in range(8)]  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # data_dependent: one branch never runs on this data
        report = measure(model, data, recalibrate=False, progress=False)
    for name in case.flagged:  # type: ignore[attr-defined]
        assert report.layer(name).mean_ratio < 1.0, name


def test_data_formats_dicts_generators_and_a_bare_tensor() -> None:
    model = _dropout_bn()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    reference = measure(model, list(zip(x.split(16), y.split(16))), progress=False)
    dicts = measure(
        model,
        ({"pixels": a, "cls": b} for a, b in zip(x.split(16), y.split(16))),  # one-shot
        batches=4,  # a one-shot iterator is kept for the "after" pass: it needs a bound
        input_fn=lambda item: item["pixels"],
        target_fn=lambda item: item["cls"],
        progress=False,
    )
    assert dicts.accuracy_after == reference.accuracy_after
    assert dicts.loss_before == pytest.approx(reference.loss_before)
    for a, b in zip(reference.layers, dicts.layers):
        torch.testing.assert_close(a.eval_var, b.eval_var)
    bare = measure(model, x, progress=False)
    assert bare.batches == 1
    assert bare.samples == 64
    assert bare.loss_before is None
    keyed = measure(model, [{"input": x}], batches=1, progress=False)
    assert keyed.samples == 64


def test_report_table_json_and_records() -> None:
    report = measure(_dropout_bn(), torch.randn(64, 6), progress=False)
    assert isinstance(report, ShiftReport)
    assert all(isinstance(layer, LayerShift) for layer in report.layers)
    text = str(report)
    assert "eval/train" in text
    assert "\n    0  3 " in text
    data = json.loads(report.to_json())
    assert [layer["name"] for layer in data["layers"]] == ["3", "5"]
    assert len(data["layers"][0]["train_var_per_channel"]) == 8
    summary = report.layer("3").summary()
    assert summary["ratio"] == pytest.approx(report.layer("3").mean_ratio)
    with pytest.raises(KeyError, match="no BatchNorm named 'nope'"):
        report.layer("nope")


def test_plot_writes_a_figure(tmp_path: object) -> None:
    pytest.importorskip("matplotlib")
    report = measure(_dropout_bn(), torch.randn(64, 6), progress=False)
    path = report.plot(tmp_path / "shift.png")  # type: ignore[operator]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    report = measure(_dropout_bn(), torch.randn(64, 6), progress=False)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'varshift\[plot\]'"):
        report.plot("unused.png")


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        measure(nn.Sequential(nn.Linear(3, 3), nn.Dropout()), [torch.randn(4, 3)])
    with pytest.raises(ValueError, match="data is empty"):
        measure(_dropout_bn(), [], progress=False)
    with pytest.raises(ValueError, match="batches must be None or an integer >= 1, got 0"):
        measure(_dropout_bn(), [torch.randn(4, 6)], batches=0)
    with pytest.raises(ValueError, match="pass input_fn"):
        measure(_dropout_bn(), [{"pixels": torch.randn(4, 6)}], progress=False)


def test_a_batchnorm_that_never_runs_is_left_out_with_a_warning() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _dropout_bn()
            self.spare = nn.BatchNorm1d(3)  # registered, never called

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    model = WithSpare()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = measure(model, torch.randn(32, 6), progress=False)
    assert [layer.name for layer in report.layers] == ["body.3", "body.5"]
    assert any("['spare'] never ran" in str(w.message) for w in caught)


def test_tuple_and_dict_inputs_are_passed_as_positional_and_keyword_arguments() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _dropout_bn()

        def forward(self, x: Tensor, scale: Tensor) -> Tensor:
            return self.body(x * scale)

    model = TwoInputs()
    x, scale = torch.randn(64, 6), torch.full((64, 1), 3.0)
    positional = measure(model, [(x, scale)], input_fn=lambda item: item, progress=False)
    keywords = measure(model, [{"x": x, "scale": scale}], input_fn=lambda d: d, progress=False)
    direct = measure(model.body, [x * scale], progress=False)
    for report in (positional, keywords):
        torch.testing.assert_close(report.layers[0].eval_var, direct.layers[0].eval_var)
