"""Study files: a base configuration, axes to sweep as a grid, seeds, and presets.

A study is a TOML file with the tables ``[study]`` (name, description, metric, seeds, reference
arm), ``[base]`` (a trial configuration), ``[axes]`` (configuration keys, or named tables of
keys, each with the values to sweep) and ``[presets.NAME]`` (overrides of the seeds, the base
and the axes); ``docs/lab-studies.md`` describes the format and ``studies/example.toml`` shows it.

:func:`load_study` reads a built-in study (``varshift/lab/studies/NAME.toml``) or a user's file
and validates everything before any trial runs: every preset is expanded, every cell's
configuration checked, and for datasets of known shape every model is built (on the ``meta``
device, so nothing is allocated). All problems are reported at once, each with its path in the
file (``presets.full.axes.model.order[3]: unknown layer token 'bnn'``).

Expansion is the grid over the axes (in file order) times the seeds, seed-major: every arm's
seed 0 comes before any seed 1, so a study stopped early still covers every arm. A preset may
have at most :data:`MAX_TRIALS_PER_PRESET` trials, checked before anything is expanded, and
seeds are integers in ``[0, MAX_SEED]`` (what the results database can store).
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from varshift.lab.config import (
    MAX_SEED,
    ConfigError,
    TrialConfig,
    adapted_input_shape,
    canonical_hash,
    did_you_mean,
    flatten_keys,
    resolve_task,
    split_problem,
)
from varshift.lab.models import build_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "DEFAULT_PRESET",
    "MAX_TRIALS_PER_PRESET",
    "METRICS",
    "Study",
    "TrialSpec",
    "builtin_studies",
    "load_study",
]

DEFAULT_PRESET = "quick"
#: The most trials (arms × seeds) one preset may have. Every cell is validated (its model
#: built on the meta device) and registered in the results database before any trial runs,
#: so a grid far beyond what anyone can train (``seeds = 10000000``) is refused at load time
#: instead of hanging; the largest built-in preset has a few hundred.
MAX_TRIALS_PER_PRESET = 10_000
#: What a study compares arms on (keys of ``TrialResult.final``).
METRICS = ("test_metric", "test_loss", "recal_test_metric", "recal_test_loss")
_TOP_KEYS = ("study", "base", "axes", "presets")
_STUDY_KEYS = ("name", "description", "metric", "seeds", "reference")
_PRESET_KEYS = ("description", "seeds", "base", "axes", "reference")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Per-sample input shape, output count and task of the datasets whose shape is known without
# loading them, so that load_study can build every model up front; tests check this table
# against the loaders of varshift.data. Other datasets are checked when their trial starts.
_KNOWN_DATA: dict[str, tuple[tuple[int, ...], int, str]] = {
    "digits": ((1, 8, 8), 10, "classification"),
    "mnist1d": ((1, 40), 10, "classification"),
    "mnist5k": ((1, 28, 28), 10, "classification"),
    "diabetes": ((10,), 1, "regression"),
    "friedman1": ((10,), 1, "regression"),
    "mnist": ((1, 28, 28), 10, "classification"),
    "fashion-mnist": ((1, 28, 28), 10, "classification"),
    "cifar10": ((3, 32, 32), 10, "classification"),
    "cifar100": ((3, 32, 32), 100, "classification"),
}


@dataclass(frozen=True)
class TrialSpec:
    """One cell of an expanded study: an arm (its label and axis values), a seed, and the
    validated configuration with its hash."""

    arm: str
    axes: dict[str, Any]
    config: TrialConfig
    seed: int
    config_hash: str


@dataclass(frozen=True)
class _Axis:
    """One swept axis. ``settings[i]`` holds the flat config keys value ``i`` sets; a table axis
    sets several keys per value and names each value with its ``name`` entry."""

    key: str
    source: str
    table: bool
    values: tuple[Any, ...]
    names: tuple[str, ...]
    settings: tuple[dict[str, Any], ...]

    def value_path(self, index: int, config_key: str) -> str:
        """Where value ``index`` is written in the file (for a problem about ``config_key``)."""
        inner = f".{config_key}" if self.table else ""
        return f"{self.source}.{self.key}[{index}]{inner}"

    def column(self, index: int) -> Any:
        """The value as results record it: the raw scalar, else its display name."""
        value = self.values[index]
        if self.table or isinstance(value, list):
            return self.names[index]
        return value


@dataclass(frozen=True)
class _Preset:
    name: str
    seeds: tuple[int, ...]
    axes: tuple[_Axis, ...]
    labels: tuple[str, ...]
    reference: str
    specs: tuple[TrialSpec, ...]


class Study:
    """A validated study; build it with :func:`load_study`."""

    def __init__(self, name: str, description: str, path: Path | None, metric: str,
                 presets: Mapping[str, _Preset]) -> None:
        self.name = name
        self.description = description
        self.path = path
        self.metric = metric
        self._presets = dict(presets)

    def __repr__(self) -> str:
        return f"Study({self.name!r}, presets={self.presets}, path={self.path})"

    @property
    def presets(self) -> list[str]:
        """The preset names, in file order (``["quick"]`` for a file without presets)."""
        return list(self._presets)

    def _preset(self, preset: str) -> _Preset:
        found = self._presets.get(preset)
        if found is None:
            raise ConfigError([f"presets.{preset}: study {self.name!r} has no such preset"
                               f"{did_you_mean(preset, self._presets)}; presets: "
                               f"{', '.join(self._presets)}"], what="preset")
        return found

    def expand(self, preset: str = DEFAULT_PRESET) -> list[TrialSpec]:
        """Every trial of ``preset``: the grid over the axes times the seeds, seed-major."""
        return list(self._preset(preset).specs)

    def reference_arm(self, preset: str = DEFAULT_PRESET) -> str:
        """The label of the arm the others are compared against."""
        return self._preset(preset).reference

    def axes(self, preset: str = DEFAULT_PRESET) -> dict[str, list[Any]]:
        """Each axis' label and its values, as :attr:`TrialSpec.axes` records them."""
        found = self._preset(preset)
        return {label: [axis.column(i) for i in range(len(axis.values))]
                for label, axis in zip(found.labels, found.axes)}

    def arms(self, preset: str = DEFAULT_PRESET) -> list[str]:
        """The arm labels in grid order."""
        return list(dict.fromkeys(spec.arm for spec in self._preset(preset).specs))

    def seeds(self, preset: str = DEFAULT_PRESET) -> list[int]:
        return list(self._preset(preset).seeds)

    def shared_config(self, preset: str = DEFAULT_PRESET) -> dict[str, dict[str, Any]]:
        """What every arm of ``preset`` shares, by section: each key of the resolved
        configuration (defaults included, canonical values) that no axis changes."""
        configs = {spec.config_hash: spec.config.to_dict() for spec in self._preset(preset).specs}
        first, *others = configs.values()
        return {section: {key: value for key, value in keys.items()
                          if all(other[section][key] == value for other in others)}
                for section, keys in first.items()}

    def spec(self, preset: str = DEFAULT_PRESET) -> dict[str, Any]:
        """The canonical expanded spec (JSON-serialisable): the axes and every (arm, config hash,
        seed) cell, sorted. Names, descriptions, the metric and the reference are left out:
        they change how results are read, not which trials exist."""
        found = self._preset(preset)
        cells = sorted([spec.arm, spec.config_hash, spec.seed] for spec in found.specs)
        return {"axes": self.axes(preset), "cells": cells}

    def spec_hash(self, preset: str = DEFAULT_PRESET) -> str:
        """Hash of :meth:`spec`: a resumed study whose hash changed has other trials."""
        return canonical_hash(self.spec(preset))


