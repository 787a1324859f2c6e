"""recalibrate_bn against hostile data and models: nan/inf, loaders that raise, endless
generators, non-modules, TorchScript and torch.compile. Every failure is one clear line and
leaves the model exactly as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers.endless import CountingBatches
from helpers.torchscript import TO_TORCHSCRIPT, TO_TORCHSCRIPT_IDS, TorchScriptConversion
from varshift.fix import recalibrate_bn


def _net() -> nn.Sequential:
    """linear → BN → dropout → linear → BN, with non-default buffers and momenta to restore."""
    model = nn.Sequential(
        nn.Linear(3, 5),
        nn.BatchNorm1d(5),
        nn.Dropout(0.3),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4, momentum=None),
    )
    model.train()
    model[2].eval()  # mixed flags
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(7)
        model[4].running_var.fill_(3.0)
    return model


def _state(model: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[object]]:
    """Buffers and parameters, training flags, BatchNorm momenta and tracking flags."""
    return (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [(getattr(m, "momentum", None), getattr(m, "track_running_stats", None))
         for m in model.modules()],
    )  # fmt: skip


def _assert_unchanged(model: nn.Module, before: tuple[dict[str, Tensor], Any, Any]) -> None:
    after = _state(model)
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        # bit for bit; a nan only where there was one (the nan model's weights)
        torch.testing.assert_close(after[0][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert before[1:] == after[1:]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _with_nan_at(index: int, value: float) -> Callable[[nn.Module], list[Tensor]]:
    def data(model: nn.Module) -> list[Tensor]:
        batches = list(torch.randn(80, 3).split(20))
        batches[index][3, 1] = value
        return batches

    return data


def _nan_model(model: nn.Module) -> list[Tensor]:
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    return list(torch.randn(80, 3).split(20))


def _huge_inputs(model: nn.Module) -> list[Tensor]:
    """Finite inputs whose squares overflow float32: the statistics themselves become inf."""
    return [torch.randn(20, 3), torch.full((20, 3), 1e30) * torch.randn(20, 3)]


class _Broken:
    """A loader that yields ``good`` batches, then raises ``error``."""

    def __init__(self, good: int, error: Exception) -> None:
        self.good, self.error = good, error

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.good):
            yield torch.randn(20, 3)
        raise self.error


class _Unopenable:
    def __iter__(self) -> Iterator[Tensor]:
        raise OSError("cannot open shard-0.tar\nfull traceback line 2")


@pytest.mark.parametrize("exact", [False, True], ids=["one_pass", "exact"])
@pytest.mark.parametrize(
    ("make_data", "message"),
    [
        (
            _with_nan_at(2, float("nan")),
            r"^batch 2 of the data gives nan/inf statistics at BatchNorm '1' \(and 1 more\): "
            r"the model input of that batch holds nan/inf; .*left unchanged$",
        ),
        (_with_nan_at(0, float("inf")), r"^batch 0 of the data gives nan/inf statistics at "),
        (_with_nan_at(3, float("-inf")), r"^batch 3 of the data .* input of that batch holds"),
        (
            _nan_model,
            r"^batch 0 .* at BatchNorm '1' \(and 1 more\): the model input is finite, so the "
            r"layers before it produce nan/inf",
        ),
        (_huge_inputs, r"^batch 1 of the data gives nan/inf statistics at BatchNorm '1'"),
        (
            lambda model: _Broken(2, RuntimeError("corrupt JPEG")),
            r"^reading batch 2 of the data raised RuntimeError: corrupt JPEG$",
        ),
        (
            lambda model: _Unopenable(),
            r"^reading batch 0 of the data raised OSError: cannot open shard-0.tar$",
        ),
    ],
    ids=["nan", "inf", "-inf", "nan_model", "overflow", "loader_raises", "loader_cannot_open"],
)
def test_bad_data_is_a_one_line_error_and_leaves_the_model_as_it_was(
    make_data: Callable[[nn.Module], Any], message: str, exact: bool
) -> None:
    model = _net()
    data = make_data(model)
    before = _state(model)
    with pytest.raises(ValueError, match=message) as caught:
        recalibrate_bn(model, data, exact=exact, progress=False)
    assert "\n" not in str(caught.value)
    _assert_unchanged(model, before)


def test_a_read_error_is_chained_to_the_original() -> None:
    original = KeyError("missing sample 17")
    with pytest.raises(ValueError, match="reading batch 1 of the data raised KeyError") as caught:
        recalibrate_bn(_net(), _Broken(1, original), progress=False)
    assert caught.value.__cause__ is original


def test_an_interrupt_passes_through_unwrapped_and_restores_the_statistics() -> None:
    model = _net()
    before = _state(model)
    with pytest.raises(KeyboardInterrupt):
        recalibrate_bn(model, _Broken(2, KeyboardInterrupt()), progress=False)
    _assert_unchanged(model, before)


# --- endless data and budgets -----------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True], ids=["one_pass", "exact"])
@pytest.mark.parametrize(
    ("budget", "taken"),
    [({"samples": 100}, 13), ({"batches": 5}, 5), ({"samples": 16, "batches": 9}, 2)],
)
def test_an_endless_generator_with_a_budget_ends_and_is_read_no_further(
    exact: bool, budget: dict[str, int], taken: int
) -> None:
    data = CountingBatches(lambda: torch.randn(8, 3))
    recalibrate_bn(_net(), data, exact=exact, progress=False, **budget)  # type: ignore[arg-type]
    assert data.taken == taken


def test_exact_on_a_one_shot_iterator_without_a_budget_is_refused_before_reading() -> None:
    data = CountingBatches(lambda: torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"one-shot iterator .* pass batches= or samples="):
        recalibrate_bn(_net(), data, exact=True, progress=False)
    assert data.taken == 0


# --- what the model is ------------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "net.pt", {"weight": torch.ones(1)}])
def test_a_non_module_is_a_type_error(model: object) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got"):
        recalibrate_bn(model, [torch.randn(8, 3)], progress=False)  # type: ignore[type-var]


@pytest.mark.parametrize("to_torchscript", TO_TORCHSCRIPT, ids=TO_TORCHSCRIPT_IDS)
def test_a_torchscript_model_is_refused_with_the_fix(
    to_torchscript: TorchScriptConversion,
) -> None:
    scripted = to_torchscript(_net(), torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"TorchScript .* pass the original \(un-scripted\) module"):
        recalibrate_bn(scripted, [torch.randn(8, 3)], progress=False)


def test_a_compiled_model_is_recalibrated_through_the_module_it_wraps() -> None:
    x = torch.randn(64, 3)
    model = _net()
    expected = recalibrate_bn(copy.deepcopy(model), x, progress=False)
    compiled = torch.compile(model, backend="eager")
    assert recalibrate_bn(compiled, x, progress=False) is compiled
    for name, buffer in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], buffer, msg=name)
    # The compiled model shares those buffers: its eval output is the recalibrated model's.
    expected.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected(x))
