"""Study files: expansion, arm labels, reference arm, spec hash, validation with paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from varshift.data import load_dataset
from varshift.lab.config import ConfigError
from varshift.lab.study import (
    _KNOWN_DATA,
    MAX_TRIALS_PER_PRESET,
    builtin_studies,
    load_study,
    study_from_dict,
)

GOOD = """
[study]
name = "tiny"
seeds = 2
reference = { order = "conv-drop-bn-act" }

[base]
data.dataset = "digits"
model.widths = [4]
model.padding = "same"

[axes]
"model.order" = ["conv-bn-act-drop", "conv-drop-bn-act"]
model.pool = ["max", "avg"]
arch = [{ name = "plain", "dropout.rate" = 0.5 },
        { name = "uout", dropout = { kind = "uout", rate = 0.1 } }]

[presets.quick]
seeds = [7]
base.train.epochs = 1

[presets.full]
base.train.epochs = 4
axes.model.pool = ["max"]
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def study_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, text))
    return info.value.problems


def test_expansion_is_the_grid_times_the_seeds(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GOOD))
    assert study.name == "tiny"
    assert study.presets == ["quick", "full"]
    quick, full = study.expand("quick"), study.expand("full")
    assert len(quick) == 2 * 2 * 2 * 1
    assert len(full) == 2 * 1 * 2 * 2
    assert {spec.seed for spec in quick} == {7}
    assert [spec.seed for spec in full] == [0] * 4 + [1] * 4  # seed-major
    assert quick[0].arm == "order=conv-bn-act-drop pool=max arch=plain"
    assert quick[0].axes == {"order": "conv-bn-act-drop", "pool": "max", "arch": "plain"}
    assert study.axes("full") == {"order": ["conv-bn-act-drop", "conv-drop-bn-act"],
                                  "pool": ["max"], "arch": ["plain", "uout"]}
    uout = next(spec for spec in quick if spec.axes["arch"] == "uout")
    assert uout.config.dropout.kind == "uout"
    assert uout.config.dropout.rate == 0.1
    assert all(spec.config.train.epochs == 1 for spec in quick)
    assert all(spec.config_hash == spec.config.config_hash() for spec in quick)
    assert len({spec.config_hash for spec in quick}) == len(quick)


def test_reference_arm(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GOOD))
    assert study.reference_arm("quick") == "order=conv-drop-bn-act pool=max arch=plain"
    for preset in study.presets:
        assert study.reference_arm(preset) in study.arms(preset)


def test_spec_hash_follows_the_trials_only(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GOOD))
    assert study.spec_hash("quick") != study.spec_hash("full")
    assert load_study(write(tmp_path, GOOD, "again.toml")).spec_hash() == study.spec_hash()
    described = GOOD.replace('name = "tiny"', 'name = "tiny"\ndescription = "words"')
    assert load_study(write(tmp_path, described)).spec_hash() == study.spec_hash()
    for changed in (GOOD.replace("seeds = [7]", "seeds = [7, 8]"),
                    GOOD.replace("base.train.epochs = 1", "base.train.epochs = 2"),
                    GOOD.replace('"max", "avg"', '"avg", "max"').replace(
                        'axes.model.pool = ["max"]', "")):
        assert load_study(write(tmp_path, changed)).spec_hash() != study.spec_hash()


def test_every_problem_is_reported_with_its_place_in_the_file(tmp_path: Path) -> None:
    problems = study_problems(tmp_path, """
        [study]
        seeds = 0
        metrik = "x"
        reference = { order = "nope", colour = 1 }

        [base]
        data.dataset = "digits"
        train.lrr = 0.1
        model.padding = "same"

        [axes]
        "model.order" = ["conv-bn-act", "conv-bn-act", "conv-bnn-act"]
        arch = [{ name = "a", "dropout.kind" = "gausian" }, { "dropout.rate" = 0.2 }]

        [presets.quick]
        base.train.epochs = 0

        [presets.full]
        axes."model.order" = ["conv-bn-act", "conv-drop-bn-act", "conv-bnn-act", "conv-act"]
        """)
    expected = [
        "study.metrik: unknown key (did you mean 'metric'?)",
        "study.seeds: expected a count in [1, 10000] or a list of distinct integers in "
        "[0, 2**63 - 1], got the count 0",
        "axes.model.order[1]: 'conv-bn-act' repeats an earlier value",
        "axes.arch[1].name: each table needs a name",
        "study.reference.order: 'nope' is not a value of the axis",
        "study.reference.colour: not an axis of this study",
        "base.train.lrr: unknown key (did you mean 'train.lr'?)",
        "presets.quick.base.train.epochs: expected an integer >= 1, got 0",
        "presets.full.axes.model.order[2]: unknown layer token 'bnn' (did you mean 'bn'?)",
        "axes.arch[0].dropout.kind: expected one of",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)