def builtin_studies() -> list[str]:
    """Names of the studies shipped in ``varshift/lab/studies``."""
    folder = resources.files("varshift.lab").joinpath("studies")
    return sorted(entry.name[:-5] for entry in folder.iterdir()
                  if entry.name.endswith(".toml"))


def load_study(name_or_path: str | Path) -> Study:
    """Read and validate a study: a built-in name (see :func:`builtin_studies`) or a path to a
    TOML file. Raises :class:`ConfigError` listing every problem with its path in the file."""
    text, path, stem = _read_study_text(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path}: not valid TOML: {err}"], what="study file") from None
    return study_from_dict(data, path=path, default_name=stem)


def _read_study_text(name_or_path: str | Path) -> tuple[str, Path, str]:
    if not isinstance(name_or_path, str | Path):
        raise TypeError(f"load_study takes a study name or a path, got "
                        f"{type(name_or_path).__name__}")
    builtins = builtin_studies()
    text_form = str(name_or_path)
    looks_like_path = (isinstance(name_or_path, Path) or text_form.endswith(".toml")
                       or "/" in text_form or "\\" in text_form)
    if not looks_like_path and text_form in builtins:
        resource = resources.files("varshift.lab").joinpath("studies").joinpath(f"{text_form}.toml")
        return resource.read_text(encoding="utf-8"), Path(str(resource)), text_form
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8"), path, path.stem
    hint = "" if looks_like_path else did_you_mean(text_form, builtins)
    raise ConfigError([f"{text_form}: no study file or built-in study of that name{hint}; "
                       f"built-in studies: {', '.join(builtins) or '(none)'}"], what="study")


