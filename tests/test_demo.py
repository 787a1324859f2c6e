"""The built-in demo: end to end on a small subset, its numbers checked against the models it
returns, determinism, and ``varshift demo --quick``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from varshift.cli import main
from varshift.demo import (
    DEMO_DATASETS,
    DemoNet,
    DemoResult,
    digits_net,
    mnist1d_net,
    mnist5k_net,
    run_demo,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiny(seed: int, *, epochs: int = 1, out_dir: Path | None = None) -> DemoResult:
    """One epoch on 256 training samples, evaluated on 128 test samples."""
    return run_demo(
        data="mnist1d", epochs=epochs, out_dir=out_dir, seed=seed,
        train_size=256, test_size=128, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return _tiny(3, out_dir=tmp_path_factory.mktemp("demo"))


def _running_var(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: module.running_var
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.running_var is not None
    }


def test_writes_two_pngs_and_a_loadable_checkpoint(demo: DemoResult) -> None:
    shift_png, accuracy_png, checkpoint = demo.files
    for png in (shift_png, accuracy_png):
        assert png.suffix == ".png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
    model = mnist1d_net()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    for name, value in demo.trained.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_the_three_accuracies_are_on_the_same_test_set(demo: DemoResult) -> None:
    x, y = demo.dataset.x_test, demo.dataset.y_test
    assert len(x) == 128
    for evaluation in demo.evaluations:
        evaluation.model.eval()
        with torch.no_grad():
            logits = evaluation.model(x)
        assert 0.0 <= evaluation.accuracy <= 1.0
        assert evaluation.accuracy == pytest.approx(float((logits.argmax(1) == y).double().mean()))
        assert evaluation.loss == pytest.approx(
            float(nn.functional.cross_entropy(logits, y)), rel=1e-5
        )


def test_recalibration_changes_statistics_but_not_parameters(demo: DemoResult) -> None:
    trained = dict(demo.trained.model.named_parameters())
    for evaluation in (demo.recalibrated_off, demo.recalibrated_on):
        for name, parameter in evaluation.model.named_parameters():
            assert torch.equal(parameter, trained[name]), name
    stored, off, on = (_running_var(e.model) for e in demo.evaluations)
    for name in stored:
        assert not torch.allclose(off[name], stored[name]), name
        assert float(on[name].mean()) > float(off[name].mean()), name
    # The first BatchNorm sees the data through one conv and the dropout right before it: noise
    # on adds variance at every channel. (Deeper ones also see upstream BatchNorms normalise
    # differently, so single channels may go either way.)
    first = "blocks.0.bn"
    assert bool((on[first] > off[first]).all())


def test_dropout_off_statistics_are_what_measure_calls_precise(demo: DemoResult) -> None:
    off = _running_var(demo.recalibrated_off.model)
    assert [layer.name for layer in demo.shift.layers] == list(off)
    for layer in demo.shift.layers:
        assert layer.precise_var is not None
        torch.testing.assert_close(
            off[layer.name].double(), layer.precise_var, rtol=1e-4, atol=1e-6
        )


def test_lint_flags_every_batchnorm(demo: DemoResult) -> None:
    assert demo.lint.flagged == ["blocks.0.bn", "blocks.1.bn", "blocks.2.bn"]
    text = str(demo)
    for part in ("varshift lint", "eval/train", *(e.label for e in demo.evaluations)):
        assert part in text


def test_deterministic_given_the_seed_and_leaves_global_state_alone(demo: DemoResult) -> None:
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    again = _tiny(3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert again.train_loss == demo.train_loss
    assert [e.accuracy for e in again.evaluations] == [e.accuracy for e in demo.evaluations]
    assert again.files == ()
    other = _tiny(4, epochs=0)
    assert other.train_loss == ()


@pytest.mark.parametrize(
    ("factory", "data"),
    [(mnist1d_net, "mnist1d"), (digits_net, "digits"), (mnist5k_net, "mnist5k")],
)
def test_factories_take_their_dataset(factory: Callable[[], DemoNet], data: str) -> None:
    model = factory().eval()
    assert model(torch.zeros(2, *DEMO_DATASETS[data])).shape == (2, 10)


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="data must be one of"):
        run_demo(data="cifar10")
    with pytest.raises(ValueError, match="epochs"):
        run_demo(epochs=-1)
    with pytest.raises(ValueError, match="input_shape"):
        DemoNet((40,))


def test_refuses_a_file_as_out_dir_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained although out_dir was refused")

    monkeypatch.setattr("varshift.demo._train", never)
    file = tmp_path / "afile"
    file.write_text("not a folder\n")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        run_demo(out_dir=file, epochs=1, train_size=64, test_size=32, progress=False)


def test_cli_quick_prints_report_files_and_next_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--epochs", "0", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "512 train / 256 test samples" in out
    assert f"written: {tmp_path / 'variance_shift.png'}" in out
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    assert f"varshift diagnose --model varshift.demo:mnist1d_net --checkpoint {tmp_path}" in out
    assert "--out " + str(tmp_path / "model-recalibrated.pt") in out
