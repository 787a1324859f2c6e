"""The built-in studies: each loads and validates, has the presets and cell counts its
documentation promises, and its quick preset trains end to end (one cell, shrunk further), so
that no study can rot unnoticed. The CIFAR study runs on tiny CIFAR-shaped files written here."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from varshift.lab import TrialSpec, builtin_studies, load_study, run_trial

# Trials per preset (cells × seeds), as the study files and docs/studies.md state them.
EXPECTED_TRIALS = {
    "example": {"quick": 8, "full": 20},
    "orderings": {"quick": 40, "full": 50, "full-avg": 50, "full-digits": 200,
                  "full-mnist1d": 200, "full-mnist": 50},
    "placement": {"quick": 64, "full": 160, "full-densenet": 160},
    "width": {"quick": 24, "full": 120},
    "depth": {"quick": 24, "full": 120},
    "regression": {"quick": 28, "full": 140, "full-friedman1": 140, "full-digits": 140,
                   "full-mnist1d": 140},
    "bn-gamma-init": {"quick": 12, "full": 60},
    "sparse-ae-beta": {"quick": 8, "full": 40},
    "norms": {"quick": 20, "full": 100},
    "variants": {"quick": 20, "full": 80},
    "cifar-placement": {"quick": 18, "full": 45, "full-cifar100": 45},
    "drop-path": {"quick": 6, "full": 75, "full-resnet": 25, "full-efficientnet": 25,
                  "full-regnet": 25, "full-long-efficientnet": 15, "full-long-regnet": 15},
}
# Studies of timm/torchvision networks (the `zoo` extra).
NEEDS_ZOO = {"drop-path"}
ON_DISK = {"mnist", "fashion-mnist", "cifar10", "cifar100"}
# One epoch on this many samples: enough to exercise every layer, BN recalibration included.
SHRINK = {"train.epochs": 1, "data.train_size": 200, "data.test_size": 80,
          "measure.shift_samples": 80}


def test_every_builtin_study_is_listed_here() -> None:
    assert set(builtin_studies()) == set(EXPECTED_TRIALS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TRIALS))
def test_presets_and_trial_counts(name: str) -> None:
    if name in NEEDS_ZOO:
        pytest.importorskip("timm")
        pytest.importorskip("torchvision")
    study = load_study(name)
    counts = {preset: len(study.expand(preset)) for preset in study.presets}
    assert counts == EXPECTED_TRIALS[name]
    assert study.presets[0] == "quick"
    # `lab status/export/report NAME` take a built-in name as the stored name without reading it.
    assert study.name == name
    for preset in study.presets:
        assert study.reference_arm(preset) in study.arms(preset)
        if preset.startswith("full") and name != "example":
            # An honest answer needs at least five seeds per arm (docs/studies.md).
            assert len(study.seeds(preset)) >= 5, preset


def _shrunk_cells(name: str) -> list[TrialSpec]:
    """The first and the last arm of the quick preset (seed 0)."""
    specs = [spec for spec in load_study(name).expand("quick") if spec.seed == 0]
    return [specs[0], specs[-1]]


@pytest.mark.parametrize("name", sorted(set(EXPECTED_TRIALS) - {"cifar-placement"}))
def test_quick_preset_trains(name: str) -> None:
    if name in NEEDS_ZOO:
        pytest.importorskip("timm")
        pytest.importorskip("torchvision")
    for spec in _shrunk_cells(name):
        assert spec.config.data.dataset not in ON_DISK
        assert spec.config.train.device == "cpu"
        result = run_trial(spec.config.updated(SHRINK), 0)
        assert result.status == "done", f"{spec.arm}: {result.traceback}"
        assert len(result.epochs) == 1
        assert math.isfinite(result.final["test_metric"])
        assert result.meta["train_samples"] <= 200


def test_orderings_follows_the_qa_thread() -> None:
    study = load_study("orderings")
    axes = study.axes("quick")
    assert axes["order"] == [
        "conv-act-drop-bn-pool", "conv-act-drop-pool-bn", "conv-act-bn-pool-drop",
        "conv-act-bn-drop-pool", "conv-bn-act-drop-pool", "conv-bn-act-pool-drop",
        "conv-bn-drop-act-pool", "conv-drop-act-bn-pool", "conv-drop-act-pool-bn",
        "conv-drop-bn-act-pool"]
    assert axes["pool"] == ["max", "avg"]
    for preset in study.presets:
        for spec in study.expand(preset):
            model, dropout, train = spec.config.model, spec.config.dropout, spec.config.train
            # Keras' BatchNormalization(momentum=0.99, epsilon=1e-3) in PyTorch's convention.
            assert (model.norm, model.norm_momentum, model.norm_eps) == ("batch", 0.01, 1e-3)
            assert (model.widths, model.kernel_size, model.activation) == ((32, 64), 3, "elu")
            assert (model.head_hidden, model.head_activation) == ((512,), "elu")
            assert (dropout.kind, dropout.rate) == ("dropout", (0.2, 0.3))
            assert (train.optimizer, train.lr, train.batch_size) == ("adam", 0.001, 32)
            if preset in ("full", "full-avg"):
                assert spec.config.data.dataset == "mnist5k"
                assert train.epochs == 20
                assert model.padding == "valid"
    assert {spec.config.data.dataset for spec in study.expand("quick")} == {"mnist5k"}
    assert {spec.axes["pool"] for spec in study.expand("full")} == {"max"}
    assert {spec.axes["pool"] for spec in study.expand("full-avg")} == {"avg"}
    assert {spec.config.data.dataset for spec in study.expand("full-mnist")} == {"mnist"}
    assert {spec.config.data.dataset for spec in study.expand("full-digits")} == {"digits"}
    assert {spec.config.data.dataset for spec in study.expand("full-mnist1d")} == {"mnist1d"}


def test_docs_have_a_section_per_study() -> None:
    text = (Path(__file__).parents[1] / "docs" / "studies.md").read_text(encoding="utf-8")
    for name in builtin_studies():
        if name != "example":
            assert f"## `{name}`" in text, name
            for preset in load_study(name).presets:
                assert f"`{preset}`" in text, (name, preset)


# -- the CIFAR study, on tiny CIFAR-10-shaped files ----------------------------------------------


def _write_cifar10(folder: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """The python-version layout (five training batches, one test batch) with random images."""
    rng = np.random.default_rng(0)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)

    def dump(path: Path, n: int, start: int) -> None:
        content = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                   b"labels": [int(v) for v in (np.arange(start, start + n) % 10)]}
        with path.open("wb") as handle:
            pickle.dump(content, handle, protocol=2)

    per = n_train // 5
    for i in range(5):
        dump(batches / f"data_batch_{i + 1}", per, i * per)
    dump(batches / "test_batch", n_test, 0)
    return folder


def test_cifar_placement_smoke(tmp_path: Path) -> None:
    study = load_study("cifar-placement")
    full = study.expand("full")
    assert {spec.config.train.device for spec in full} == {"cuda"}
    assert {spec.config.model.architecture for spec in full} == {
        "preact_resnet", "wide_resnet", "densenet_cifar"}
    assert {spec.config.data.dataset for spec in study.expand("full-cifar100")} == {"cifar100"}
    data_dir = _write_cifar10(tmp_path / "cifar")
    specs = [spec for spec in study.expand("quick") if spec.seed == 0]
    inside = next(spec for spec in specs if spec.axes["dropout"] == "inside")
    assert inside.config.train.device == "cpu"
    config = inside.config.updated({"train.epochs": 1, "data.train_size": "all",
                                    "data.test_size": "all", "measure.shift_samples": 20})
    result = run_trial(config, 0, data_dir=data_dir)
    assert result.status == "done", result.traceback
    assert result.meta["input_shape"] == [3, 32, 32]
    assert result.meta["train_samples"] == 40
    assert len(result.epochs) == 1
    # Dropout inside the blocks: every block's norm2 is measured, and recalibration ran.
    assert any(record.layer.endswith("norm2") for record in result.layer_shift)
    assert math.isfinite(result.final["recal_test_metric"])
