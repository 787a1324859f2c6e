"""The Monte Carlo forwards recompute only what the noise changes (``NoisyRun(recorded=...)``)
and give the same estimate, to the last bit, as running every node; ``EagerStops`` stops the
noise at the first normalization in eager mode."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from varshift.diagnose import lint
from varshift.diagnose import noise_montecarlo as mc


class PreNormNet(nn.Module):
    """Pre-norm residual blocks (the branch starts at a BatchNorm, so only the trunk carries
    noise), a BatchNorm called twice, random noise drawn inline, and a dropout on a side branch
    that leads to no recorded BatchNorm but draws its masks before the others."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.side_drop = nn.Dropout(0.5)
        self.norm_a, self.conv_a = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.drop_a = nn.Dropout(0.2)
        self.norm_b, self.conv_b = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.drop_b = nn.Dropout2d(0.3)
        self.shared, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        side = self.side_drop(h).mean()
        h = h + self.drop_a(self.conv_a(torch.relu(self.norm_a(h))))
        h = h + 0.01 * torch.rand_like(h)
        h = h + self.drop_b(self.conv_b(torch.relu(self.norm_b(h))))
        clean = self.shared(self.stem(x))  # the shared BatchNorm once without noise
        return self.shared(self.head(torch.relu(h))) + clean + side  # type: ignore[no-any-return]


def _estimates(model: nn.Module, x: Tensor, reuse: bool) -> dict[str, mc.MonteCarloShift]:
    gm = mc.trace_with_leaves(model, set())
    modules = dict(model.named_modules())
    plan = mc.resolve_sources(gm, modules, None)
    norms = (nn.BatchNorm2d,)
    stops = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(
        modules[str(n.target)], norms)]
    names = ["norm_b", "shared"]
    recorded = [n for n in stops if str(n.target) in names] if reuse else None
    runner = mc.NoisyRun(gm, plan, (x,), None, stops, recorded)
    switches = [modules[str(n.target)] for n in plan if n.op == "call_module"]
    bns = {name: modules[name] for name in names}
    with mc.model_state_kept(model):
        return mc.monte_carlo_shifts(bns, switches, runner, draws=8, seed=3)


def test_reusing_the_noise_off_values_gives_the_same_estimate() -> None:
    torch.manual_seed(0)
    model, x = PreNormNet(), torch.randn(4, 3, 8, 8)
    reused, full = _estimates(model, x, reuse=True), _estimates(model, x, reuse=False)
    assert set(reused) == {"norm_b", "shared"}
    assert reused == full
    assert all(e.moved for e in reused.values())


def test_a_noise_on_run_skips_the_layers_the_noise_cannot_reach() -> None:
    torch.manual_seed(0)
    model, x = PreNormNet(), torch.randn(4, 3, 8, 8)
    calls: dict[str, int] = {}
    for name in ("conv_a", "conv_b", "head", "norm_a"):
        module = model.get_submodule(name)
        module.register_forward_pre_hook(
            lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
    _estimates(model, x, reuse=True)
    # conv_a starts from a BatchNorm of the clean stem; conv_b from a stop (norm_b); the head
    # leads to the recorded shared BatchNorm: only it runs again in the 8 noise-on forwards.
    assert calls == {"conv_a": 1, "conv_b": 1, "norm_a": 1, "head": 9}


def test_the_first_run_must_be_the_noise_off_one() -> None:
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4))
    gm = mc.trace_with_leaves(model, set())
    bn = next(n for n in gm.graph.nodes if str(n.target) == "1")
    runner = mc.NoisyRun(gm, {}, (torch.randn(8, 4),), (), (), [bn])
    with pytest.raises(RuntimeError, match="noise-off"):
        runner(True)


def test_eager_stops_pass_on_the_noise_off_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    model.eval()
    x = torch.randn(16, 4)
    seen: list[tuple[Tensor, Tensor]] = []
    handles = [
        model[2].register_forward_pre_hook(lambda m, a: seen.append(("bn1", a[0]))),
        model[3].register_forward_pre_hook(lambda m, a: seen.append(("bn2", a[0]))),
    ]
    with torch.no_grad(), mc.EagerStops([model[2]], lambda: model(x)) as runner:
        runner(False)
        model[1].train()
        runner(True)
    for handle in handles:
        handle.remove()
    (_, bn1_off), (_, bn2_off), (_, bn1_on), (_, bn2_on) = seen
    assert not torch.equal(bn1_off, bn1_on)  # the stop itself sees the noise
    assert torch.equal(bn2_off, bn2_on)  # and passes on its noise-off output
    assert not model[2]._forward_hooks  # removed on exit


class InPlaceResidual(nn.Module):
    """``out += noisy`` on the output of a BatchNorm that stops the noise (torchvision's
    ``Bottleneck`` writes ``out += identity``): the noise-off output it passes on must not
    collect the noise of every draw."""

    def __init__(self, inplace: bool, untraceable: bool = False) -> None:
        super().__init__()
        self.stem, self.drop = nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.3)
        self.conv, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.inplace, self.untraceable = inplace, untraceable

    def forward(self, x: Tensor) -> Tensor:
        if self.untraceable and x.sum() > 0:  # fx cannot trace it: the eager Monte Carlo
            x = x * 1
        h = self.drop(torch.relu(self.stem(x)))
        out = self.bn_a(self.conv(h))
        if self.inplace:
            out += h
        else:
            out = out + h
        return self.bn(self.head(torch.relu(out)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "eager"])
def test_writing_into_a_stopped_output_does_not_leak_between_draws(untraceable: bool) -> None:
    torch.manual_seed(0)
    in_place, out_of_place = InPlaceResidual(True, untraceable), InPlaceResidual(False)
    out_of_place.load_state_dict(in_place.state_dict())
    x = torch.randn(8, 3, 8, 8)
    got, want = lint(in_place, x).predictions["bn"], lint(out_of_place, x).predictions["bn"]
    assert got.exact is False
    assert got.shift == pytest.approx(want.shift, abs=1e-9)
