"""One trial's configuration: what to train, on which data, with which dropout and norm.

A :class:`TrialConfig` is a frozen tree of sections (``data``, ``model``, ``dropout``, ``train``,
``autoencoder``, ``measure``). :meth:`TrialConfig.from_dict` accepts nested tables (as a TOML file
gives them) or dotted keys (``{"model.order": ...}``), checks every key and value and reports all
problems at once, each as ``"path.to.key: message"``; unknown keys get a "did you mean".
Every section also validates itself when it is constructed (``DataConfig(dataset="nope")``
raises), so no invalid configuration exists in any form; ``data.dataset`` is the one required key.

:meth:`TrialConfig.to_dict` is canonical (every key, defaults included, lists for sequences,
floats for real-valued keys), so :meth:`TrialConfig.config_hash` does not depend on how the
configuration was written: key order, ``1`` versus ``1.0``, an alias versus its canonical name.

Architectures are written as layer-order strings, one per block, e.g. ``conv-bn-act-drop-pool``
(see :data:`LAYER_TOKENS`); the study file format is documented in ``docs/lab-studies.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from varshift.checkpoints import keyword_value
from varshift.data import dataset_names
from varshift.lab.architectures import (
    CIFAR_ARCHITECTURES,
    DEFAULT_DEPTH,
    DEFAULT_WIDTH_FACTOR,
    depth_problem,
    stage_count,
)

# The largest seed (trial seed or ``data.seed``): the store keeps seeds as SQLite's signed
# 64-bit integers, so a larger one could not be recorded.
from varshift.lab.store_schema import MAX_SEED

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "DROPOUT_KINDS",
    "ELEMENTWISE_DROPOUT_KINDS",
    "LAYER_TOKENS",
    "MAX_SEED",
    "NORM_KINDS",
    "AutoencoderConfig",
    "ConfigError",
    "DataConfig",
    "DropoutConfig",
    "MeasureConfig",
    "ModelConfig",
    "TrainConfig",
    "TrialConfig",
    "adapted_input_shape",
    "canonical_hash",
    "did_you_mean",
    "flatten_keys",
    "head_dropout_kind",
    "order_tokens",
    "per_block",
    "resolve_task",
    "split_problem",
]

#: Tokens of a layer-order string: the block's weight layer (``conv`` is Conv1d/Conv2d by the
#: input's rank, ``linear`` a fully connected layer), ``bn`` the configured norm, ``act`` the
#: activation, ``drop`` the configured dropout and ``pool`` (conv blocks only).
LAYER_TOKENS = ("conv", "linear", "bn", "act", "drop", "pool")
WEIGHT_TOKENS = ("conv", "linear")

#: Dropout kinds that drop single units, so they also fit the dense head.
ELEMENTWISE_DROPOUT_KINDS = (
    "dropout",
    "alpha",
    "gaussian",
    "uout",
    "classic",
    "variance_stable",
)
DROPOUT_KINDS = ("none", *ELEMENTWISE_DROPOUT_KINDS, "dropout2d", "dropblock", "dropconnect")
_DROPOUT_ALIASES = {"spatial": "dropout2d", "spatial_dropout": "dropout2d"}
NORM_KINDS = ("batch", "layer", "group", "instance", "none")
ACTIVATIONS = ("relu", "elu", "selu", "gelu", "leaky_relu", "sigmoid", "tanh")
TASKS = ("auto", "classification", "regression", "autoencoding")
ARCHITECTURES = ("plain", "densenet", *CIFAR_ARCHITECTURES, "zoo")
# A checker validates one value found at ``path``: it returns the canonical value, or appends
# ``"path: message"`` lines to ``problems`` (and returns anything; the caller discards it).
Checker = Callable[[Any, str, list[str]], Any]
T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration or study file; ``problems`` lists every ``"path: message"``.

    The message is one line (a trial's error and the CLI print only the first line): the
    problems follow the summary, separated by `` | ``.
    """

    def __init__(self, problems: Iterable[str], what: str = "configuration") -> None:
        self.problems = list(dict.fromkeys(problems))  # de-duplicated, first-seen order
        self.what = what
        count = len(self.problems)
        listed = " | ".join(" ".join(problem.split()) for problem in self.problems)
        head = f"invalid {what}" if count == 1 else f"invalid {what} ({count} problems)"
        super().__init__(f"{head}: {listed}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str], str]]:
        # Rebuild from the problems, not the message, when a worker process sends it back.
        return (type(self), (self.problems, self.what))


def split_problem(problem: str) -> tuple[str, str]:
    """Split ``"path: message"`` into its path and message (paths never contain ``": "``)."""
    path, _, message = problem.partition(": ")
    return path, message


def _value_and_type(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _choice(options: Sequence[str], aliases: Mapping[str, str] | None = None) -> Checker:
    alias_map = dict(aliases or {})

    def check(value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, str) and value in alias_map:
            return alias_map[value]
        if isinstance(value, str) and value in options:
            return value
        hint = did_you_mean(value, [*options, *alias_map]) if isinstance(value, str) else ""
        problems.append(f"{path}: expected one of {', '.join(options)}; got {value!r}{hint}")
        return None

    return check


def _integer(low: int, high: int | None = None) -> Checker:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_value_and_type(value)}")
        elif value < low or (high is not None and value > high):
            upper = "" if high is None else f" and <= {high}"
            problems.append(f"{path}: expected an integer >= {low}{upper}, got {value}")
        return value

    return check


def _optional_integer(value: Any, path: str, problems: list[str]) -> Any:
    """A positive integer, or ``None`` (absent) for "the architecture's own"."""
    return None if value is None else _integer(1)(value, path, problems)


def _optional_size(value: Any, path: str, problems: list[str]) -> Any:
    """A sample count, or ``None``/``"all"`` for the whole split (TOML has no null)."""
    if value is None or value == "all":
        return None
    return _integer(1)(value, path, problems)


def _number_in_range(low: float | None = None, high: float | None = None, *, open_low: bool = False,
          open_high: bool = False) -> Checker:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: expected a number, got {_value_and_type(value)}")
            return None
        number = float(value)
        too_low = low is not None and (number <= low if open_low else number < low)
        too_high = high is not None and (number >= high if open_high else number > high)
        if number != number or too_low or too_high or number in (float("inf"), -float("inf")):
            problems.append(f"{path}: expected {_range_text(low, high, open_low, open_high)}, "
                            f"got {value!r}")
        return number

    return check


def _range_text(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a number {'>' if open_low else '>='} {low:g}"
    if low is None:
        return f"a number {'<' if open_high else '<='} {high:g}"
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    return f"a number in {left}{low:g}, {high:g}{right}"


def _dataset_name(value: Any, path: str, problems: list[str]) -> Any:
    """A name :func:`varshift.data.load_dataset` knows, canonicalised as it reads it (case,
    ``_`` for ``-``, the optional ``builtin:`` prefix) so that spellings hash alike."""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}: expected a dataset name, got {_value_and_type(value)}")
        return None
    name = value.strip().lower().replace("_", "-").removeprefix("builtin:")
    names = dataset_names()
    if name not in names:
        problems.append(f"{path}: unknown dataset {value!r}{did_you_mean(name, names)}; "
                        f"datasets: {', '.join(names)}")
    return name


def _optional_model_spec(value: Any, path: str, problems: list[str]) -> Any:
    """``None`` or ``"prefix:name"`` as :func:`varshift.checkpoints.load_model` reads it (the
    name is resolved when the trial builds the model: the library may be absent here)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.partition(":")[2].strip():
        problems.append(f"{path}: expected 'timm:NAME', 'torchvision:NAME' or "
                        f"'package.module:factory', got {_value_and_type(value)}")
    return value


def _keyword_text(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str):
        problems.append(f"{path}: expected a 'KEY=VALUE' text, got {_value_and_type(value)}")
        return value
    try:
        keyword_value(value)
    except ValueError as exc:
        problems.append(f"{path}: {exc}")
    return value


def _boolean(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, bool):
        problems.append(f"{path}: expected true or false, got {_value_and_type(value)}")
    return value


def _sequence(element: Checker, *, allow_empty: bool) -> Checker:
    """A list (or tuple) whose every element passes ``element``; returned as a tuple."""

    def check(value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, list | tuple):
            problems.append(f"{path}: expected a list, got {_value_and_type(value)}")
            return None
        if not value and not allow_empty:
            problems.append(f"{path}: expected a non-empty list")
        return tuple(element(item, f"{path}[{i}]", problems) for i, item in enumerate(value))

    return check


def _one_or_list(element: Checker) -> Checker:
    """One value for every block, or a non-empty list with one value per block."""
    as_list = _sequence(element, allow_empty=False)

    def check(value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, list | tuple):
            return as_list(value, path, problems)
        return element(value, path, problems)

    return check


def order_tokens(order: str) -> list[str]:
    """The tokens of a layer-order string (``"conv-bn-act"`` → ``["conv", "bn", "act"]``)."""
    return order.split("-")


def _order_string(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: expected a layer-order string such as 'conv-bn-act-drop-pool', "
                        f"got {_value_and_type(value)}")
        return None
    tokens = order_tokens(value)
    for token in tokens:
        if token not in LAYER_TOKENS:
            problems.append(f"{path}: unknown layer token {token!r}"
                            f"{did_you_mean(token, LAYER_TOKENS)}; tokens: "
                            f"{', '.join(LAYER_TOKENS)}")
    weights = [token for token in tokens if token in WEIGHT_TOKENS]
    if len(weights) != 1:
        problems.append(f"{path}: each block needs exactly one 'conv' or 'linear', got "
                        f"{len(weights)} in {value!r}")
    for token in dict.fromkeys(tokens):
        if tokens.count(token) > 1 and token in LAYER_TOKENS:
            problems.append(f"{path}: token {token!r} appears {tokens.count(token)} times in "
                            f"{value!r}; each token may appear once per block")
    if "linear" in tokens and "pool" in tokens:
        problems.append(f"{path}: 'pool' needs a conv block, {value!r} is a linear block")
    return value


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key(default: Any, check: Checker, *, hashed_at_default: bool = True) -> Any:
    """A section field: its default and the checker that validates a given value.

    ``hashed_at_default=False`` is for keys added after studies were recorded: at their default
    they stay out of :meth:`TrialConfig.config_hash`, so a database written before the key
    existed still recognises its trials (and resumes instead of starting over).
    """
    return field(default=default,
                 metadata={"check": check, "hashed_at_default": hashed_at_default})


def _required_key(check: Checker) -> Any:
    """A section field without a default: constructing the section without it is a TypeError,
    and ``from_dict`` reports it as a missing key."""
    return field(metadata={"check": check})


def _check_fields(section: Any) -> None:
    """Validate every field of a just-constructed section and store its canonical value
    (aliases resolved, lists as tuples, numbers as floats); raise :class:`ConfigError` listing
    every problem. Checking a canonical value returns it unchanged."""
    problems: list[str] = []
    for f in dataclasses.fields(section):
        checked = f.metadata["check"](getattr(section, f.name), f"{section.SECTION}.{f.name}",
                                      problems)
        object.__setattr__(section, f.name, checked)  # frozen: the dataclass way to canonicalise
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class DataConfig:
    """Which data: a built-in dataset name or an on-disk spec (see :mod:`varshift.data`),
    optional subset sizes (``None`` = the whole split), the seed that picks the subset (fixed
    across trial seeds, so every seed of every arm sees the same samples) and the task
    (``auto`` = the dataset's own; ``autoencoding`` reconstructs the inputs). ``image_size`` and
    ``channels`` adapt images to networks built for larger colour images: resized to
    ``image_size × image_size`` (bilinear), a one-channel image repeated to ``channels``
    (see :meth:`varshift.data.SplitDataset.as_images`)."""

    SECTION: ClassVar[str] = "data"

    dataset: str = _required_key(_dataset_name)
    train_size: int | None = _key(None, _optional_size)
    test_size: int | None = _key(None, _optional_size)
    seed: int = _key(0, _integer(0, MAX_SEED))
    task: str = _key("auto", _choice(TASKS))
    image_size: int | None = _key(None, _optional_integer, hashed_at_default=False)
    channels: int | None = _key(None, _optional_integer, hashed_at_default=False)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``architecture = "plain"``: one block per entry of ``widths``, each laid out
    by its layer-order string (``order``: one for all blocks or a list), then the head (hidden
    dense layers ``head_hidden`` with ``head_activation``, then the output layer).
    ``architecture = "densenet"``: a stem conv, one dense block per entry of ``dense_layers``
    (each layer norm-act-conv1x1-drop-norm-act-conv3-drop, ``growth`` new channels, concatenated),
    transitions that compress by ``compression`` and average-pool by 2, then norm-act-global
    average pool and the head. ``preact_resnet``, ``wide_resnet``, ``densenet_cifar``: the
    CIFAR networks of :mod:`varshift.lab.architectures`, sized by ``depth`` and
    ``width_factor`` (absent: PreAct-ResNet-18 with k = 4, WRN-28-10, DenseNet-BC-100 with
    ``growth``/``bottleneck``/``compression``); their blocks are the stages, so a per-block
    ``dropout.rate`` is per stage. ``norm_*`` set the norm layers: momentum and eps in PyTorch's
    convention (Keras' ``momentum=0.99`` is ``norm_momentum = 0.01``), initial γ and β.
    ``architecture = "zoo"``: the network ``zoo`` names (``"timm:resnet18"``,
    ``"torchvision:efficientnet_b0"`` or ``"package.module:factory"``, see
    :func:`varshift.checkpoints.load_model`), called with ``zoo_args`` (``"KEY=VALUE"`` texts as
    ``--model-arg`` takes them), ``num_classes`` and ``drop_path_rate`` (passed as timm's
    ``drop_path_rate`` or torchvision's ``stochastic_depth_prob``); the other model keys do not
    apply, and the network's own norms and noise are used (set ``dropout.kind = "none"``)."""

    SECTION: ClassVar[str] = "model"

    architecture: str = _key("plain", _choice(ARCHITECTURES))
    order: str | tuple[str, ...] = _key("conv-bn-act-drop-pool", _one_or_list(_order_string))
    widths: tuple[int, ...] = _key((32, 64), _sequence(_integer(1), allow_empty=False))
    kernel_size: int = _key(3, _integer(1))
    padding: str = _key("same", _choice(("valid", "same")))
    activation: str = _key("relu", _choice(ACTIVATIONS))
    pool: str = _key("max", _choice(("max", "avg")))
    pool_size: int = _key(2, _integer(1))
    norm: str = _key("batch", _choice(NORM_KINDS))
    norm_momentum: float = _key(0.1, _number_in_range(0.0, 1.0, open_low=True))
    norm_eps: float = _key(1e-5, _number_in_range(0.0, open_low=True))
    norm_gamma: float = _key(1.0, _number_in_range())
    norm_beta: float = _key(0.0, _number_in_range())
    norm_groups: int = _key(8, _integer(1))
    head_hidden: tuple[int, ...] = _key((), _sequence(_integer(1), allow_empty=True))
    head_activation: str = _key("relu", _choice(ACTIVATIONS))
    growth: int = _key(12, _integer(1))
    dense_layers: tuple[int, ...] = _key((3, 3), _sequence(_integer(1), allow_empty=False))
    bottleneck: int = _key(4, _integer(1))
    compression: float = _key(0.5, _number_in_range(0.0, 1.0, open_low=True))
    depth: int | None = _key(None, _optional_integer)
    width_factor: int | None = _key(None, _optional_integer)
    zoo: str | None = _key(None, _optional_model_spec, hashed_at_default=False)
    zoo_args: tuple[str, ...] = _key((), _sequence(_keyword_text, allow_empty=True),
                                     hashed_at_default=False)
    drop_path_rate: float = _key(0.0, _number_in_range(0.0, 1.0, open_high=True),
                                 hashed_at_default=False)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class DropoutConfig:
    """Where the ``drop`` token puts noise, and which. ``rate`` is the drop probability ``p``
    (for ``uout`` it is β, the half-width of the uniform noise), one value or one per block;
    ``rate = 0`` or ``kind = "none"`` adds no layer. ``dropconnect`` turns the conv/linear of every
    block whose order has a ``drop`` token into a DropConnect layer (the token's position is then
    irrelevant: the noise is on the weights). ``block_size``/``schedule`` are DropBlock's (linear:
    ramp from 0 to ``rate`` over all training steps). The head's dropout (``head_rate``,
    ``head_kind``, ``head_at``) goes before the hidden dense layers or before the output layer;
    ``head_kind = "same"`` reuses ``kind`` when it is element-wise, else plain dropout."""

    SECTION: ClassVar[str] = "dropout"

    kind: str = _key("dropout", _choice(DROPOUT_KINDS, _DROPOUT_ALIASES))
    rate: float | tuple[float, ...] = _key(0.5, _one_or_list(_number_in_range(0.0)))
    block_size: int = _key(3, _integer(1))
    schedule: str = _key("constant", _choice(("constant", "linear")))
    head_rate: float = _key(0.0, _number_in_range(0.0))
    head_kind: str = _key("same", _choice(("same", *ELEMENTWISE_DROPOUT_KINDS)))
    head_at: str = _key("none", _choice(("none", "before_hidden", "before_output")))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: ``momentum`` is SGD's; ``device = "cuda"`` is checked when the trial runs."""

    SECTION: ClassVar[str] = "train"

    optimizer: str = _key("adam", _choice(("adam", "adamw", "sgd")))
    lr: float = _key(1e-3, _number_in_range(0.0, open_low=True))
    momentum: float = _key(0.9, _number_in_range(0.0, 1.0, open_high=True))
    weight_decay: float = _key(0.0, _number_in_range(0.0))
    batch_size: int = _key(64, _integer(1))
    epochs: int = _key(10, _integer(1))
    device: str = _key("cpu", _choice(("cpu", "cuda")))
    dtype: str = _key("float32", _choice(("float32", "float64")))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sparse autoencoder (task ``autoencoding``): the code is the last block's output; the loss
    adds ``sparsity_weight`` × KL(ρ ‖ mean code activation) with ρ = ``sparsity``."""

    SECTION: ClassVar[str] = "autoencoder"

    sparsity: float = _key(0.05, _number_in_range(0.0, 1.0, open_low=True, open_high=True))
    sparsity_weight: float = _key(0.0, _number_in_range(0.0))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class MeasureConfig:
    """The end-of-trial measurements: test samples used for the per-BN variance shift and
    training samples used to re-estimate BN statistics with dropout off (``None`` = all), and
    the first test samples lint predicts the shift on (``None``: the shift samples; fewer keep
    the Monte Carlo estimates of large networks cheap)."""

    SECTION: ClassVar[str] = "measure"

    shift_samples: int | None = _key(1000, _optional_size)
    recal_samples: int | None = _key(None, _optional_size)
    recalibrate: bool = _key(True, _boolean)
    predict_samples: int | None = _key(None, _optional_size, hashed_at_default=False)

    def __post_init__(self) -> None:
        _check_fields(self)


_SECTIONS: dict[str, type[Any]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "dropout": DropoutConfig,
    "train": TrainConfig,
    "autoencoder": AutoencoderConfig,
    "measure": MeasureConfig,
}


def flatten_keys(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables and dotted keys to one ``{"a.b.c": value}`` dict (later keys win).

    Only mappings are descended into: lists and scalars are values.
    """
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_keys(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _all_key_paths() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in _SECTIONS.items()
            for f in dataclasses.fields(cls)]


def _unknown_key_problem(path: str) -> str:
    section, _, key = path.partition(".")
    known = _all_key_paths()
    name = key if section in _SECTIONS else path
    elsewhere = [p for p in known if p.split(".", 1)[1] == name]
    if section not in _SECTIONS:
        hint = f" (did you mean {elsewhere[0]!r}?)" if elsewhere else did_you_mean(path, known)
        return f"{path}: unknown key{hint}; sections: {', '.join(_SECTIONS)}"
    hint = (f" (did you mean {elsewhere[0]!r}?)" if elsewhere
            else did_you_mean(path, [p for p in known if p.startswith(f"{section}.")]))
    return f"{path}: unknown key{hint}"


def _section_values(cls: type[Any], name: str, values: Mapping[str, Any],
                    problems: list[str]) -> dict[str, Any]:
    """Every field of section ``cls``, checked: the canonical value, or for a missing or bad
    value the default (``None`` for a required key) after appending the problem."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{name}.{f.name}"
        default = None if f.default is dataclasses.MISSING else f.default
        if f.name not in values:
            if f.default is dataclasses.MISSING:
                problems.append(f"{path}: required key missing")
            kwargs[f.name] = default
            continue
        before = len(problems)
        checked = f.metadata["check"](values[f.name], path, problems)
        kwargs[f.name] = checked if len(problems) == before else default
    return kwargs


def _unchecked(cls: type[T], values: Mapping[str, Any]) -> T:
    """An instance built without validation, only so that the cross-key rules can run on a
    configuration that already has problems (every problem is reported at once); it is never
    returned to a caller."""
    draft: T = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(draft, name, value)
    return draft


def adapted_input_shape(data: DataConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A sample's shape once ``data.image_size`` and ``data.channels`` have adapted it (as
    :meth:`~varshift.data.SplitDataset.as_images` does to the tensors), for samples of ``shape``
    in ``data.dataset``; :class:`ConfigError` naming the key when the dataset cannot be adapted."""
    size, channels = data.image_size, data.channels
    if size is None and channels is None:
        return shape
    if len(shape) != 3:
        raise ConfigError([f"data.image_size: {data.dataset!r} has samples of shape {shape}, "
                           "not images (C, H, W)"])
    if channels is not None and shape[0] not in (1, channels):
        raise ConfigError([f"data.channels: only a one-channel image can be repeated, "
                           f"{data.dataset!r} has {shape[0]}"])
    height, width = shape[1:] if size is None else (size, size)
    return (shape[0] if channels is None else channels, height, width)


def _block_count(model: ModelConfig) -> int:
    if model.architecture in CIFAR_ARCHITECTURES:
        return stage_count(model.architecture)
    return len(model.dense_layers) if model.architecture == "densenet" else len(model.widths)


def _count_key(model: ModelConfig) -> str:
    """What sets the number of blocks, for messages."""
    if model.architecture in CIFAR_ARCHITECTURES:
        return f"the stages of {model.architecture}"
    return "model.dense_layers" if model.architecture == "densenet" else "model.widths"


def per_block(value: T | tuple[T, ...], blocks: int) -> tuple[T, ...]:
    """A one-or-list setting spelled out for ``blocks`` blocks."""
    return value if isinstance(value, tuple) else (value,) * blocks


def _cross_checks(config: TrialConfig, bad: set[str]) -> list[str]:
    """Rules that involve several keys; a rule is skipped when one of its keys is already bad."""
    problems: list[str] = []
    model, dropout = config.model, config.dropout

    def ok(*paths: str) -> bool:
        return not bad.intersection(paths)

    blocks = _block_count(model)
    count_key = _count_key(model)
    for path, value in (("model.order", model.order), ("dropout.rate", dropout.rate)):
        if path == "model.order" and model.architecture != "plain":
            continue
        if isinstance(value, tuple) and len(value) != blocks and ok(path, count_key):
            problems.append(f"{path}: {len(value)} values for {blocks} blocks ({count_key}); "
                            "give one value for all blocks or one per block")
    if model.architecture == "plain" and ok("model.order"):
        problems += _order_sequence_problems(config)
    if ok("model.architecture", "model.depth", "model.width_factor"):
        problems += _size_problems(model)
    if dropout.kind != "uout" and ok("dropout.kind", "dropout.rate"):
        for i, rate in enumerate(per_block(dropout.rate, blocks)):
            if rate >= 1.0:
                where = f"dropout.rate[{i}]" if isinstance(dropout.rate, tuple) else "dropout.rate"
                problems.append(f"{where}: a drop probability must be < 1, got {rate:g}")
    problems += _head_problems(config, ok)
    if dropout.schedule == "linear" and dropout.kind != "dropblock" and ok("dropout.kind"):
        problems.append(f"dropout.schedule: the linear schedule is DropBlock's; "
                        f"dropout.kind is {dropout.kind!r}")
    if config.data.task == "autoencoding" and ok("data.task", "model.architecture"):
        problems += _autoencoder_problems(config)
    if ok("model.architecture", "model.zoo", "dropout.kind"):
        problems += _zoo_problems(config)
    return problems


def _zoo_problems(config: TrialConfig) -> list[str]:
    """A zoo network needs its name, brings its own noise, and its keys mean nothing elsewhere
    (so that two spellings of one plain network cannot hash differently)."""
    model, dropout = config.model, config.dropout
    if model.architecture != "zoo":
        return [f"model.{key}: used only by architecture 'zoo', not {model.architecture!r}"
                for key, unset in (("zoo", model.zoo is None), ("zoo_args", not model.zoo_args),
                                   ("drop_path_rate", model.drop_path_rate == 0.0))
                if not unset]
    problems = []
    if model.zoo is None:
        problems.append("model.zoo: architecture 'zoo' needs the network's name, e.g. "
                        "'timm:resnet18' or 'torchvision:efficientnet_b0'")
    if dropout.kind != "none" or dropout.head_at != "none":
        problems.append("dropout.kind: a zoo network keeps its own dropout and drop path "
                        "(model.drop_path_rate); set dropout.kind = 'none' and leave "
                        "dropout.head_at unset")
    if config.data.task == "autoencoding":
        problems.append("data.task: architecture 'zoo' builds classifiers and regressors, "
                        "not autoencoders")
    return problems


def _size_problems(model: ModelConfig) -> list[str]:
    """``depth`` and ``width_factor`` belong to the CIFAR architectures that use them; elsewhere
    they must stay unset, so that two spellings of one network cannot hash differently."""
    problems: list[str] = []
    arch = model.architecture
    uses = {"model.depth": arch in DEFAULT_DEPTH,
            "model.width_factor": arch in DEFAULT_WIDTH_FACTOR}
    for path, used in uses.items():
        if getattr(model, path.split(".")[1]) is not None and not used:
            users = DEFAULT_DEPTH if path == "model.depth" else DEFAULT_WIDTH_FACTOR
            problems.append(f"{path}: used only by architecture {' or '.join(users)}; "
                            f"{arch!r} does not use it")
    if model.depth is not None and arch in DEFAULT_DEPTH:
        problem = depth_problem(arch, model.depth)
        if problem is not None:
            problems.append(f"model.depth: {problem}")
    return problems


def _with_size_defaults(model: ModelConfig) -> ModelConfig:
    """Fill an absent ``depth``/``width_factor`` with the architecture's own (canonical form)."""
    arch = model.architecture
    depth = DEFAULT_DEPTH.get(arch) if model.depth is None else model.depth
    width = DEFAULT_WIDTH_FACTOR.get(arch) if model.width_factor is None else model.width_factor
    if (depth, width) == (model.depth, model.width_factor):
        return model
    return dataclasses.replace(model, depth=depth, width_factor=width)


def _order_sequence_problems(config: TrialConfig) -> list[str]:
    model, kind = config.model, config.dropout.kind
    orders = per_block(model.order, len(model.widths))
    problems: list[str] = []
    seen_linear = False
    for i, order in enumerate(orders):
        path = f"model.order[{i}]" if isinstance(model.order, tuple) else "model.order"
        tokens = order_tokens(order)
        if "conv" in tokens and seen_linear:
            problems.append(f"{path}: a conv block cannot follow a linear block")
        seen_linear = seen_linear or "linear" in tokens
        if "linear" not in tokens:
            continue
        if "bn" in tokens and model.norm == "instance":
            problems.append(f"model.norm: instance norm needs conv blocks; block {i} "
                            f"({order!r}) is linear")
        if "drop" in tokens and kind in ("dropout2d", "dropblock"):
            problems.append(f"dropout.kind: {kind!r} drops whole feature maps and needs conv "
                            f"blocks; block {i} ({order!r}) is linear")
    return problems


def _head_problems(config: TrialConfig, ok: Callable[..., bool]) -> list[str]:
    dropout, model = config.dropout, config.model
    problems: list[str] = []
    if dropout.head_rate > 0 and dropout.head_at == "none" and ok("dropout.head_at"):
        problems.append("dropout.head_at: head_rate is set but head_at is 'none'; use "
                        "'before_hidden' or 'before_output'")
    if dropout.head_at == "before_hidden" and not model.head_hidden and ok("model.head_hidden"):
        problems.append("dropout.head_at: 'before_hidden' needs at least one layer in "
                        "model.head_hidden")
    head_kind = head_dropout_kind(dropout)
    uses_head = dropout.head_rate > 0 and dropout.head_at != "none"
    if uses_head and head_kind != "uout" and dropout.head_rate >= 1 and ok("dropout.head_rate"):
        problems.append(f"dropout.head_rate: a drop probability must be < 1, "
                        f"got {dropout.head_rate:g}")
    return problems


def head_dropout_kind(dropout: DropoutConfig) -> str:
    """The head's dropout kind: ``head_kind``, or for ``"same"`` the blocks' kind when it drops
    single units, plain ``"dropout"`` otherwise (a dense layer has no maps or kernels)."""
    if dropout.head_kind != "same":
        return dropout.head_kind
    return dropout.kind if dropout.kind in ELEMENTWISE_DROPOUT_KINDS else "dropout"


def _autoencoder_problems(config: TrialConfig) -> list[str]:
    model = config.model
    problems: list[str] = []
    if model.architecture != "plain":
        problems.append("model.architecture: autoencoding uses a plain stack of linear blocks")
    elif any("conv" in order_tokens(o) for o in per_block(model.order, len(model.widths))):
        problems.append("model.order: autoencoding uses linear blocks only (e.g. 'linear-bn-act')")
    if config.autoencoder.sparsity_weight > 0 and model.activation != "sigmoid":
        problems.append(f"model.activation: the sparsity penalty needs codes in (0, 1): use "
                        f"'sigmoid', got {model.activation!r}")
    return problems


@dataclass(frozen=True)
class TrialConfig:
    """A complete, validated trial configuration: build it with :meth:`from_dict`, or from its
    sections (``TrialConfig(DataConfig("digits"), ModelConfig(widths=(8,)))``), which checks
    the rules that involve several keys and fills the architecture's own depth and width."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def __post_init__(self) -> None:
        for name, section_cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, section_cls):
                raise TypeError(f"TrialConfig.{name} must be a {section_cls.__name__}, got "
                                f"{type(value).__name__}")
        problems = _cross_checks(self, set())
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "model", _with_size_defaults(self.model))

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> TrialConfig:
        """Validate ``mapping`` (nested tables and/or dotted keys) and build the config.

        Raises :class:`ConfigError` listing every problem, each with its dotted path.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError([f"<config>: expected a table of sections, got "
                               f"{_value_and_type(mapping)}"])
        problems: list[str] = []
        by_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        known = set(_all_key_paths())
        for path, value in flatten_keys(mapping).items():
            if path in known:
                section, key = path.split(".", 1)
                by_section[section][key] = value
            else:
                problems.append(_unknown_key_problem(path))
        values = {name: _section_values(section_cls, name, by_section[name], problems)
                  for name, section_cls in _SECTIONS.items()}
        if problems:
            draft = _unchecked(cls, {name: _unchecked(_SECTIONS[name], section)
                                     for name, section in values.items()})
            bad = {split_problem(p)[0].split("[")[0] for p in problems}
            raise ConfigError([*problems, *_cross_checks(draft, bad)])
        return cls(**{name: _SECTIONS[name](**section) for name, section in values.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every key of every section, canonical and JSON-serialisable (tuples become lists)."""

        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        return {name: {f.name: plain(getattr(getattr(self, name), f.name))
                       for f in dataclasses.fields(getattr(self, name))}
                for name in _SECTIONS}

    def config_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical JSON of :meth:`to_dict`, less the
        keys added later that are at their default (see ``hashed_at_default``)."""
        hashed = self.to_dict()
        for name in _SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                optional = not f.metadata.get("hashed_at_default", True)
                if optional and getattr(section, f.name) == f.default:
                    del hashed[name][f.name]
        return canonical_hash(hashed)

    def updated(self, changes: Mapping[str, Any]) -> TrialConfig:
        """A validated copy with ``changes`` (dotted keys or nested tables) applied."""
        return TrialConfig.from_dict({**flatten_keys(self.to_dict()), **flatten_keys(changes)})

    @property
    def block_count(self) -> int:
        """Number of blocks (``widths`` for plain nets, ``dense_layers`` for DenseNets)."""
        return _block_count(self.model)


def canonical_hash(value: Any) -> str:
    """First 16 hex digits of the SHA-256 of ``value``'s canonical JSON (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def resolve_task(config: TrialConfig, dataset_task: str, dataset: str) -> str:
    """The task a trial trains: ``data.task``, or the dataset's own for ``"auto"``.

    Raises :class:`ConfigError` when the dataset cannot serve the task (classification of a
    regression target, or the reverse); any dataset can be auto-encoded.
    """
    task = config.data.task
    if task == "auto":
        return dataset_task
    if task != "autoencoding" and task != dataset_task:
        raise ConfigError([f"data.task: {dataset!r} is a {dataset_task} dataset, it cannot be "
                           f"used for {task}"])
    return task
