"""run_trial: deterministic, records epochs and the variance shift, fails softly on NaN."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from varshift.lab.config import ConfigError, TrialConfig
from varshift.lab.trial import run_trial

TINY: dict[str, Any] = {
    "data": {"dataset": "digits", "train_size": 100, "test_size": 50},
    "model": {"order": "conv-drop-bn-act-pool", "widths": [4, 8], "head_hidden": [8]},
    "dropout": {"rate": 0.3},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.003},
}


def tiny(**changes: Any) -> TrialConfig:
    return TrialConfig.from_dict(TINY).updated({k.replace("__", "."): v
                                                for k, v in changes.items()})


def numbers(result: Any) -> tuple[Any, ...]:
    return result.epochs, result.final, result.layer_shift


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    config = tiny()
    first, again = run_trial(config, 0), run_trial(config.to_dict(), 0)
    assert first.status == "done", first.traceback
    assert numbers(first) == numbers(again)
    other = run_trial(config, 1)
    assert other.epochs[0].train_loss != first.epochs[0].train_loss
    assert other.final["test_loss"] != first.final["test_loss"]


def test_seed_drives_the_data_order(monkeypatch: pytest.MonkeyPatch) -> None:
    orders: list[torch.Tensor] = []
    randperm = torch.randperm

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        orders.append(randperm(*args, **kwargs))
        return orders[-1]

    monkeypatch.setattr(torch, "randperm", recording)
    config = tiny(train__epochs=1)
    for seed in (0, 0, 5):
        run_trial(config, seed)
    assert len(orders) == 3
    assert torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], orders[2])


def test_global_random_state_is_left_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_trial(tiny(train__epochs=1), 4)
    assert torch.equal(torch.rand(3), expected)


def test_records_epochs_final_figures_and_layer_shift() -> None:
    result = run_trial(tiny(), 0)
    assert result.status == "done"
    assert result.error is None
    assert result.metric_name == "accuracy"
    assert result.higher_is_better
    assert [e.epoch for e in result.epochs] == [1, 2]
    assert result.final["test_metric"] == result.epochs[-1].test_metric
    assert 0 <= result.final["recal_test_metric"] <= 1
    assert [r.layer for r in result.layer_shift] == ["blocks.0.norm", "blocks.1.norm"]
    assert [r.depth for r in result.layer_shift] == [0, 1]
    # Dropout right before each BN: with noise on, the BN input varies more than without.
    assert all(r.ratio < 1 for r in result.layer_shift)
    # The theory's prediction is stored for every BN fed by dropout: Δ = v/(v + σ²(c² + v))
    # with σ² = p/(1−p) lies in (0, 1 − p] (c² ≥ 0 only lowers it below the zero-mean value).
    predicted = [r.predicted for r in result.layer_shift]
    assert all(value is not None and 0 < value <= 0.7 + 1e-9 for value in predicted), predicted
    assert result.meta["train_samples"] == 100
    assert result.meta["test_samples"] == 50
    assert result.meta["train_s"] > 0
    assert result.meta["measure_s"] > 0
    assert result.wall_time_s >= result.meta["train_s"]
    pickle.loads(pickle.dumps(result))


def test_a_diverging_trial_fails_without_raising() -> None:
    result = run_trial(tiny(train__optimizer="sgd", train__lr=1e6, model__norm="none"), 0)
    assert result.status == "failed"
    assert result.error is not None
    assert "\n" not in result.error
    assert "nan" in result.error or "inf" in result.error
    assert result.traceback is not None
    assert "FloatingPointError" in result.traceback


def test_regression() -> None:
    config = tiny(data__dataset="diabetes", data__train_size=80, data__test_size=40,
                  model__order="linear-bn-act-drop", model__widths=[8])
    result = run_trial(config, 0)
    assert result.status == "done", result.traceback
    assert result.metric_name == "mse"
    assert not result.higher_is_better
    assert result.final["test_metric"] == pytest.approx(result.final["test_loss"])
    assert [r.layer for r in result.layer_shift] == ["blocks.0.norm"]
    # linear → bn → act → drop: no dropout feeds the only BN, so there is nothing to predict.
    assert result.layer_shift[0].predicted is None


def test_sparse_autoencoder_records_the_mean_activation() -> None:
    config = tiny(data__task="autoencoding", model__order="linear-bn-act",
                  model__widths=[16], model__activation="sigmoid",
                  autoencoder__sparsity_weight=0.1, autoencoder__sparsity=0.1)
    result = run_trial(config, 0)
    assert result.status == "done", result.traceback
    assert result.metric_name == "mse"
    for epoch in result.epochs:
        assert 0 < epoch.extra["mean_activation"] < 1
    assert "recal_test_metric" in result.final


def test_model_without_batch_norm_skips_the_measurements() -> None:
    result = run_trial(tiny(model__norm="layer", train__epochs=1), 0)
    assert result.status == "done", result.traceback
    assert result.layer_shift == ()
    assert "recal_test_metric" not in result.final


def test_dropblock_with_a_linear_schedule_runs() -> None:
    result = run_trial(tiny(dropout__kind="dropblock", dropout__schedule="linear",
                            model__padding="same", train__epochs=1), 0)
    assert result.status == "done", result.traceback


def test_configuration_problems_raise() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        run_trial({**TINY, "train": {"epochs": 0}}, 0)
    with pytest.raises(ConfigError, match=r"data\.train_size: 5000 is more than the"):
        run_trial(tiny(data__train_size=5000), 0)
    with pytest.raises(ConfigError, match="block 0 is a conv block"):
        run_trial(tiny(data__dataset="diabetes", data__train_size=None), 0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        run_trial(tiny(), -1)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        run_trial(tiny(), 0, threads=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda' was asked for"):
        run_trial(tiny(train__device="cuda"), 0)


def test_run_trial_pickles_for_worker_processes() -> None:
    assert pickle.loads(pickle.dumps(run_trial)) is run_trial
