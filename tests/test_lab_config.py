"""TrialConfig: validation reports every problem with its path, hashing is canonical."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from varshift.lab.config import (
    AutoencoderConfig,
    ConfigError,
    DataConfig,
    DropoutConfig,
    MeasureConfig,
    ModelConfig,
    TrainConfig,
    TrialConfig,
    flatten_keys,
    resolve_task,
)

BASE = {"data": {"dataset": "digits"}}


def problems_of(mapping: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(mapping)
    return info.value.problems


def test_minimal_config_takes_defaults() -> None:
    config = TrialConfig.from_dict(BASE)
    assert config.data.dataset == "digits"
    assert config.model.order == "conv-bn-act-drop-pool"
    assert config.train.epochs == 10
    assert config.data.train_size is None


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    problems = problems_of({
        "data": {"dataset": "digits", "task": "clasification", "train_size": 0},
        "model": {"order": ["conv-bnn-act", "linear-pool"], "widths": [8, 2.5],
                  "norm_momentum": 0},
        "train": {"epochs": True, "lr": -1, "optimizer": "adamm"},
        "dropout": {"kind": "gausian"},
    })
    expected = [
        "data.task: expected one of auto, classification, regression, autoencoding; got "
        "'clasification' (did you mean 'classification'?)",
        "data.train_size: expected an integer >= 1, got 0",
        "model.order[0]: unknown layer token 'bnn' (did you mean 'bn'?)",
        "model.order[1]: 'pool' needs a conv block, 'linear-pool' is a linear block",
        "model.widths[1]: expected an integer, got 2.5 (float)",
        "model.norm_momentum: expected a number in (0, 1], got 0",
        "train.epochs: expected an integer, got True (bool)",
        "train.lr: expected a number > 0, got -1",
        "train.optimizer: expected one of adam, adamw, sgd; got 'adamm' (did you mean 'adam'?)",
        "dropout.kind: expected one of",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(expected)


def test_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict({"data": {"dataset": "nope"}, "train": {"epochs": 0}})
    text = str(info.value)
    assert "2 problems" in text
    assert "\n" not in text  # one line: a trial's error and the CLI print only the first
    assert "data.dataset: unknown dataset 'nope'" in text
    assert "train.epochs: expected an integer >= 1, got 0" in text
    assert isinstance(info.value, ValueError)


def test_error_survives_pickling_from_a_worker() -> None:
    error = ConfigError(["a.b: bad", "c.d: worse"], what="study")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems
    assert str(copy) == str(error)


@pytest.mark.parametrize(("key", "hint"), [
    ("train.lrr", "did you mean 'train.lr'?"),
    ("model.lr", "did you mean 'train.lr'?"),
    ("lr", "did you mean 'train.lr'?"),
    ("modle.order", "did you mean 'model.order'?"),
])
def test_unknown_keys_are_rejected_with_a_suggestion(key: str, hint: str) -> None:
    problems = problems_of({**BASE, key: 1})
    assert problems == [problems[0]]
    assert problems[0].startswith(f"{key}: unknown key ({hint})")


def test_missing_dataset_is_reported() -> None:
    assert problems_of({"train": {"epochs": 1}}) == ["data.dataset: required key missing"]


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"model.order": ["conv-bn-act"] * 3}, "model.order: 3 values for 2 blocks"),
    ({"dropout.rate": [0.1, 0.2, 0.3]}, "dropout.rate: 3 values for 2 blocks"),
    ({"dropout.rate": 1.0}, "dropout.rate: a drop probability must be < 1"),
    ({"dropout.head_rate": 0.5}, "dropout.head_at: head_rate is set but head_at is 'none'"),
    ({"dropout.head_at": "before_hidden"}, "dropout.head_at: 'before_hidden' needs"),
    ({"dropout.schedule": "linear"}, "dropout.schedule: the linear schedule is DropBlock's"),
    ({"model.order": ["conv-bn-act", "linear-bn-act"], "model.norm": "instance"},
     "model.norm: instance norm needs conv blocks"),
    ({"model.order": "linear-drop", "dropout.kind": "spatial"},
     "dropout.kind: 'dropout2d' drops whole feature maps"),
    ({"model.order": ["linear-act", "conv-act"]},
     "model.order[1]: a conv block cannot follow a linear block"),
    ({"data.task": "autoencoding"}, "model.order: autoencoding uses linear blocks only"),
    ({"data.task": "autoencoding", "model.order": "linear-bn-act",
      "autoencoder.sparsity_weight": 0.1}, "model.activation: the sparsity penalty needs"),
])
def test_rules_across_keys(changes: dict[str, object], fragment: str) -> None:
    problems = problems_of({**BASE, **changes})
    assert any(p.startswith(fragment) for p in problems), problems


def test_uout_rate_is_a_beta_and_may_exceed_one() -> None:
    config = TrialConfig.from_dict({**BASE, "dropout.kind": "uout", "dropout.rate": 1.5})
    assert config.dropout.rate == 1.5


def test_round_trip_and_json() -> None:
    config = TrialConfig.from_dict({**BASE, "model": {"order": ["conv-bn-act", "conv-act"],
                                                      "widths": [4, 8]},
                                    "dropout": {"rate": [0.1, 0.2]}, "data.train_size": 50})
    as_dict = config.to_dict()
    assert TrialConfig.from_dict(as_dict) == config
    assert TrialConfig.from_dict(json.loads(json.dumps(as_dict))) == config
    assert as_dict["model"]["order"] == ["conv-bn-act", "conv-act"]


def test_hash_is_canonical() -> None:
    nested = {"data": {"dataset": "digits", "train_size": 100},
              "train": {"lr": 1, "epochs": 3}, "dropout": {"kind": "spatial"}}
    dotted = {"dropout.kind": "dropout2d", "train.epochs": 3, "train.lr": 1.0,
              "data.train_size": 100, "data.dataset": "Digits"}
    a, b = TrialConfig.from_dict(nested), TrialConfig.from_dict(dotted)
    assert a == b
    assert a.config_hash() == b.config_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", a.config_hash())
    assert a.updated({"train.epochs": 4}).config_hash() != a.config_hash()
    # The hash is of the canonical content, so it is stable across processes and versions
    # of Python: pin one value (change it only on purpose, with the config format).
    assert TrialConfig.from_dict(BASE).config_hash() == TrialConfig.from_dict(
        {"data.dataset": "builtin:digits"}).config_hash()


def test_all_means_the_whole_split() -> None:
    config = TrialConfig.from_dict({**BASE, "data.train_size": "all"})
    assert config.data.train_size is None


def test_updated_validates() -> None:
    config = TrialConfig.from_dict(BASE)
    assert config.updated({"train": {"epochs": 2}}).train.epochs == 2
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        config.updated({"train.epochs": -2})


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a table"):
        TrialConfig.from_dict(["data"])  # type: ignore[arg-type]


def test_resolve_task() -> None:
    config = TrialConfig.from_dict(BASE)
    assert resolve_task(config, "classification", "digits") == "classification"
    auto = config.updated({"data.task": "regression"})
    with pytest.raises(ConfigError, match="'digits' is a classification dataset"):
        resolve_task(auto, "classification", "digits")


def test_docs_describe_every_key() -> None:
    docs = Path(__file__).parents[1] / "docs" / "lab-studies.md"
    text = docs.read_text(encoding="utf-8")
    missing = [key for key in flatten_keys(TrialConfig.from_dict(BASE).to_dict())
               if f"`{key.split('.', 1)[1]}`" not in text]
    assert not missing, f"docs/lab-studies.md does not describe {missing}"


@pytest.mark.parametrize(("build", "fragment"), [
    (lambda: DataConfig(dataset="nope"), "data.dataset: unknown dataset 'nope'"),
    (lambda: DataConfig(dataset="digits", seed=2**63), "data.seed: expected an integer >= 0"),
    (lambda: ModelConfig(widths=()), "model.widths: expected a non-empty list"),
    (lambda: ModelConfig(norm_momentum=0.0), "model.norm_momentum: expected a number in (0, 1]"),
    (lambda: DropoutConfig(kind="sideways"), "dropout.kind: expected one of"),
    (lambda: TrainConfig(epochs=0), "train.epochs: expected an integer >= 1, got 0"),
    (lambda: AutoencoderConfig(sparsity=1.0), "autoencoder.sparsity: expected a number in"),
    (lambda: MeasureConfig(recalibrate=1), "measure.recalibrate: expected true or false"),
])
def test_every_section_validates_itself_when_constructed(build: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()  # type: ignore[operator]
    assert any(problem.startswith(fragment) for problem in info.value.problems), info.value


def test_the_dataset_is_required_and_every_default_is_valid() -> None:
    with pytest.raises(TypeError, match="dataset"):
        DataConfig()  # type: ignore[call-arg]
    for section in (ModelConfig, DropoutConfig, TrainConfig, AutoencoderConfig, MeasureConfig):
        section()  # the defaults pass their own checks
    with pytest.raises(TypeError, match="data"):
        TrialConfig()  # type: ignore[call-arg]


def test_constructed_sections_are_canonical_like_from_dict() -> None:
    data = DataConfig(dataset="Builtin:Digits", train_size="all")  # type: ignore[arg-type]
    assert (data.dataset, data.train_size) == ("digits", None)
    built = TrialConfig(data, ModelConfig(widths=[8], norm_gamma=1),  # type: ignore[arg-type]
                        DropoutConfig(kind="spatial"))
    assert (built.model.widths, built.model.norm_gamma) == ((8,), 1.0)
    assert built.dropout.kind == "dropout2d"
    same = TrialConfig.from_dict({"data.dataset": "digits", "model.widths": [8],
                                  "dropout.kind": "dropout2d"})
    assert built.config_hash() == same.config_hash()


def test_constructed_config_checks_the_rules_across_sections() -> None:
    with pytest.raises(ConfigError, match=r"dropout\.rate: 3 values for 2 blocks"):
        TrialConfig(DataConfig("digits"), dropout=DropoutConfig(rate=(0.1, 0.2, 0.3)))
    with pytest.raises(TypeError, match=r"TrialConfig\.model must be a ModelConfig, got dict"):
        TrialConfig(DataConfig("digits"), model={"widths": [8]})  # type: ignore[arg-type]
    wide = TrialConfig(DataConfig("cifar10"), ModelConfig(architecture="wide_resnet"))
    assert (wide.model.depth, wide.model.width_factor) == (28, 10)  # the architecture's own
