"""scripts/zoo_survey.py: its per-model function against lint and the forward-pass check on a
few small torchvision models, the BatchNorm statistics it sets, its time limit, and its writers.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from helpers.dynamic_check import noise_fed_batchnorms
from varshift.diagnose import lint

tvm = pytest.importorskip("torchvision.models")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "zoo_survey.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo_survey", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


zoo = _load_script()

# (torchvision name, input side, whether noise reaches a BatchNorm): stochastic depth into the
# next block's BatchNorm; dropout only before the classifier; no BatchNorm at all.
CASES = (
    ("efficientnet_b0", 32, True),
    ("mobilenet_v3_small", 32, False),
    ("squeezenet1_1", 64, False),
)


def _spec(name: str, size: int) -> object:
    return zoo.ModelSpec("torchvision", name, zoo.torchvision_family(name), size=size)


@pytest.fixture(scope="module")
def surveyed() -> dict[str, object]:
    return {
        name: zoo.survey_model(
            _spec(name, size), cross_check=noise_fed_batchnorms, measured=True
        )
        for name, size, _ in CASES
    }


@pytest.mark.parametrize(("name", "size", "noise_reaches_bn"), CASES)
def test_counts_match_lint_and_the_forward_pass_check(
    surveyed: dict[str, object], name: str, size: int, noise_reaches_bn: bool
) -> None:
    row = surveyed[name]
    spec = _spec(name, size)
    model, example = spec.build(), spec.example()
    report = lint(model, example_inputs=example)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert row.status == "ok"
    assert row.batchnorms == len(norms)
    assert row.flagged == len(report.flagged) == len(noise_fed_batchnorms(model, example))
    assert (row.flagged > 0) == noise_reaches_bn
    assert row.cross_check == ("agrees" if norms else "")  # no BatchNorm: nothing to check
    assert row.noise_layers == sum(1 for layer in report.stochastic_layers if layer.called)


def test_a_stochastic_depth_row_names_its_kind_and_its_strongest_shift(
    surveyed: dict[str, object],
) -> None:
    row = surveyed["efficientnet_b0"]
    assert row.by_kind == f"drop path {row.flagged}"
    assert row.min_shift is not None
    assert 0 < row.min_shift < 1
    assert row.min_shift_bn.startswith("features.")
    # measured on other batches with the noise on and off, at the same BatchNorm and at the
    # flagged BatchNorm where it is smallest
    assert row.measured_at_bn is not None
    assert row.measured_min is not None
    assert 0 < row.measured_min <= row.measured_at_bn
    assert row.measured_min_bn != ""


def test_statistics_as_built_leave_the_branches_too_small_to_shift(
    surveyed: dict[str, object],
) -> None:
    spec = zoo.ModelSpec("torchvision", "efficientnet_b0", "efficientnet", size=32, as_built=True)
    row = zoo.survey_model(spec)
    assert row.flagged == surveyed["efficientnet_b0"].flagged
    assert row.min_shift is not None
    assert row.min_shift > 0.99 > surveyed["efficientnet_b0"].min_shift


def test_a_model_without_noise_into_batchnorm_has_no_shift(surveyed: dict[str, object]) -> None:
    for name in ("mobilenet_v3_small", "squeezenet1_1"):
        row = surveyed[name]
        assert row.flagged == 0
        assert row.by_kind == ""
        assert row.min_shift is None
        assert row.measured_at_bn is None
        assert row.noise_layers == 1  # the classifier's dropout, feeding no BatchNorm
        assert row.noise_layers_feeding_bn == 0


def test_a_failing_model_becomes_a_one_line_error_row() -> None:
    row = zoo.survey_model(zoo.ModelSpec("torchvision", "no_such_model", "none"))
    assert row.status.startswith("error: ValueError: ")
    assert "\n" not in row.status


def test_batch_statistics_average_the_batches_and_the_momenta_come_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5))
    batches = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) + 1]
    zoo.set_batch_statistics(model, batches)
    with torch.no_grad():
        features = [model[0](batch) for batch in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    variances = torch.stack([f.var(dim=(0, 2, 3)) for f in features]).mean(0)
    norm = model[1]
    assert torch.allclose(norm.running_mean, means, atol=1e-5)
    assert torch.allclose(norm.running_var, variances, atol=1e-5)
    assert norm.momentum == 0.3
    assert not any(m.training for m in model.modules())


def test_the_time_limit_turns_a_slow_model_into_a_skipped_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec("squeezenet1_1", 64)
    monkeypatch.setattr(zoo.ModelSpec, "build", lambda self: time.sleep(10))
    (row,) = zoo.run_survey([spec], timeout=0.05)
    assert row.status == "skipped: over the 0.05 s limit per model"


def test_an_interrupted_survey_keeps_its_rows_and_lists_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    specs = [_spec("squeezenet1_1", 64), _spec("squeezenet1_0", 64), _spec("alexnet", 64)]
    calls: list[str] = []

    def survey_or_interrupt(spec: object, *args: object, **kwargs: object) -> object:
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return zoo.SurveyRow(spec.library, spec.title, spec.family, "", spec.size)

    monkeypatch.setattr(zoo, "survey_model", survey_or_interrupt)
    rows = zoo.run_survey(specs, timeout=0)
    assert [row.model for row in rows] == [spec.name for spec in specs]
    assert rows[0].ok
    assert all(row.status.startswith("skipped: not run") for row in rows[1:])


def test_noisy_families_run_first_and_rows_keep_the_given_order() -> None:
    specs = [_spec("alexnet", 64), _spec("efficientnet_b0", 32),
             zoo.ModelSpec("timm", "resnet18", "resnet")]
    order = [spec.name for spec in zoo.run_order(specs)]
    assert order == ["resnet18", "efficientnet_b0", "alexnet"]


@pytest.mark.parametrize(
    ("type_name", "kind"),
    [
        ("StochasticDepth", "drop path"),
        ("DropPath", "drop path"),
        ("DropBlock2d", "DropBlock"),
        ("Dropout2d", "channel dropout"),
        ("F.dropout", "dropout"),
        ("Dropout", "dropout"),
        ("AlphaDropout", "alpha dropout"),
        ("Jitter", "Jitter"),
    ],
)
def test_noise_kinds(type_name: str, kind: str) -> None:
    assert zoo.noise_kind(type_name) == kind


def test_the_writers_produce_every_row(surveyed: dict[str, object], tmp_path: Path) -> None:
    failed = zoo.SurveyRow("timm", "broken_net", "broken", "", 64, status="error: boom")
    variant = zoo.SurveyRow("timm", "resnet50 (zero_init_last=False)", "resnet", "", 64)
    rows = [*surveyed.values(), failed, variant]
    meta = zoo.SurveyMeta("python scripts/zoo_survey.py", "2026-01-01", "torch x", "a machine")
    text = zoo.write_markdown(rows, zoo.header_line(rows, meta), variants=[variant.model])
    for name, _, _ in CASES:
        assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == 1
    for heading in ("## torchvision", "## timm", "## Variants", "## Skipped and failed"):
        assert heading in text
    assert "- timm broken_net: error: boom" in text
    assert "**1 with noise feeding a BatchNorm**" in text  # efficientnet_b0 of the three
    table = zoo.write_csv(rows)
    assert len(table.splitlines()) == 1 + len(rows)
    back = zoo.read_csv(table)
    assert [row.model for row in back] == [row.model for row in rows]
    assert zoo.write_csv(back) == table
    assert math.isnan(back[3].params_m)
    # --render-only rewrites the same document from the CSV and the header line
    output = tmp_path / "zoo.md"
    output.write_text(text, encoding="utf-8")
    output.with_suffix(".csv").write_text(table, encoding="utf-8")
    variants = [spec.title for spec in zoo.all_specs(quick=False) if spec.label]
    expected = zoo.write_markdown(back, zoo.header_line(rows, meta), variants)
    assert zoo.main(["--render-only", "--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8") == expected