def study_from_dict(data: Mapping[str, Any], *, path: Path | None = None,
                    default_name: str = "study") -> Study:
    """Validate a parsed study file (the dict ``tomllib`` returns) and expand every preset."""
    problems: list[str] = []
    _unknown_keys(data, _TOP_KEYS, "", problems)
    head = _table(data.get("study", {}), "study", problems)
    _unknown_keys(head, _STUDY_KEYS, "study.", problems)
    name = head.get("name", default_name)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"study.name: expected letters, digits, '_', '-' or '.', got {name!r}")
    description = head.get("description", "")
    if not isinstance(description, str):
        problems.append(f"study.description: expected a string, got {description!r}")
    metric = head.get("metric", "test_metric")
    if metric not in METRICS:
        problems.append(f"study.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    seeds = _seeds(head.get("seeds", 1), "study.seeds", problems)
    reference = _table(head.get("reference", {}), "study.reference", problems)
    base = {key: (value, f"base.{key}") for key, value in
            flatten_keys(_table(data.get("base", {}), "base", problems)).items()}
    axes = _parse_axes(_table(data.get("axes", {}), "axes", problems), "axes", problems)
    preset_tables = _table(data.get("presets", {}), "presets", problems) or {DEFAULT_PRESET: {}}
    presets: dict[str, _Preset] = {}
    for preset_name, table in preset_tables.items():
        preset = _parse_preset(preset_name, table, base, axes, seeds, reference, problems)
        if preset is not None:
            presets[preset_name] = preset
    if problems:
        raise ConfigError(problems, what=f"study {path or name}")
    return Study(str(name), str(description), path, str(metric), presets)


def _table(value: Any, path: str, problems: list[str]) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    problems.append(f"{path}: expected a table, got {value!r}")
    return {}


def _unknown_keys(table: Mapping[str, Any], allowed: Sequence[str], prefix: str,
                  problems: list[str]) -> None:
    for key in table:
        if key not in allowed:
            problems.append(f"{prefix}{key}: unknown key{did_you_mean(key, allowed)}; "
                            f"expected {', '.join(allowed)}")


def _seeds(value: Any, path: str, problems: list[str]) -> tuple[int, ...]:
    """``n`` means seeds ``0 … n−1``; a list gives them explicitly (distinct, in
    ``[0, MAX_SEED]``). Either way at most :data:`MAX_TRIALS_PER_PRESET` of them."""
    expected = (f"expected a count in [1, {MAX_TRIALS_PER_PRESET}] or a list of distinct "
                f"integers in [0, 2**63 - 1]")
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= MAX_TRIALS_PER_PRESET:
            return tuple(range(value))
        problems.append(f"{path}: {expected}, got the count {value}")
        return (0,)
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: {expected}, got {value!r}")
        return (0,)
    bad = [s for s in value if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s <= MAX_SEED]
    if bad:
        problems.append(f"{path}: {expected}, got {bad[0]!r}")
    elif len(set(value)) != len(value):
        problems.append(f"{path}: {expected}, got a repeated seed in {value!r}")
    elif len(value) > MAX_TRIALS_PER_PRESET:
        problems.append(f"{path}: {expected}, got {len(value)} seeds")
    else:
        return tuple(value)
    return (0,)


def _value_name(value: Any) -> str:
    """How a value reads in an arm label."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_value_name(item) for item in value)
    return str(value)


def _axis_items(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of an ``[axes]`` table: sub-tables are descended, so
    ``model.order = [...]`` and ``"model.order" = [...]`` declare the same axis."""
    items: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            items += _axis_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _parse_axes(table: Mapping[str, Any], source: str, problems: list[str]) -> list[_Axis]:
    axes: list[_Axis] = []
    for key, values in _axis_items(table):
        path = f"{source}.{key}"
        if not isinstance(values, list) or not values:
            problems.append(f"{path}: expected a non-empty list of values, got {values!r}")
            continue
        tables = [isinstance(v, Mapping) for v in values]
        if any(tables) and not all(tables):
            problems.append(f"{path}: mixes tables and plain values; an axis is either a list "
                            "of values for one key or a list of tables")
            continue
        if all(tables):
            axis = _table_axis(key, source, values, problems)
        else:
            axis = _Axis(key, source, False, tuple(values),
                         tuple(_value_name(v) for v in values),
                         tuple({key: v} for v in values))
        _check_unique(axis, problems)
        axes.append(axis)
    return axes


def _table_axis(key: str, source: str, values: list[Mapping[str, Any]],
                problems: list[str]) -> _Axis:
    names: list[str] = []
    settings: list[dict[str, Any]] = []
    for i, value in enumerate(values):
        name = value.get("name")
        if not isinstance(name, str) or not name.strip() or " " in name:
            problems.append(f"{source}.{key}[{i}].name: each table needs a name without spaces "
                            f"(it labels the arm), got {name!r}")
            name = f"#{i}"
        names.append(name)
        settings.append(flatten_keys({k: v for k, v in value.items() if k != "name"}))
    return _Axis(key, source, True, tuple(values), tuple(names), tuple(settings))


def _check_unique(axis: _Axis, problems: list[str]) -> None:
    for i, name in enumerate(axis.names):
        if name in axis.names[:i]:
            problems.append(f"{axis.source}.{axis.key}[{i}]: {name!r} repeats an earlier value; "
                            "every value of an axis must differ")


def _axis_labels(axes: Sequence[_Axis]) -> tuple[str, ...]:
    """Short labels: the last part of a config key (``order`` for ``model.order``) unless two
    axes would share it, then the whole key; a table axis is labelled by its own key."""
    short = [axis.key if axis.table else axis.key.rsplit(".", 1)[-1] for axis in axes]
    return tuple(label if short.count(label) == 1 else axis.key
                 for label, axis in zip(short, axes))


def _parse_preset(name: str, table: Any, base: Mapping[str, tuple[Any, str]],
                  axes: Sequence[_Axis], seeds: tuple[int, ...], reference: Mapping[str, Any],
                  problems: list[str]) -> _Preset | None:
    where = f"presets.{name}"
    before = len(problems)
    table = _table(table, where, problems)
    _unknown_keys(table, _PRESET_KEYS, f"{where}.", problems)
    if "seeds" in table:
        seeds = _seeds(table["seeds"], f"{where}.seeds", problems)
    merged_base = dict(base)
    for key, value in flatten_keys(_table(table.get("base", {}), f"{where}.base",
                                          problems)).items():
        merged_base[key] = (value, f"{where}.base.{key}")
    merged_axes = list(axes)
    for axis in _parse_axes(_table(table.get("axes", {}), f"{where}.axes", problems),
                            f"{where}.axes", problems):
        keys = [a.key for a in merged_axes]
        if axis.key in keys:
            merged_axes[keys.index(axis.key)] = axis
        else:
            merged_axes.append(axis)
    merged_reference = {**reference, **_table(table.get("reference", {}),
                                              f"{where}.reference", problems)}
    if len(problems) > before:
        return None
    labels = _axis_labels(merged_axes)
    ref_source = f"{where}.reference" if "reference" in table else "study.reference"
    ref_choice = _reference_choice(merged_reference, merged_axes, labels, ref_source, problems)
    arms = math.prod(len(axis.values) for axis in merged_axes)
    if arms * len(seeds) > MAX_TRIALS_PER_PRESET:
        problems.append(f"{where}: {arms} arms x {len(seeds)} seeds = {arms * len(seeds)} "
                        f"trials; a preset may have at most {MAX_TRIALS_PER_PRESET} trials")
        return None
    specs = _expand(where, merged_base, merged_axes, labels, seeds, problems)
    if len(problems) > before:
        return None
    return _Preset(name, seeds, tuple(merged_axes), labels,
                   _arm_label(labels, merged_axes, ref_choice), tuple(specs))


def _reference_choice(reference: Mapping[str, Any], axes: Sequence[_Axis],
                      labels: Sequence[str], source: str, problems: list[str]) -> tuple[int, ...]:
    """Index of the reference value on every axis; an axis the reference omits takes its first
    value. Keys may be axis labels or full axis keys; table axes are chosen by name."""
    choice = [0] * len(axes)
    lookup = {label: i for i, label in enumerate(labels)}
    lookup.update({axis.key: i for i, axis in enumerate(axes)})
    for key, value in flatten_keys(reference).items():
        if key not in lookup:
            problems.append(f"{source}.{key}: not an axis of this study"
                            f"{did_you_mean(key, lookup)}; axes: {', '.join(labels) or '(none)'}")
            continue
        axis = axes[lookup[key]]
        matches = [i for i, name in enumerate(axis.names)
                   if (name if axis.table else axis.values[i]) == value]
        if not matches:
            problems.append(f"{source}.{key}: {value!r} is not a value of the axis; values: "
                            f"{', '.join(axis.names)}")
            continue
        choice[lookup[key]] = matches[0]
    return tuple(choice)


def _arm_label(labels: Sequence[str], axes: Sequence[_Axis], choice: Sequence[int]) -> str:
    if not axes:
        return "base"
    return " ".join(f"{label}={axis.names[i]}" for label, axis, i in zip(labels, axes, choice))


def _expand(where: str, base: Mapping[str, tuple[Any, str]], axes: Sequence[_Axis],
            labels: Sequence[str], seeds: Sequence[int], problems: list[str]) -> list[TrialSpec]:
    """Validate every grid cell and return the specs, seed-major."""
    cells: list[tuple[str, dict[str, Any], TrialConfig]] = []
    first_arm_of: dict[str, str] = {}
    for choice in itertools.product(*(range(len(axis.values)) for axis in axes)):
        flat = {key: value for key, (value, _) in base.items()}
        origin = {key: source for key, (_, source) in base.items()}
        for axis, i in zip(axes, choice):
            for key, value in axis.settings[i].items():
                flat[key] = value
                origin[key] = axis.value_path(i, key)
        arm = _arm_label(labels, axes, choice)
        config = _checked_config(flat, origin, problems)
        if config is None:
            continue
        digest = config.config_hash()
        if digest in first_arm_of:
            problems.append(f"{where}: arms {first_arm_of[digest]!r} and {arm!r} have the same "
                            "configuration; every arm must differ from the others")
            continue
        first_arm_of[digest] = arm
        columns = {label: axis.column(i) for label, axis, i in zip(labels, axes, choice)}
        cells.append((arm, columns, config))
    return [TrialSpec(arm, dict(columns), config, seed, config.config_hash())
            for seed in seeds for arm, columns, config in cells]


def _checked_config(flat: Mapping[str, Any], origin: Mapping[str, str],
                    problems: list[str]) -> TrialConfig | None:
    """The cell's configuration, with each problem moved to the place in the file that set the
    key (an axis value, a preset's base, or the base); ``None`` if it is invalid."""
    try:
        config = TrialConfig.from_dict(flat)
        _check_model(config)
    except ConfigError as err:
        for problem in err.problems:
            path, message = split_problem(problem)
            key = path.split("[", 1)[0]
            problems.append(f"{origin.get(key, f'base.{key}')}{path[len(key):]}: {message}")
        return None
    return config


def _check_model(config: TrialConfig) -> None:
    """Build the model on the meta device when the dataset's shape is known (raises
    :class:`ConfigError` for a model that does not fit the data, or a task it cannot serve)."""
    known = _KNOWN_DATA.get(config.data.dataset)
    if known is None:
        return
    shape, outputs, task = known
    resolve_task(config, task, config.data.dataset)
    with torch.device("meta"):
        build_model(config, adapted_input_shape(config.data, shape), outputs)

