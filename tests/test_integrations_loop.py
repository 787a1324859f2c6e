"""varshift.integrations: the framework-free re-estimation for hand-written loops."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.recipes import runnable_example
from varshift.fix import recalibrate_bn
from varshift.integrations import PeriodicRecalibration, Recalibration, Recalibrator


def _net(seed: int = 0, p: float = 0.5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.Dropout(p),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Dropout(p),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def _trained(seed: int = 0) -> tuple[nn.Sequential, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A net whose moving averages were accumulated with dropout on, and its data."""
    net = _net(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, generator=generator)
    y = torch.randint(0, 4, (1024,), generator=generator)
    data = list(zip(x.split(128), y.split(128)))
    net.train()
    with torch.no_grad():
        for _ in range(5):
            for inputs, _ in data:
                net(inputs)
    return net, data


def _buffers(bn: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in bn.buffers()]


def test_run_matches_recalibrate_bn_and_reports_the_inflated_variance() -> None:
    net, data = _trained()
    expected = recalibrate_bn(copy.deepcopy(net), data, progress=False)
    record = Recalibrator().run(net, data, step=7)
    for name in ("2", "6"):
        torch.testing.assert_close(
            net.get_submodule(name).running_var, expected.get_submodule(name).running_var
        )
    assert record.layers == ("2", "6")
    assert record.step == 7
    # Inverted dropout with p = 0.5 inflates the variance of the BN input: the second moment
    # of each input doubles, so the variance at least doubles for a zero-mean input and grows
    # more for the positive ReLU outputs feeding the second layer. The stored averages carry
    # that inflation; the re-estimate does not. (1.2: far below 2, a safe margin for 1024
    # samples.)
    assert all(change > 1.2 for change in record.var_change)
    assert record.report is None
    assert set(record.metrics()) == {"varshift/var_change", "varshift/seconds"}


def test_measured_record_has_mismatch_before_and_about_one_after() -> None:
    net, data = _trained()
    record = Recalibrator(measure_batches=len(data)).run(net, data)
    metrics = record.metrics(prefix="m/")
    assert {
        "m/shift",
        "m/mismatch_before",
        "m/mismatch_after",
        "m/loss_before",
        "m/loss_after",
        "m/accuracy_before",
        "m/accuracy_after",
    } <= set(metrics)
    # Measured and re-estimated on the same batches with the same forward: identical estimates.
    assert metrics["m/mismatch_after"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["m/mismatch_before"] > 1.2
    assert metrics["m/shift"] < 0.9  # eval variance below the training-style one


def test_layers_keeps_every_other_batch_norm_untouched() -> None:
    net, data = _trained()
    untouched = _buffers(net[2])
    before = _buffers(net[6])
    record = Recalibrator(layers=["6"]).run(net, data)
    assert record.layers == ("6",)
    for old, new in zip(untouched, _buffers(net[2])):
        torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert not torch.equal(before[1], net[6].running_var)


def test_layers_accepts_a_parent_module_name() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.BatchNorm1d(4))
    assert [name for name, _ in Recalibrator(layers=["0"]).select(model)] == ["0.1"]
    assert [name for name, _ in Recalibrator(layers=[""]).select(model)] == ["0.1", "1"]


def test_unknown_layer_name_is_refused_with_the_names_that_exist() -> None:
    net, _ = _trained()
    with pytest.raises(ValueError, match=r"layers: 'head'.*\['2', '6'\]"):
        Recalibrator(layers=["head"]).select(net)
    with pytest.raises(ValueError, match=r"layers: '2\.0'"):
        Recalibrator(layers=["2.0"]).select(net)  # a prefix of a name is not a parent


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"samples": 0}, ValueError, "samples must be >= 1, got 0"),
        ({"batches": 1.5}, TypeError, "batches must be an int"),
        ({"measure_batches": -1}, ValueError, "measure_batches must be >= 0, got -1"),
        ({"samples": 8, "batches": 2}, ValueError, "samples or batches, not both"),
        ({"layers": "bn"}, TypeError, "not a string"),
        ({"layers": []}, ValueError, "at least one"),
    ],
)
def test_recalibrator_validates_its_settings(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Recalibrator(**kwargs)  # type: ignore[arg-type]


def test_every_module_mode_is_restored() -> None:
    net, data = _trained()
    net.train()
    net[1].eval()  # a frozen dropout, say: must stay as the caller left it
    modes = [m.training for m in net.modules()]
    Recalibrator(measure_batches=2).run(net, data)
    assert [m.training for m in net.modules()] == modes


def test_a_failing_run_leaves_the_excluded_batch_norm_as_it_was() -> None:
    net, data = _trained()
    untouched = _buffers(net[2])
    bad = [*data[:2], (torch.randn(8, 3), None)]  # the third batch has the wrong width
    with pytest.raises(RuntimeError):
        Recalibrator(layers=["6"]).run(net, bad)
    for old, new in zip(untouched, _buffers(net[2])):
        torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_periodic_recalibration_runs_on_multiples_of_every_once_each() -> None:
    net, data = _trained()
    recal = PeriodicRecalibration(net, data, every=3, batches=2)
    ran = [step for step in [0, 1, 2, 3, 3, 4, 5, 6] if recal.maybe_recalibrate(step)]
    assert ran == [3, 6]
    assert [record.step for record in recal.history] == [3, 6]
    final = recal.recalibrate(7)
    assert isinstance(final, Recalibration)
    assert recal.history[-1] is final


def test_periodic_recalibration_without_every_only_runs_when_asked() -> None:
    net, data = _trained()
    recal = PeriodicRecalibration(net, data)
    assert not any(recal.due(step) for step in range(10))
    assert recal.recalibrate().step is None


def test_periodic_recalibration_refuses_what_it_cannot_use() -> None:
    net, data = _trained()
    with pytest.raises(ValueError, match="re-iterable"):
        PeriodicRecalibration(net, iter(data))
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        PeriodicRecalibration(net, data, every=0)
    with pytest.raises(TypeError, match="every must be an int"):
        PeriodicRecalibration(net, data, every=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no BatchNorm"):
        PeriodicRecalibration(nn.Linear(16, 4), data)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        PeriodicRecalibration("net", data)  # type: ignore[arg-type]


def test_recipe_loop_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "recipe"}
    with torch.random.fork_rng():
        exec(compile(runnable_example("plain training loop"), "recipes.md", "exec"), namespace)
    recal = namespace["recal"]
    assert isinstance(recal, PeriodicRecalibration)
    last = namespace["step"]
    assert last == 3 * len(namespace["train"])  # type: ignore[arg-type]
    assert [r.step for r in recal.history] == [*range(20, last + 1, 20), last]
    assert (tmp_path / "model.pt").exists()
    assert math.isfinite(recal.history[-1].mean_var_change)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_importing_integrations_does_not_import_lightning() -> None:
    code = (
        "import sys, varshift.integrations; "
        "assert 'pytorch_lightning' not in sys.modules, 'lightning imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
