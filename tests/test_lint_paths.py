"""lint's two tracers, the fx path and the hook fallback, answer alike on a model both follow:
the same findings and the same predictions, to the last bit. The hook fallback predicts on a
trace that keeps torch.nn's modules whole, with the fx path's stops (the noise is followed to
the first normalization it meets) and Monte Carlo seed; as on the fx path, one Monte Carlo run
with every source on stands for each source alone. Where fx cannot trace the model at all, the
eager Monte Carlo stops the noise at the first normalization too."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from helpers.noise_nets import images, measured, stem
from varshift.diagnose import LintReport, lint


class TwoDropsOnATrunk(nn.Module):
    """Two residual blocks whose dropped branches join one trunk; the trunk reaches ``bn``
    through a ReLU (Monte Carlo, both sources) and ``bn_mid`` directly (exact). ``bn_mid``
    feeds the second branch: the noise of ``drop_a`` stops there on that route."""

    def __init__(self, untraceable: bool = False) -> None:
        super().__init__()
        self.stem = stem()
        self.conv_a, self.drop_a = nn.Conv2d(8, 8, 3, padding=1), nn.Dropout(0.2)
        self.bn_mid = nn.BatchNorm2d(8)
        self.conv_b, self.drop_b = nn.Conv2d(8, 8, 3, padding=1), nn.Dropout2d(0.3)
        self.head, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.untraceable = untraceable

    def forward(self, x: Tensor) -> Tensor:
        if self.untraceable and x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 1
        h = self.stem(x)
        h = h + self.drop_a(self.conv_a(h))
        h = h + self.drop_b(self.conv_b(torch.relu(self.bn_mid(h))))
        return self.bn(self.head(torch.relu(h)))  # type: ignore[no-any-return]


class DenseTwo(nn.Module):
    """The dropped features reach ``bn2`` by concatenation and through ``bn1 → relu → conv``;
    with ``clean_branch`` the second route sees no noise (what stopping at ``bn1`` means)."""

    def __init__(self, clean_branch: bool = False, untraceable: bool = False) -> None:
        super().__init__()
        self.stem, self.drop = stem(), nn.Dropout(0.3)
        self.bn1, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.clean_branch, self.untraceable = clean_branch, untraceable

    def forward(self, x: Tensor) -> Tensor:
        if self.untraceable and x.sum() > 0:
            x = x * 1
        h = self.stem(x)
        d = self.drop(h)
        new = self.conv(torch.relu(self.bn1(h if self.clean_branch else d)))
        return self.bn2(torch.cat([d, new], 1))  # type: ignore[no-any-return]


def answers(report: LintReport) -> tuple[object, object]:
    findings = [(f.bn, f.source, f.predicted_shift, f.exact, f.stderr) for f in report.findings]
    predictions = {
        bn: (p.sources, p.shift, p.exact, p.stderr) for bn, p in report.predictions.items()
    }
    return findings, predictions


def assert_same_answers(model: nn.Module, x: Tensor) -> LintReport:
    by_fx, by_hooks = lint(model, x, method="fx"), lint(model, x, method="hooks")
    assert (by_fx.method, by_hooks.method) == ("fx", "hooks")
    assert answers(by_fx) == answers(by_hooks)
    return by_fx


def test_same_exact_and_estimated_predictions_on_both_paths() -> None:
    report = assert_same_answers(TwoDropsOnATrunk(), images(n=16))
    bases = {(f.bn, f.source): f.basis for f in report.findings}
    assert bases == {
        ("bn_mid", "drop_a"): "exact",
        ("bn", "drop_a"): "estimated",
        ("bn", "drop_b"): "estimated",
    }


def test_noise_stops_at_the_first_batchnorm_on_both_paths() -> None:
    # bn2's noise through bn1 is not followed: exact by concatenation alone, on both paths.
    report = assert_same_answers(DenseTwo(), images(n=16))
    (second,) = [f for f in report.findings if f.bn == "bn2"]
    assert second.basis == "exact"


def test_same_answers_on_a_torchvision_model() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.efficientnet_b0(stochastic_depth_prob=0.2)
    report = assert_same_answers(model, torch.randn(2, 3, 32, 32))
    assert report.findings


def test_untraceable_model_stops_the_noise_at_the_first_batchnorm() -> None:
    # Eager Monte Carlo: bn2 sees the dropout by concatenation only, as in a model whose bn1
    # gets the clean features; followed through bn1 and the ReLU (as the eager run once did),
    # the estimate came out 0.14 lower.
    net, x = DenseTwo(untraceable=True), images()
    report = lint(net, x)
    assert report.method == "hooks"
    (second,) = [f for f in report.findings if f.bn == "bn2"]
    reference = DenseTwo(clean_branch=True)
    reference.load_state_dict(net.state_dict())
    truth = measured(reference, x, "bn2", [reference.drop])
    assert second.basis == "estimated"
    assert second.stderr is not None
    assert second.predicted_shift is not None
    assert abs(second.predicted_shift - truth) <= max(0.02, 4 * second.stderr)


def test_untraceable_model_gets_one_estimate_for_all_its_sources() -> None:
    # As on the fx path: one Monte Carlo run with every source on stands for each alone.
    report = lint(TwoDropsOnATrunk(untraceable=True), images(n=16))
    assert report.method == "hooks"
    shifts = {f.source: (f.predicted_shift, f.stderr) for f in report.findings if f.bn == "bn"}
    assert set(shifts) == {"drop_a", "drop_b"}
    assert shifts["drop_a"] == shifts["drop_b"]
    combined = report.predictions["bn"]
    assert (combined.shift, combined.stderr) == shifts["drop_a"]
    assert set(combined.sources) == {"drop_a", "drop_b"}


def test_untraceable_twin_matches_the_fx_path_estimate() -> None:
    # The same modules run in the same order from the same seed: the eager estimate is the
    # fx path's, to rounding.
    traced, untraced = TwoDropsOnATrunk(), TwoDropsOnATrunk(untraceable=True)
    untraced.load_state_dict(traced.state_dict())
    x = images(n=16)
    by_fx, by_eager = lint(traced, x).predictions["bn"], lint(untraced, x).predictions["bn"]
    assert by_fx.shift is not None
    assert by_eager.shift is not None
    assert by_eager.shift == pytest.approx(by_fx.shift, abs=1e-9)
    assert by_eager.stderr == pytest.approx(by_fx.stderr, abs=1e-9)
