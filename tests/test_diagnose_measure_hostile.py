"""measure against hostile data and models: nan/inf, out-of-range labels, loaders that raise,
endless generators, non-modules, TorchScript and torch.compile. Every failure is one clear line
and leaves the model exactly as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers.endless import CountingBatches
from helpers.torchscript import TO_TORCHSCRIPT, TO_TORCHSCRIPT_IDS, TorchScriptConversion
from varshift.diagnose import measure


def _net() -> nn.Sequential:
    """linear → dropout → BN → linear → BN → linear (3 classes)."""
    return nn.Sequential(
        nn.Linear(3, 6),
        nn.Dropout(0.3),
        nn.BatchNorm1d(6),
        nn.Linear(6, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 3),
    )


def _labelled(n: int = 80, classes: int = 3) -> list[tuple[Tensor, Tensor]]:
    x, y = torch.randn(n, 3), torch.randint(0, classes, (n,))
    return list(zip(x.split(20), y.split(20)))


def _state(model: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[object], Tensor]:
    return (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [getattr(m, "momentum", None) for m in model.modules()],
        torch.get_rng_state(),
    )


def _with_value_at(index: int, value: float) -> Callable[[nn.Module], Any]:
    def data(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        batches = _labelled()
        batches[index][0][5, 2] = value
        return batches

    return data


def _nan_before_the_first_bn(model: nn.Module) -> Any:
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    return _labelled()


def _nan_after_the_last_bn(model: nn.Module) -> Any:
    """Finite statistics everywhere, but a nan output: only the loss shows it."""
    with torch.no_grad():
        model[5].weight[0, 0] = float("nan")
    return _labelled()


def _labels_out_of_range(model: nn.Module) -> Any:
    batches = _labelled()
    batches[1][1][4] = 3  # three classes: 0, 1, 2
    return batches


def _negative_labels(model: nn.Module) -> Any:
    batches = _labelled()
    batches[2][1][0] = -1
    return batches


def _nan_regression_target(model: nn.Module) -> Any:
    x, y = torch.randn(40, 3), torch.randn(40, 3)
    y[25, 1] = float("nan")
    return list(zip(x.split(20), y.split(20)))


class _Broken:
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from _labelled(40)
        raise OSError("shard 3 is truncated")


@pytest.mark.parametrize(
    ("make_data", "message"),
    [
        (
            _with_value_at(1, float("nan")),
            r"^batch 1 of the data gives nan/inf statistics at BatchNorm '2' \(and 1 more\): "
            r"the model input of that batch holds nan/inf; .*left unchanged$",
        ),
        (_with_value_at(3, float("inf")), r"^batch 3 of the data gives nan/inf statistics at"),
        (
            _nan_before_the_first_bn,
            r"^batch 0 .* BatchNorm '2' \(and 1 more\): the model input is finite, so the layers "
            r"before it produce nan/inf",
        ),
        (
            _nan_after_the_last_bn,
            r"^batch 0 of the data gives loss nan in eval mode: the model output or the target "
            r"holds nan/inf",
        ),
        (_nan_regression_target, r"^batch 1 of the data gives loss nan"),
        (
            _labels_out_of_range,
            r"^batch 1 of the data has class labels from 0 to 3, but the model output has 3 "
            r"classes \(dimension 1\): labels must be in \[0, 2\]",
        ),
        (_negative_labels, r"^batch 2 of the data has class labels from -1 to 2"),
        (
            lambda model: _Broken(),
            r"^reading batch 2 of the data raised OSError: shard 3 is truncated$",
        ),
    ],
    ids=["nan", "inf", "nan_model", "nan_output", "nan_target", "label_3", "label_-1", "raises"],
)
def test_bad_data_is_a_one_line_error_and_leaves_no_trace(
    make_data: Callable[[nn.Module], Any], message: str
) -> None:
    model = _net()
    data = make_data(model)
    before = _state(model)
    with pytest.raises(ValueError, match=message) as caught:
        measure(model, data, progress=False)
    assert "\n" not in str(caught.value)
    after = _state(model)
    for key, value in before[0].items():
        torch.testing.assert_close(after[0][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert before[1:3] == after[1:3]
    assert torch.equal(before[3], after[3])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- endless data and budgets -----------------------------------------------------------------


@pytest.mark.parametrize("recalibrate", [True, False])
def test_an_endless_generator_with_batches_ends_and_is_read_no_further(recalibrate: bool) -> None:
    data = CountingBatches(lambda: (torch.randn(8, 3), torch.randint(0, 3, (8,))))
    report = measure(_net(), data, batches=5, recalibrate=recalibrate, progress=False)
    assert data.taken == 5
    assert (report.batches, report.samples) == (5, 40)
    assert (report.accuracy_after is not None) == recalibrate


def test_a_one_shot_iterator_without_batches_is_refused_before_reading() -> None:
    data = CountingBatches(lambda: (torch.randn(8, 3), torch.randint(0, 3, (8,))))
    with pytest.raises(ValueError, match=r"one-shot iterator .* pass batches=N"):
        measure(_net(), data, progress=False)
    assert data.taken == 0


class _Rereadable:
    """A re-iterable (like a DataLoader) that counts its passes."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        return iter(self.batches)


def test_a_re_iterable_is_read_again_for_the_after_pass_instead_of_being_kept() -> None:
    model, batches = _net(), _labelled(120)
    data = _Rereadable(batches)
    report = measure(model, data, progress=False)
    assert data.passes == 2
    reference = measure(model, iter(batches), batches=6, progress=False)  # kept, not re-read
    assert (report.samples, report.batches) == (reference.samples, reference.batches) == (120, 6)
    assert report.loss_after == pytest.approx(reference.loss_after)
    assert report.accuracy_after == reference.accuracy_after


# --- what the model is ------------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "net.pt", [nn.BatchNorm1d(3)]])
def test_a_non_module_is_a_type_error(model: object) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got"):
        measure(model, [torch.randn(8, 3)], progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("to_torchscript", TO_TORCHSCRIPT, ids=TO_TORCHSCRIPT_IDS)
def test_a_torchscript_model_is_refused_with_the_fix(
    to_torchscript: TorchScriptConversion,
) -> None:
    with pytest.raises(TypeError, match=r"TorchScript .* pass the original \(un-scripted\) module"):
        measure(to_torchscript(_net(), torch.randn(4, 3)), [torch.randn(8, 3)], progress=False)


def test_a_compiled_model_is_measured_through_the_module_it_wraps() -> None:
    model = _net()
    data = _labelled()
    plain = measure(model, data, progress=False)
    compiled = measure(torch.compile(model, backend="eager"), data, progress=False)
    assert [layer.name for layer in compiled.layers] == [layer.name for layer in plain.layers]
    for a, b in zip(plain.layers, compiled.layers):
        torch.testing.assert_close(a.eval_var, b.eval_var)
        torch.testing.assert_close(a.precise_var, b.precise_var)
    assert compiled.accuracy_after == plain.accuracy_after
