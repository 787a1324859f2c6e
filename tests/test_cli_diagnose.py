"""``varshift diagnose`` and ``varshift recalibrate`` on factories from a module written into a
temporary folder: the printed report, --json, --plot, the fixed checkpoint, one-line errors."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import fails_with_one_line, write_zoo
from varshift.cli import main
from varshift.cli.diagnose import command_line, recalibrated_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return write_zoo(tmp_path, monkeypatch)


def _make(zoo: str, factory: str) -> torch.nn.Module:
    """A model from the zoo, read from its file (the zoo is not on ``sys.path`` yet)."""
    model: torch.nn.Module = runpy.run_path(f"{zoo}.py")[factory]()
    return model


def _checkpoint(zoo: str, factory: str, path: Path) -> Path:
    torch.save(_make(zoo, factory).state_dict(), path)
    return path


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "varshift", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_diagnose_prints_lint_shift_fixes_and_writes_json_and_plot(
    zoo: str, tmp_path: Path
) -> None:
    checkpoint = _checkpoint(zoo, "noisy", tmp_path / "noisy.pt")
    argv = ["diagnose", "--model", f"{zoo}:noisy", "--checkpoint", str(checkpoint),
            "--data", "builtin:digits", "--batch-size", "90", "--no-progress",
            "--json", "out/report.json", "--plot", "out/shift.png"]  # fmt: skip
    result = _run(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "builtin:digits test split (360 samples, batches of 90)" in out
    assert "1 BatchNorm layer is fed by a stochastic layer" in out  # lint
    assert re.search(r"^bn\s*\|.*\|\s*drop\s*\|", out, re.MULTILINE)  # bn's row names drop
    assert "eval/train" in out  # the shift table
    assert "suggested fixes:" in out
    assert "varshift recalibrate --model" in out
    assert "move the noise layer(s) drop after the last BatchNorm" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [layer["name"] for layer in report["measure"]["layers"]] == ["bn"]
    assert [finding["bn"] for finding in report["lint"]["findings"]] == ["bn"]
    assert report["measure"]["samples"] == 360
    assert report["measure"]["layers"][0]["ratio"] < 1  # dropout on inflates the variance
    assert (tmp_path / "out" / "shift.png").read_bytes()[:8] == PNG_SIGNATURE


def test_diagnose_without_noise_suggests_only_re_estimating(
    zoo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", "--model", f"{zoo}:clean", "--data", "builtin:digits",
                 "--batches", "2", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "no BatchNorm layer is fed by a stochastic layer" in out
    assert "256 samples in 2 batch(es)" in out
    # Fresh running statistics (mean 0, var 1) are far from the data's: stale, not shifted.
    assert "lag behind the weights" in out
    assert "move the noise layer" not in out


@pytest.mark.parametrize(
    ("flags", "dropout"),
    # --dropout on|off: the flag's earlier spelling, still accepted.
    [([], "off"), (["--keep-noise"], "on"), (["--dropout", "on"], "on"),
     (["--dropout", "off"], "off")],
)
def test_recalibrate_writes_a_checkpoint_that_loads_back(
    zoo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], dropout: str
) -> None:
    original = torch.load(_checkpoint(zoo, "noisy", tmp_path / "noisy.pt"), weights_only=True)
    argv = ["recalibrate", "--model", f"{zoo}:noisy", "--checkpoint", "noisy.pt",
            "--data", "builtin:digits", *flags, "--out", "fixed/noisy.pt",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"train split (1437 samples, batches of 128), dropout {dropout}" in out
    assert "eval on builtin:digits test split (360 samples" in out
    assert "accuracy" in out
    fixed = torch.load(tmp_path / "fixed" / "noisy.pt", weights_only=True)
    model = _make(zoo, "noisy")
    model.load_state_dict(fixed)
    assert not torch.allclose(fixed["bn.running_var"], original["bn.running_var"])
    for name in ("conv.weight", "bn.weight", "head.bias", "bn.num_batches_tracked"):
        assert torch.equal(fixed[name], original[name]), name


def test_recalibrate_keep_noise_keeps_more_variance(zoo: str, tmp_path: Path) -> None:
    variance = {}
    for name, flags in (("off", []), ("on", ["--keep-noise"])):
        out = tmp_path / f"{name}.pt"
        assert main(["recalibrate", "--model", f"{zoo}:noisy", "--data", "builtin:digits",
                     *flags, "--samples", "500", "--exact", "--out", str(out),
                     "--no-progress"]) == 0  # fmt: skip
        variance[name] = torch.load(out, weights_only=True)["bn.running_var"]
    assert bool((variance["on"] > variance["off"]).all())


def test_recalibrate_from_a_one_shot_loader_without_labels(
    zoo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three batches of 16: the generator is read up to the 40th sample (three batches) once.
    assert main(["recalibrate", "--model", f"{zoo}:noisy", "--data", f"{zoo}:unlabelled",
                 "--samples", "40", "--out", "fixed.pt", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "using the first 40 samples" in out
    assert f"no targets in --data {zoo}:unlabelled: no eval metrics" in out
    assert "fixed.pt" in {path.name for path in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        ("builtin:digits", ["--samples", "1000000000"],
         "using all 1437 samples (asked for 1000000000)"),
        ("builtin:digits", ["--samples", "1000"], "using the first 1000 samples"),
        ("builtin:digits", ["--batches", "500"], "using all 12 batches (asked for 500)"),
        ("{zoo}:labelled", ["--samples", "1000"], "using all 48 samples (asked for 1000)"),
        ("{zoo}:labelled", ["--batches", "2"], "using the first 2 batches"),
        ("{zoo}:unlabelled", ["--batches", "9"], "using all 3 batches (asked for 9)"),
    ],
)
def test_recalibrate_says_how_much_data_it_used(
    zoo: str, capsys: pytest.CaptureFixture[str], data: str, limit: list[str], expected: str
) -> None:
    argv = ["recalibrate", "--model", f"{zoo}:noisy", "--data", data.format(zoo=zoo), *limit,
            "--out", "fixed.pt", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "{zoo}:nobn"], "has no BatchNorm layer with running statistics"),
        (["--model", "{zoo}:for_mnist1d"], "does not accept builtin:digits's input: samples of "
                                           "shape (1, 8, 8), batches of shape (128, 1, 8, 8)"),
        (["--model", "{zoo}:noisy", "--data", "{zoo}:empty"], "the loader yielded no batch"),
        (["--model", "no_such_module_here:net"], "cannot import 'no_such_module_here'"),
        (["--model", "{zoo}:missing"], "has no attribute 'missing'"),
        (["--model", "{zoo}"], "--model must be pkg.module:function"),
        (["--model", "{zoo}:noisy", "--checkpoint", "nowhere.pt"], "checkpoint not found"),
        (["--model", "{zoo}:noisy", "--checkpoint", "wider.pt"], "does not match the model: "
                                                                 "shape mismatch: conv.weight"),
        (["--model", "{zoo}:noisy", "--checkpoint", "nobn.pt"], "does not match the model: "
                                                                "missing keys conv.weight"),
        (["--model", "{zoo}:noisy", "--data", "builtin:nope"], "unknown built-in dataset"),
        (["--model", "{zoo}:noisy", "--data", "digits"],
         "--data must be builtin:NAME, imagefolder:PATH or"),
        (["--model", "{zoo}:noisy", "--data", "{zoo}:unlabelled", "--batch-size", "8"],
         "--batch-size applies to builtin: and imagefolder: data only"),
    ],
)
@pytest.mark.parametrize("command", ["diagnose", "recalibrate"])
def test_errors_are_one_line(
    zoo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    command: str, args: list[str], expected: str,
) -> None:  # fmt: skip
    for factory in ("wider", "nobn"):
        _checkpoint(zoo, factory, tmp_path / f"{factory}.pt")
    argv = [command, "--data", "builtin:digits", *(a.format(zoo=zoo) for a in args)]
    argv.append("--no-progress")
    if command == "recalibrate":
        argv += ["--out", "fixed.pt"]
    assert expected in fails_with_one_line(argv, capsys)
    assert not (tmp_path / "fixed.pt").exists()


@pytest.mark.parametrize(
    ("model", "expected"),
    [("broken:net", "cannot import 'broken': ZeroDivisionError"), ("{zoo}:noisy", "not found")],
)
def test_errors_in_a_subprocess_have_no_traceback(zoo: str, tmp_path: Path, model: str,
                                                   expected: str) -> None:
    (tmp_path / "broken.py").write_text("1 / 0\n")
    result = _run(["diagnose", "--model", model.format(zoo=zoo), "--checkpoint", "absent.pt",
                   "--data", "builtin:digits"], tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert expected in result.stderr


def test_suggested_command_lines() -> None:
    assert recalibrated_path("runs/net.pt") == Path("runs/net-recalibrated.pt")
    assert recalibrated_path(None) == Path("recalibrated.pt")
    line = command_line("recalibrate", model="m:f", data="builtin:digits", checkpoint="a b.pt",
                        seed=2, out="x.pt")  # fmt: skip
    assert line == ("varshift recalibrate --model m:f --checkpoint 'a b.pt' --data builtin:digits "
                    "--seed 2 --out x.pt")


def test_suggested_command_lines_repeat_model_arguments_and_image_options() -> None:
    line = command_line(
        "recalibrate", model="timm:efficientnet_b0", data="imagefolder:val images",
        model_args=["drop_path_rate=0.2", "act_layer=relu"], image_size=32, normalize=False,
        out="fixed.safetensors",
    )  # fmt: skip
    assert line == (
        "varshift recalibrate --model timm:efficientnet_b0 --model-arg drop_path_rate=0.2 "
        "--model-arg act_layer=relu --data 'imagefolder:val images' --image-size 32 "
        "--no-normalize --out fixed.safetensors"
    )
