"""``varshift diagnose`` and ``recalibrate`` on today's models and image folders:
``--model torchvision:NAME`` / ``timm:NAME`` with ``--model-arg KEY=VALUE``, ``--data
imagefolder:PATH`` with ``--image-size``, safetensors checkpoints in and out, ``--verbose``; and
every mistake on one line (issue 12)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers.cli import fails_with_one_line, write_zoo
from helpers.images import write_image_folder
from varshift.checkpoints import load_model, read_state_dict
from varshift.cli import main

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm")
needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="needs torchvision"
)
needs_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None, reason="needs safetensors"
)

TIMM = ["--model", "timm:efficientnet_b0", "--model-arg", "drop_path_rate=0.2"]
# A model with a BatchNorm that takes (N, 3, S, S) images, built in no time and needing no zoo.
PLAIN = ["--model", "torch.nn:BatchNorm2d", "--model-arg", "num_features=3"]


@pytest.fixture
def images(tmp_path: Path) -> str:
    """2 classes x 4 images of 40x40 RGB; the folder's path."""
    pytest.importorskip("torchvision")
    return str(write_image_folder(tmp_path / "images"))


@needs_safetensors
def test_timm_model_with_model_args_on_an_image_folder(
    images: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timm = pytest.importorskip("timm")
    data = ["--data", f"imagefolder:{images}", "--image-size", "32", "--batch-size", "4"]
    fixed = tmp_path / "fixed.safetensors"
    argv = ["recalibrate", *TIMM, *data, "--batches", "1", "--out", str(fixed), "--no-progress"]
    assert main(argv) == 0
    assert f"fixed checkpoint written to {fixed}" in capsys.readouterr().out

    # The file is safetensors, holds the re-estimated statistics, and loads into the same model.
    saved = read_state_dict(fixed)
    model = load_model("timm:efficientnet_b0", fixed, drop_path_rate=0.2)
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    assert not torch.equal(saved["bn1.running_var"], torch.ones_like(saved["bn1.running_var"]))

    out = tmp_path / "out.json"
    argv = ["diagnose", *TIMM, "--checkpoint", str(fixed), *data, "--batches", "1",
            "--json", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"imagefolder:{images} (8 images of 32x32, ImageNet-normalized" in printed
    payload = json.loads(out.read_text())
    assert payload["model_args"] == {"drop_path_rate": 0.2}
    findings = payload["lint"]["findings"]
    drop_paths = {f["source"] for f in findings if "drop_path" in f["source"]}
    assert drop_paths, findings
    modules = dict(model.named_modules())
    assert all(f["bn"] in modules for f in findings), findings

    # Numeric drop-path rates: registered by varshift.layers.zoo (helper Z1, issue 12). Each
    # finding's rate is the drop probability of its DropPath module.
    rates = {
        name: module.drop_prob
        for name, module in model.named_modules()
        if isinstance(module, timm.layers.DropPath)
    }
    assert any(finding["source"] in rates for finding in findings), findings
    for finding in findings:
        if finding["source"] in rates:
            assert finding["rate"] == pytest.approx(rates[finding["source"]]), finding


@needs_torchvision
def test_torchvision_model_recalibrated_to_a_pt_file(
    images: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_spec = ["--model", "torchvision:resnet18", "--model-arg", "num_classes=2"]
    fixed = tmp_path / "fixed.pt"
    argv = ["recalibrate", *model_spec, "--data", f"imagefolder:{images}", "--image-size", "32",
            "--batch-size", "4", "--out", str(fixed), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "re-estimated 20 BatchNorm layer(s) on imagefolder:" in printed
    assert "accuracy" in printed  # the folder's classes are the labels
    saved = torch.load(fixed, weights_only=True)  # written with torch.save
    model = load_model("torchvision:resnet18", fixed, num_classes=2)
    assert model.fc.out_features == 2  # type: ignore[union-attr]
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_verbose_prints_the_verbose_lint_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from varshift.diagnose.lint_report import LintReport

    def spy(self: LintReport, *, verbose: bool = False, width: int = 120) -> str:
        return f"LINT REPORT verbose={verbose}"

    monkeypatch.setattr(LintReport, "format", spy, raising=False)
    zoo = write_zoo(tmp_path, monkeypatch)
    base = ["diagnose", "--model", f"{zoo}:noisy", "--data", "builtin:digits", "--batches", "1",
            "--no-progress"]  # fmt: skip
    assert main([*base, "--verbose"]) == 0
    assert "LINT REPORT verbose=True" in capsys.readouterr().out
    assert main(base) == 0
    assert "LINT REPORT verbose=False" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--model", "timm:efficentnet_b0"],
            "did you mean efficientnet_b0",
            marks=needs_timm,
            id="unknown model",
        ),
        pytest.param(
            ["--model", "timm:efficientnet_b0", "--model-arg", "drop_path_rat=0.2"],
            "takes no keyword argument 'drop_path_rat'",
            marks=needs_timm,
            id="misspelt model-arg",
        ),
        pytest.param(
            ["--model", "timm:resnet18", "--model-arg", "pretrained=True"],
            "no weights are reachable offline",
            marks=needs_timm,
            id="pretrained",
        ),
        pytest.param(
            [*PLAIN, "--model-arg", "num_feature=3"],
            "takes no keyword argument 'num_feature'",
            id="misspelt factory arg",
        ),
        pytest.param(
            ["--model", "timm:efficientnet_b0", "--model-arg", "drop_path_rate"],
            "argument --model-arg: must be KEY=VALUE",
            id="model-arg without =",
        ),
        pytest.param(
            ["--model", "timm:x", "--model-arg", "0rate=1"],
            "KEY a Python name",
            id="model-arg key not a name",
        ),
        pytest.param(
            [*PLAIN, "--model-arg", "num_features=4"],
            "--model-arg num_features is given twice",
            id="model-arg twice",
        ),
        pytest.param(
            [*PLAIN, "--data", "imagefolder:{tmp}/absent"],
            "image folder not found",
            id="folder missing",
        ),
        pytest.param(
            [*PLAIN, "--data", "imagefolder:{tmp}/empty"],
            "has no class sub-folders",
            id="no class folders",
        ),
        pytest.param(
            [*PLAIN, "--data", "imagefolder:{tmp}/textonly"],
            "no images in its class",
            id="no images",
        ),
        pytest.param(
            [*PLAIN, "--data", "imagefolder:{tmp}/file.txt"], "is a file", id="folder is a file"
        ),
        pytest.param([*PLAIN, "--data", "imagefolder:"], "needs the folder's path", id="no path"),
        pytest.param(
            [*PLAIN, "--data", "imagefolder:{tmp}/undecodable"],
            "reading batch 0 raised UnidentifiedImageError",
            id="undecodable image",
        ),
        pytest.param(
            [*PLAIN, "--checkpoint", "{tmp}/corrupt.safetensors"],
            "expected a safetensors file",
            marks=needs_safetensors,
            id="corrupt safetensors",
        ),
        pytest.param(
            [*PLAIN, "--data", "builtin:digits", "--image-size", "32"],
            "--image-size apply to imagefolder: data only",
            id="image-size elsewhere",
        ),
        pytest.param(
            [*PLAIN, "--image-size", "0"],
            "argument --image-size: must be an integer",
            id="image-size 0",
        ),
    ],
)
@pytest.mark.parametrize("command", ["diagnose", "recalibrate"])
def test_mistakes_are_one_line(
    images: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    command: str, args: list[str], expected: str,
) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    (tmp_path / "textonly" / "cat").mkdir(parents=True)
    (tmp_path / "textonly" / "cat" / "notes.txt").write_text("no image here")
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "undecodable" / "cat").mkdir(parents=True)
    (tmp_path / "undecodable" / "cat" / "0.png").write_bytes(b"not a png")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    argv = [command, "--data", f"imagefolder:{images}", *(a.format(tmp=tmp_path) for a in args)]
    argv.append("--no-progress")
    if command == "recalibrate":
        argv += ["--out", str(tmp_path / "fixed.safetensors")]
    assert expected in fails_with_one_line(argv, capsys)
    assert not (tmp_path / "fixed.safetensors").exists()