def test_model_problems_are_found_before_any_trial(tmp_path: Path) -> None:
    problems = study_problems(tmp_path, """
        [base]
        data.dataset = "diabetes"
        [axes]
        "model.order" = ["linear-bn-act", "conv-bn-act"]
        """)
    assert problems == [
        "axes.model.order[1]: block 0 is a conv block but its input has no channel/position "
        "axes (tabular data or after a linear block); use 'linear' blocks"]
    problems = study_problems(tmp_path, """
        [base]
        data.dataset = "diabetes"
        data.task = "classification"
        model.order = "linear-act"
        """)
    assert problems == ["base.data.task: 'diabetes' is a regression dataset, it cannot be used "
                        "for classification"]


def test_identical_arms_are_refused(tmp_path: Path) -> None:
    problems = study_problems(tmp_path, """
        [base]
        data.dataset = "digits"
        [axes]
        arch = [{ name = "a", "dropout.rate" = 0.5 }, { name = "b" }]
        """)
    assert problems == ["presets.quick: arms 'arch=a' and 'arch=b' have the same configuration; "
                        "every arm must differ from the others"]


def test_a_file_without_presets_or_axes(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, '[base]\ndata.dataset = "digits"\n', "plain.toml"))
    assert study.name == "plain"
    assert study.presets == ["quick"]
    assert [spec.arm for spec in study.expand()] == ["base"]
    assert study.reference_arm() == "base"
    with pytest.raises(ConfigError, match="has no such preset"):
        study.expand("full")


def test_axis_labels_stay_unique() -> None:
    study = study_from_dict({"base": {"data": {"dataset": "digits"}},
                             "axes": {"model.activation": ["relu", "tanh"],
                                      "model.head_activation": ["relu"],
                                      "train.lr": [0.1], "model": {"widths": [[4], [4, 8]]}}})
    assert study.arms()[0] == (
        "activation=relu head_activation=relu lr=0.1 widths=4")
    assert study.axes()["widths"] == ["4", "4,8"]


def test_unknown_names_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"built-in studies: .*example") as info:
        load_study("exampel")
    assert "did you mean 'example'" in str(info.value)
    bad = write(tmp_path, "[study\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(bad)
    with pytest.raises(ConfigError, match="no study file"):
        load_study(tmp_path / "missing.toml")
    problems = study_problems(tmp_path, '[sudy]\nname = "x"\n[base]\ndata.dataset = "digits"')
    assert problems[0].startswith("sudy: unknown key (did you mean 'study'?)")


def test_builtin_studies_all_load() -> None:
    names = builtin_studies()
    assert "example" in names
    for name in names:
        study = load_study(name)
        assert study.name == name
        for preset in study.presets:
            assert study.expand(preset)


def test_example_study() -> None:
    study = load_study("example")
    assert study.presets == ["quick", "full"]
    assert len(study.expand("quick")) == 2 * 2 * 2
    assert len(study.expand("full")) == 2 * 2 * 5
    assert study.reference_arm() == "order=conv-bn-act-pool-drop noise=dropout"


@pytest.mark.parametrize("name", ["digits", "diabetes", "friedman1"])
def test_known_shapes_match_the_loaders(name: str) -> None:
    data = load_dataset(name)
    assert _KNOWN_DATA[name] == (data.input_shape, data.num_outputs, data.task)


@pytest.mark.parametrize(("seeds", "fragment"), [
    ("[18446744073709551616]", "got 18446744073709551616"),  # 2**64: SQLite cannot store it
    ("[-1]", "got -1"),
    ("[1.5]", "got 1.5"),
    ("[3, 3]", "a repeated seed"),
    ("10000000", "got the count 10000000"),
    ("0", "got the count 0"),
])
def test_seeds_must_be_storable_integers(tmp_path: Path, seeds: str, fragment: str) -> None:
    text = GOOD.replace("seeds = [7]", f"seeds = {seeds}")
    problems = study_problems(tmp_path, text)
    assert any(p.startswith("presets.quick.seeds: expected a count in [1, 10000]")
               and fragment in p for p in problems), problems


def test_the_largest_seed_is_accepted(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GOOD.replace("seeds = [7]", f"seeds = [{2**63 - 1}]")))
    assert study.seeds("quick") == [2**63 - 1]


def test_a_preset_beyond_the_trial_limit_is_refused_before_expansion(tmp_path: Path) -> None:
    # 8 arms x 1250 seeds = 10000 is the limit; 1251 seeds is one preset too many. Were the grid
    # expanded first, this would validate 10008 cells before refusing.
    at_limit = GOOD.replace("seeds = [7]", "seeds = 1250")
    assert len(load_study(write(tmp_path, at_limit)).expand("quick")) == MAX_TRIALS_PER_PRESET
    problems = study_problems(tmp_path, GOOD.replace("seeds = [7]", "seeds = 1251"))
    assert problems == ["presets.quick: 8 arms x 1251 seeds = 10008 trials; a preset may have "
                        "at most 10000 trials"]


def test_shared_config_is_what_no_axis_changes(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GOOD))
    shared = study.shared_config("quick")
    assert shared["data"]["dataset"] == "digits"
    assert shared["train"]["epochs"] == 1
    assert shared["model"]["widths"] == [4]
    assert shared["model"]["norm"] == "batch"  # a default, resolved
    for varied in ("order", "pool"):
        assert varied not in shared["model"]
    assert "kind" not in shared["dropout"]
    assert "rate" not in shared["dropout"]
    assert study.shared_config("full")["train"]["epochs"] == 4
