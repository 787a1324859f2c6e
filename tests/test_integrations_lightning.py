"""varshift.integrations.lightning: the callback, with real Trainers on CPU on sklearn's digits."""

from __future__ import annotations

import csv
import importlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.recipes import runnable_example

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("sklearn")

from pytorch_lightning.callbacks import (  # noqa: E402
    Callback,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from varshift.data import SplitDataset, load_builtin  # noqa: E402
from varshift.fix import recalibrate_bn  # noqa: E402
from varshift.integrations.lightning import RecalibrateBatchNorm  # noqa: E402

# Lightning's advice for real runs (workers, logging interval, an unused validation_step) and
# a deprecation inside Lightning itself: noise in these tiny runs.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
    pytest.mark.filterwarnings("ignore:The number of training batches"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Net(pl.LightningModule):  # type: ignore[misc]
    """Two hidden layers with dropout before BatchNorm: the placement that shifts the variance."""

    def __init__(self, p: float = 0.5, batch_norm: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        norm: type[nn.Module] = nn.BatchNorm1d if batch_norm else nn.Identity
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.Dropout(p),
            norm(64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.Dropout(p),
            norm(64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: Any, index: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def digits() -> SplitDataset:
    return load_builtin("digits", seed=0)


def _train_loader(data: SplitDataset, seed: int) -> DataLoader[Any]:
    shuffle = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(data.x_train, data.y_train)
    return DataLoader(dataset, batch_size=64, shuffle=True, generator=shuffle)


def _test_loader(data: SplitDataset) -> DataLoader[Any]:
    return DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)


def _trainer(callbacks: list[Any], *, epochs: int = 3, **kwargs: Any) -> Any:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": epochs,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def _test_loss(model: nn.Module, data: SplitDataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.x_test), data.y_test))


def _bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: value.detach().clone()
        for name, value in model.state_dict().items()
        if "running" in name
    }


@pytest.mark.slow
def test_swa_model_test_loss_is_lower_with_the_callback_on_every_seed(
    digits: SplitDataset,
) -> None:
    """Paired runs per seed: SWA alone vs SWA then our callback. Training is identical (the
    callback only acts in on_train_end), so the averaged weights are the same and only the
    BatchNorm statistics differ: SWA's (dropout on) against ours (dropout off)."""
    improvements = []
    for seed in range(5):
        losses = []
        weights = []
        for ours in (False, True):
            pl.seed_everything(seed, verbose=False)
            model = Net()
            callbacks: list[Any] = [StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=3)]
            if ours:
                callbacks.append(RecalibrateBatchNorm(measure_batches=0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lightning's "few workers" advice
                _trainer(callbacks, epochs=6).fit(model, _train_loader(digits, seed))
            losses.append(_test_loss(model, digits))
            weights.append([p.detach().clone() for p in model.parameters()])
        for a, b in zip(*weights):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        improvements.append(losses[0] - losses[1])
    print("test-loss improvement per seed (SWA alone - SWA + callback):", improvements)
    assert all(gain > 0 for gain in improvements), improvements


def test_checkpoint_round_trip_keeps_the_recalibrated_statistics(
    digits: SplitDataset, tmp_path: Path
) -> None:
    pl.seed_everything(0, verbose=False)
    model = Net()
    callback = RecalibrateBatchNorm(measure_batches=0)
    trainer = _trainer([callback])
    trainer.fit(model, _train_loader(digits, 0))
    assert len(callback.history) == 1
    assert callback.history[0].mean_var_change > 1.2  # the dropout-inflated variance is gone
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    loaded = Net.load_from_checkpoint(path)
    for name, value in _bn_buffers(model).items():
        torch.testing.assert_close(_bn_buffers(loaded)[name], value, rtol=0, atol=0)
    assert _test_loss(loaded, digits) == pytest.approx(_test_loss(model, digits), abs=1e-7)


def test_before_validation_checkpoints_hold_the_statistics_validation_saw(
    digits: SplitDataset, tmp_path: Path
) -> None:
    pl.seed_everything(1, verbose=False)
    fixed = [(x, y) for x, y in zip(digits.x_train.split(256), digits.y_train.split(256))]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    callback = RecalibrateBatchNorm(data=fixed, before_validation=True, at_train_end=False)
    trainer = _trainer([callback, checkpoint], enable_checkpointing=True, num_sanity_val_steps=2)
    trainer.fit(Net(), _train_loader(digits, 1), _test_loader(digits))
    assert [record.step for record in callback.history] == [23, 46, 69]  # no sanity check
    best = Net.load_from_checkpoint(checkpoint.best_model_path)
    # The checkpoint holds statistics re-estimated with dropout off for its own weights:
    # doing it again on the same fixed batches changes nothing.
    again = recalibrate_bn(
        Net.load_from_checkpoint(checkpoint.best_model_path), fixed, progress=False
    )
    for name, value in _bn_buffers(again).items():
        torch.testing.assert_close(_bn_buffers(best)[name], value)
    # And the monitored score is the loss of the model with those statistics.
    assert float(checkpoint.best_model_score) == pytest.approx(_test_loss(best, digits), rel=1e-5)


def test_logs_shift_and_metric_change_through_the_logger(
    digits: SplitDataset, tmp_path: Path
) -> None:
    pl.seed_everything(2, verbose=False)
    callback = RecalibrateBatchNorm(samples=512, measure_batches=3)
    trainer = _trainer([callback], logger=CSVLogger(tmp_path, name="run"))
    trainer.fit(Net(), _train_loader(digits, 2))
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1
    with files[0].open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("varshift/loss_after")]
    assert len(rows) == 1
    logged = {key: float(value) for key, value in rows[0].items() if key.startswith("varshift/")}
    expected = callback.history[-1].metrics()
    assert (
        set(expected)
        == set(logged)
        >= {
            "varshift/shift",
            "varshift/mismatch_before",
            "varshift/mismatch_after",
            "varshift/loss_before",
            "varshift/loss_after",
            "varshift/var_change",
        }
    )
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6)
    assert int(rows[0]["step"]) == trainer.global_step


class _ModeSpy(Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.seen: list[list[bool]] = []

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.seen.append([m.training for m in pl_module.modules()])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.seen.append([m.training for m in pl_module.modules()])


def test_trainer_validate_and_sanity_check_leave_the_model_alone(digits: SplitDataset) -> None:
    """Only validation runs of fit re-estimate: trainer.validate() has no training data, and
    the sanity check runs on the untrained model."""
    pl.seed_everything(6, verbose=False)
    model = Net()
    callback = RecalibrateBatchNorm(before_validation=True, at_train_end=False, batches=2)
    trainer = _trainer([callback], epochs=1, num_sanity_val_steps=2)
    trainer.fit(model, _train_loader(digits, 6), _test_loader(digits))
    assert len(callback.history) == 1
    stored = _bn_buffers(model)
    trainer.validate(model, _test_loader(digits), verbose=False)
    assert len(callback.history) == 1
    for name, value in _bn_buffers(model).items():
        torch.testing.assert_close(value, stored[name], rtol=0, atol=0)


def test_every_module_mode_is_as_lightning_set_it(digits: SplitDataset) -> None:
    before, after = _ModeSpy(), _ModeSpy()
    callback = RecalibrateBatchNorm(before_validation=True, batches=2, measure_batches=1)
    pl.seed_everything(3, verbose=False)
    _trainer([before, callback, after], epochs=2).fit(
        Net(), _train_loader(digits, 3), _test_loader(digits)
    )
    assert len(callback.history) == 3
    assert before.seen == after.seen
    assert len(before.seen) == 3


def test_layers_limits_which_batch_norms_change(digits: SplitDataset) -> None:
    class Snapshot(Callback):  # type: ignore[misc]
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.buffers = _bn_buffers(pl_module)

    snapshot = Snapshot()
    model = Net()
    callback = RecalibrateBatchNorm(layers=["net.7"], measure_batches=0)
    _trainer([snapshot, callback], epochs=1).fit(model, _train_loader(digits, 4))
    now = _bn_buffers(model)
    for name, value in snapshot.buffers.items():
        if name.startswith("net.3."):
            torch.testing.assert_close(now[name], value, rtol=0, atol=0)
    assert not torch.equal(now["net.7.running_var"], snapshot.buffers["net.7.running_var"])
    assert callback.history[0].layers == ("net.7",)


def test_a_wrong_layer_name_fails_at_fit_start(digits: SplitDataset) -> None:
    callback = RecalibrateBatchNorm(layers=["net.4"])
    with pytest.raises(ValueError, match=r"layers: 'net\.4'"):
        _trainer([callback], epochs=1).fit(Net(), _train_loader(digits, 0))


def test_model_without_batch_norm_warns_once_and_is_left_alone(digits: SplitDataset) -> None:
    pl.seed_everything(5, verbose=False)
    model = Net(batch_norm=False)
    callback = RecalibrateBatchNorm(before_validation=True)
    with pytest.warns(UserWarning, match="RecalibrateBatchNorm") as caught:
        _trainer([callback], epochs=2).fit(model, _train_loader(digits, 5), _test_loader(digits))
    ours = [w for w in caught if "RecalibrateBatchNorm" in str(w.message)]
    assert len(ours) == 1
    assert "no BatchNorm" in str(ours[0].message)
    assert callback.history == []


def test_warns_when_swa_is_listed_after_it(digits: SplitDataset) -> None:
    callbacks = [RecalibrateBatchNorm(measure_batches=0), StochasticWeightAveraging(swa_lrs=0.01)]
    with pytest.warns(UserWarning, match="list it after SWA"):
        _trainer(callbacks, epochs=1).fit(Net(), _train_loader(digits, 0))


def test_several_training_loaders_need_explicit_data(digits: SplitDataset) -> None:
    class TwoLoaders(Net):
        def training_step(self, batch: Any, index: int) -> Tensor:
            return super().training_step(batch["a"], index)

    loaders = {"a": _train_loader(digits, 0), "b": _train_loader(digits, 1)}
    with pytest.raises(ValueError, match=r"pass data=\.\.\."):
        _trainer([RecalibrateBatchNorm()], epochs=1).fit(TwoLoaders(), loaders)


def test_settings_are_validated() -> None:
    with pytest.raises(TypeError, match="before_validation must be a bool"):
        RecalibrateBatchNorm(before_validation=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="re-iterable"):
        RecalibrateBatchNorm(data=iter([torch.zeros(2, 64)]))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        RecalibrateBatchNorm(samples=0)


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "pytorch_lightning" or name.startswith("pytorch_lightning."):
            monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "varshift.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'varshift\[lightning\]'"):
        importlib.import_module("varshift.integrations.lightning")


def test_recipe_lightning_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "recipe"}
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(runnable_example("Lightning run"), "recipes.md", "exec"), namespace)
    recalibrate = namespace["recalibrate"]
    assert isinstance(recalibrate, RecalibrateBatchNorm)
    assert len(recalibrate.history) == 4  # three validations, then the end of training
    assert "re-estimated with dropout off" in capsys.readouterr().out
