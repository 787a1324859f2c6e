"""Survey the model zoo: which BatchNorms of real torchvision and timm models does training-time
noise (dropout, stochastic depth / drop path, DropBlock) feed, and how large a variance shift
does :func:`varshift.diagnose.lint` predict there on a random-init forward?

One command regenerates ``docs/findings/zoo.md`` and the CSV beside it::

    python scripts/zoo_survey.py --threads 1                    # everything (see the doc's time)
    python scripts/zoo_survey.py --quick --output /tmp/zoo.md   # five small models, seconds

Every torchvision classification model is built with ``weights=None`` and torchvision's default
arguments (``aux_logits=False, init_weights=False`` for GoogLeNet and Inception v3); the timm
models of :data:`TIMM_MODELS` with the drop rates of their usual training recipes
(:func:`timm_rates`, :data:`RATE_RULE`). Each model is linted on an example batch of random
images after noise-off forwards of other random images have set the BatchNorms' running
statistics (how a network at the start of training normalizes; one variant keeps them as
built). With ``--measure``, :func:`varshift.diagnose.measure` measures the shift on fresh
batches too; a forward-pass check (``tests/helpers/dynamic_check.py``) confirms which
BatchNorms the noise reaches. Progress goes to stderr, one line per model; a model that takes
longer than ``--timeout`` seconds is skipped and listed as such, and any error becomes its row.
The CSV is rewritten after every model, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib
import io
import math
import os
import platform
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from varshift.diagnose import lint, measure
from varshift.diagnose.lint_report import LintReport

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "findings" / "zoo.md"
SCRIPT = "python scripts/zoo_survey.py"
DEFAULT_TIMEOUT = 180.0
# Example batches: 4 images at 64×64, whose deepest feature maps are 2×2 (16 values per channel);
# 2 images at 224 or 299, whose deepest maps are 7×7 or larger (98 and more values per channel).
SMALL_BATCH = 4
LARGE_BATCH = 2
CALIBRATION_IMAGES = 16  # images that set the BatchNorm statistics before the second lint
AGREEMENT = 0.05  # a gap between predicted and measured Δ worth listing
DRAWS = 4  # batches (each a fresh noise draw) for the measured shift
SMALL_SIZE = 64
SEED = 0

# The rule for the timm models' rates (timm's own default is drop_path_rate=0).
MBCONV_DROP_PATH = 0.2  # EfficientNet's reference drop-connect rate, kept by timm's recipes
DROP_PATH = 0.1  # every other timm model with a drop_path_rate argument ...
LARGE_DROP_PATH = 0.2  # ... and 0.2 for those over LARGE_PARAMS parameters
LARGE_PARAMS = 40e6
DROP_BLOCK = 0.1  # the ResNet-D variants, DropBlock in layer3 and layer4 as timm places it
DENSENET_DROP = 0.2  # DenseNet's own dropout (Huang et al.), the setting Li et al. studied
RATE_RULE = (
    f"timm's own default is `drop_path_rate=0`; the survey uses `drop_path_rate={MBCONV_DROP_PATH}`"
    " for the MBConv families (EfficientNet, EfficientNetV2, MixNet, MobileNetV3/V4, MnasNet,"
    " FBNet, TinyNet, ReXNet, LCNet: EfficientNet's reference drop-connect rate, kept by timm's"
    f" training recipes) and `{DROP_PATH}` for every other model with the argument"
    f" (`{LARGE_DROP_PATH}` above {LARGE_PARAMS / 1e6:.0f} M parameters); timm spreads it"
    " linearly over the blocks, so the last block drops at that rate and the first at nearly 0."
    f" The ResNet-D variants also get `drop_block_rate={DROP_BLOCK}` (DropBlock in layer3 and"
    f" layer4); timm's DenseNet gets `proj_drop_rate={DENSENET_DROP}` (dropout inside each dense"
    " layer). `drop_rate` (dropout before the classifier) stays at each model's default. Models"
    " without these arguments (DLA, DPN, GhostNet, HRNet) keep their"
    " defaults."
)


@dataclass(frozen=True)
class ModelSpec:
    """One model to survey: how to build it and the side of its square example input."""

    library: str  # "torchvision" or "timm"
    name: str
    family: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    size: int = SMALL_SIZE
    label: str = ""  # the name in the tables; defaults to ``name``
    skip: str = ""  # why it is not run (then it is listed as skipped)
    as_built: bool = False  # keep the BatchNorm statistics as built instead of setting them

    @property
    def title(self) -> str:
        return self.label or self.name

    def config(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.kwargs.items())

    def build(self) -> nn.Module:
        torch.manual_seed(SEED)
        if self.library == "torchvision":
            import torchvision.models as tvm

            model: nn.Module = tvm.get_model(self.name, weights=None, **self.kwargs)
            return model
        import timm

        return timm.create_model(self.name, pretrained=False, **self.kwargs)

    @property
    def batch(self) -> int:
        return SMALL_BATCH if self.size <= SMALL_SIZE else LARGE_BATCH

    def example(self) -> torch.Tensor:
        """lint's example batch."""
        return self.batches(1, seed=SEED)[0]

    def batches(self, count: int, seed: int) -> list[torch.Tensor]:
        """``count`` batches of random images (independent of the example batch for
        ``seed != SEED``)."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.batch, 3, self.size, self.size)
        return [torch.randn(shape, generator=generator) for _ in range(count)]


@dataclass
class SurveyRow:
    """What the survey records for one model. ``min_shift`` is the smallest predicted
    ``Δ = Var_test / Var_train`` over the flagged BatchNorms (the strongest shift: the variance
    at test time is that fraction of the one the running statistics learnt in training), with
    the running statistics set on random images. ``cross_check`` compares lint's flagged set with
    a forward-pass check when the survey runs one."""

    library: str
    model: str
    family: str
    config: str
    input_size: int
    batch: int = 0
    params_m: float = math.nan
    batchnorms: int = 0
    flagged: int = 0
    by_kind: str = ""
    noise_layers: int = 0
    noise_layers_feeding_bn: int = 0
    min_shift: float | None = None
    min_shift_stderr: float | None = None
    min_shift_basis: str = ""
    min_shift_bn: str = ""
    measured_at_bn: float | None = None
    measured_min: float | None = None
    measured_min_bn: str = ""
    lint_seconds: float = math.nan
    cross_check: str = ""
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class SurveyMeta:
    """Where and how the survey ran."""

    command: str
    date: str
    versions: str
    machine: str
    wall_seconds: float = math.nan
    note: str = ""


def timm_rates(name: str, family: str, params: float) -> dict[str, Any]:
    """The drop rates the survey gives a timm model (see :data:`RATE_RULE`)."""
    if family in MBCONV_FAMILIES:
        return {"drop_path_rate": MBCONV_DROP_PATH}
    if family in NO_DROP_PATH_FAMILIES:
        return {"proj_drop_rate": DENSENET_DROP} if family == "densenet" else {}
    rates: dict[str, Any] = {
        "drop_path_rate": LARGE_DROP_PATH if params > LARGE_PARAMS else DROP_PATH
    }
    if name in RESNET_D:
        rates["drop_block_rate"] = DROP_BLOCK
    return rates


MBCONV_FAMILIES = frozenset(
    {"efficientnet", "efficientnetv2", "mixnet", "mobilenetv3", "mobilenetv4", "mnasnet",
     "fbnet", "tinynet", "rexnet", "lcnet"}
)
NO_DROP_PATH_FAMILIES = frozenset(
    {"densenet", "dla", "dpn", "ghostnet", "hrnet", "selecsls", "inception"}
)
RESNET_D = frozenset({"resnet26d", "resnet50d", "seresnext26d_32x4d"})
# (name, family, parameters in millions: the rate rule needs them before the model is built)
TIMM_MODELS: tuple[tuple[str, str, float], ...] = (
    ("resnet18", "resnet", 11.7),
    ("resnet34", "resnet", 21.8),
    ("resnet50", "resnet", 25.6),
    ("resnet26d", "resnet-d", 16.0),
    ("resnet50d", "resnet-d", 25.6),
    ("seresnext26d_32x4d", "resnet-d", 16.8),
    ("resnetrs50", "resnet-rs", 35.7),
    ("seresnext50_32x4d", "resnext", 27.6),
    ("resnext26ts", "resnext", 10.3),
    ("skresnet18", "resnet-variant", 12.0),
    ("resnest14d", "resnet-variant", 10.6),
    ("efficientnet_b0", "efficientnet", 5.3),
    ("efficientnet_b2", "efficientnet", 9.1),
    ("efficientnet_lite0", "efficientnet", 4.7),
    ("tf_efficientnet_b0", "efficientnet", 5.3),
    ("efficientnetv2_rw_t", "efficientnetv2", 13.6),
    ("tf_efficientnetv2_s", "efficientnetv2", 21.5),
    ("mixnet_s", "mixnet", 4.1),
    ("mobilenetv3_large_100", "mobilenetv3", 5.5),
    ("mobilenetv4_conv_small", "mobilenetv4", 3.8),
    ("mnasnet_100", "mnasnet", 4.4),
    ("fbnetc_100", "fbnet", 5.6),
    ("tinynet_a", "tinynet", 6.2),
    ("rexnet_100", "rexnet", 4.8),
    ("lcnet_100", "lcnet", 3.0),
    ("regnetx_002", "regnet", 2.7),
    ("regnety_002", "regnet", 3.2),
    ("regnety_016", "regnet", 11.2),
    ("regnetz_b16", "regnet", 9.7),
    ("cspresnet50", "cspnet", 21.6),
    ("repvgg_a2", "repvgg", 28.2),
    ("ese_vovnet19b_dw", "vovnet", 6.5),
    ("levit_128s", "levit", 7.8),
    ("fastvit_t8", "fastvit", 4.0),
    ("densenet121", "densenet", 8.0),
    ("dla34", "dla", 15.7),
    ("dpn68", "dpn", 12.6),
    ("ghostnet_100", "ghostnet", 5.2),
    ("hrnet_w18_small", "hrnet", 13.2),
)
# Families whose torchvision names share a prefix; the longest prefix wins.
TORCHVISION_FAMILIES = (
    "alexnet", "convnext", "densenet", "efficientnet_v2", "efficientnet", "googlenet",
    "inception_v3", "maxvit", "mnasnet", "mobilenet_v2", "mobilenet_v3", "regnet", "resnext",
    "resnet", "shufflenet_v2", "squeezenet", "swin_v2", "swin", "vgg", "vit", "wide_resnet",
)
FIXED_RESOLUTION_TIMM = frozenset({"levit"})  # attention biases sized for 224×224 inputs
TORCHVISION_NOISY = frozenset({"efficientnet", "efficientnet_v2", "maxvit"})
QUICK_TORCHVISION = ("efficientnet_b0", "mobilenet_v3_small", "squeezenet1_1")
QUICK_TIMM = ("resnet18", "regnetx_002")


def torchvision_specs(names: Sequence[str] | None = None) -> list[ModelSpec]:
    """Every torchvision classification model (or those in ``names``), default arguments."""
    import torchvision.models as tvm

    specs = []
    for name in names or sorted(tvm.list_models(module=tvm)):
        kwargs: dict[str, Any] = {}
        if name in ("inception_v3", "googlenet"):
            kwargs = {"aux_logits": False, "init_weights": False}
        size = 299 if name == "inception_v3" else SMALL_SIZE
        if name.startswith(("vit", "swin", "maxvit")):
            size = 224  # fixed position embeddings or window/partition sizes
        specs.append(ModelSpec("torchvision", name, torchvision_family(name), kwargs, size))
    return specs


def torchvision_family(name: str) -> str:
    matches = [family for family in TORCHVISION_FAMILIES if name.startswith(family)]
    return max(matches, key=len) if matches else name


def timm_specs(names: Sequence[str] | None = None) -> list[ModelSpec]:
    """The timm models of :data:`TIMM_MODELS` (or those in ``names``) at the survey's rates."""
    chosen = [entry for entry in TIMM_MODELS if names is None or entry[0] in names]
    return [
        ModelSpec("timm", name, family, timm_rates(name, family, params * 1e6),
                  size=224 if family in FIXED_RESOLUTION_TIMM else SMALL_SIZE)
        for name, family, params in chosen
    ]


def variant_specs() -> list[ModelSpec]:
    """A few models again with one setting changed, to show what moves the figure."""
    resnet50 = timm_specs(["resnet50"])[0]
    regnety = timm_specs(["regnety_016"])[0]
    return [
        ModelSpec("timm", "resnet50", "resnet", {**resnet50.kwargs, "zero_init_last": False},
                  label="resnet50 (zero_init_last=False)"),
        ModelSpec("timm", "regnety_016", "regnet", {**regnety.kwargs, "zero_init_last": False},
                  label="regnety_016 (zero_init_last=False)"),
        ModelSpec("torchvision", "efficientnet_b0", "efficientnet", as_built=True,
                  label="efficientnet_b0 (BatchNorm statistics as built)"),
        ModelSpec("torchvision", "densenet121", "densenet", {"drop_rate": DENSENET_DROP},
                  label="densenet121 (drop_rate=0.2)"),
    ]


def all_specs(quick: bool) -> list[ModelSpec]:
    if quick:
        return [*torchvision_specs(QUICK_TORCHVISION), *timm_specs(QUICK_TIMM)]
    return [*torchvision_specs(), *timm_specs(), *variant_specs()]


def noise_kind(type_name: str) -> str:
    """The family of a stochastic layer's type (``"DropPath"``, ``"F.dropout"``...)."""
    lowered = type_name.lower()
    if "dropblock" in lowered or "drop_block" in lowered:
        return "DropBlock"
    if any(word in lowered for word in ("droppath", "drop_path", "stochastic")):
        return "drop path"
    if re.search(r"dropout[123]d", lowered):
        return "channel dropout"
    if "alpha" in lowered:
        return "alpha dropout"
    if "dropout" in lowered:
        return "dropout"
    return type_name


def flagged_by_kind(report: LintReport) -> Counter[str]:
    """How many flagged BatchNorms each kind of noise reaches (one BatchNorm may count under
    several kinds)."""
    types = {layer.name: layer.type_name for layer in report.stochastic_layers}
    pairs = {(f.bn, noise_kind(types.get(f.source, f.source))) for f in report.findings}
    return Counter(kind for _, kind in pairs)


def set_batch_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to the average of their batch statistics over
    ``batches`` (one forward each, every noise layer off), leaving the model in eval mode;
    momenta restored afterwards."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average of the batches' statistics
            norm.train()
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()


def worst_prediction(report: LintReport) -> tuple[float | None, float | None, str, str]:
    """(shift, stderr, basis, BatchNorm) of the smallest predicted ratio, or Nones."""
    known = [p for p in report.predictions.values() if p.shift is not None]
    if not known:
        return None, None, "", ""
    worst = min(known, key=lambda p: float(p.shift or 0.0))
    return worst.shift, worst.stderr, worst.basis, worst.bn


CrossCheck = Callable[[nn.Module, torch.Tensor], set[str]]


def survey_model(
    spec: ModelSpec, cross_check: CrossCheck | None = None, *, measured: bool = False
) -> SurveyRow:
    """Build, lint with BatchNorm statistics set on random images (unless ``spec.as_built``),
    and summarize one model; if ``measured``, measure the shift where noise feeds a
    BatchNorm. ``cross_check`` runs on models with BatchNorm (without, both sides are
    trivially empty). Any error becomes the row's one-line ``status``."""
    row = SurveyRow(spec.library, spec.title, spec.family, spec.config(), spec.size, spec.batch)
    try:
        model = spec.build()
        example = spec.example()
        row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        if not spec.as_built:
            calibration = spec.batches(CALIBRATION_IMAGES // spec.batch, SEED + 1)
            set_batch_statistics(model, calibration)
        start = time.perf_counter()
        report = lint(model, example_inputs=example)
        row.lint_seconds = time.perf_counter() - start
        fill_counts(row, report)
        if cross_check is not None and row.batchnorms:
            row.cross_check = compare(set(report.flagged), cross_check(model, example))
        if report.flagged and measured:
            fill_measured(row, model, spec.batches(DRAWS, SEED + 2), report.flagged)
    except SurveyTimeoutError as timeout:
        row.status = f"skipped: {timeout}"
    except Exception as error:  # any failure is a finding of the survey, not its end
        first = (str(error).strip().splitlines() or [""])[0]
        row.status = f"error: {type(error).__name__}: {first}"[:240]
    return row


def fill_counts(row: SurveyRow, report: LintReport) -> None:
    row.batchnorms = max(len(report.batchnorms), len(report.flagged))
    row.flagged = len(report.flagged)
    kinds = flagged_by_kind(report)
    row.by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    row.noise_layers = sum(1 for layer in report.stochastic_layers if layer.called)
    row.noise_layers_feeding_bn = sum(1 for layer in report.stochastic_layers if layer.feeds_bn)
    shift, stderr, basis, bn = worst_prediction(report)
    row.min_shift, row.min_shift_stderr, row.min_shift_basis, row.min_shift_bn = (
        shift, stderr, basis, bn
    )


def fill_measured(
    row: SurveyRow, model: nn.Module, batches: Sequence[torch.Tensor], flagged: Sequence[str]
) -> None:
    """The shift measured by :func:`varshift.diagnose.measure` on ``batches``: precise (noise
    off) over training-style (noise on) variance, every BatchNorm on batch statistics; at
    lint's worst BatchNorm and the smallest over the flagged ones."""
    shifts = measure(model, batches, recalibrate=True, progress=False)
    measured = {
        layer.name: layer.noise_shift
        for layer in shifts.layers
        if layer.name in flagged and layer.noise_shift is not None
        and math.isfinite(layer.noise_shift)
    }
    row.measured_at_bn = measured.get(row.min_shift_bn)
    if measured:
        row.measured_min_bn = min(measured, key=lambda name: measured[name])
        row.measured_min = measured[row.measured_min_bn]


def compare(flagged: set[str], dynamic: set[str]) -> str:
    if flagged == dynamic:
        return "agrees"
    return f"missed {len(dynamic - flagged)}, extra {len(flagged - dynamic)}"


class SurveyTimeoutError(Exception):
    """A model ran past the survey's time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SurveyTimeoutError` in the main thread after ``seconds`` (POSIX only; no limit
    elsewhere or for ``seconds <= 0``)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise SurveyTimeoutError(f"over the {seconds:g} s limit per model")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_survey(
    specs: Sequence[ModelSpec],
    *,
    timeout: float,
    cross_check: CrossCheck | None = None,
    measured: bool = False,
    progress: Callable[[str], None] | None = None,
    csv_path: Path | None = None,
) -> list[SurveyRow]:
    """Survey ``specs`` in :func:`run_order` and return the rows in the order of ``specs``;
    with ``csv_path``, the CSV is rewritten after every model so that a crash keeps the rows
    done so far. An interrupt (Ctrl-C, ``kill -INT``) ends the survey early: the models not
    yet run become "not run" rows, and the caller still writes its files."""
    done: dict[str, SurveyRow] = {}
    order = run_order(specs)
    began = time.perf_counter()
    try:
        for index, spec in enumerate(order, 1):
            start = time.perf_counter()
            if spec.skip:
                row = SurveyRow(spec.library, spec.title, spec.family, spec.config(), spec.size,
                                spec.batch, status=f"skipped: {spec.skip}")
            else:
                with time_limit(timeout):
                    row = survey_model(spec, cross_check, measured=measured)
            gc.collect()
            done[_key(spec)] = row
            if csv_path is not None:
                csv_path.write_text(write_csv(_in_order(specs, done)), encoding="utf-8")
            if progress is not None:
                progress(f"[{index}/{len(order)}] {progress_line(row)} "
                         f"({time.perf_counter() - start:.1f} s)")
    except KeyboardInterrupt:
        elapsed = time.perf_counter() - began
        for spec in specs:
            done.setdefault(_key(spec), SurveyRow(
                spec.library, spec.title, spec.family, spec.config(), spec.size, spec.batch,
                status=f"skipped: not run, the survey was interrupted after {elapsed:.0f} s"))
    return _in_order(specs, done)


def run_order(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """The models most likely to have noise feeding BatchNorm first (timm's, torchvision's
    EfficientNets and MaxViT, the variants), so that an interrupted run has surveyed them."""

    def rank(spec: ModelSpec) -> int:
        if spec.label:
            return 2
        if spec.library == "timm":
            return 0
        return 1 if spec.family in TORCHVISION_NOISY else 3

    return sorted(specs, key=rank)  # stable: the given order within each rank


def _key(spec: ModelSpec) -> str:
    return f"{spec.library}/{spec.title}"


def _in_order(specs: Sequence[ModelSpec], done: Mapping[str, SurveyRow]) -> list[SurveyRow]:
    return [done[_key(spec)] for spec in specs if _key(spec) in done]


def progress_line(row: SurveyRow) -> str:
    head = f"{row.library} {row.model}"
    if not row.ok:
        return f"{head}: {row.status}"
    shift = "-" if row.min_shift is None else f"{row.min_shift:.3f}"
    measured = "-" if row.measured_at_bn is None else f"{row.measured_at_bn:.3f}"
    check = f" check={row.cross_check}" if row.cross_check else ""
    return (f"{head}: bn={row.batchnorms} flagged={row.flagged} [{row.by_kind}] "
            f"min_shift={shift} measured={measured} lint={row.lint_seconds:.1f}s{check}")


# --- writing -------------------------------------------------------------------------------


def write_csv(rows: Sequence[SurveyRow]) -> str:
    out = io.StringIO()
    names = [f.name for f in fields(SurveyRow)]
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        writer.writerow({key: _csv_value(value) for key, value in values.items()})
    return out.getvalue()


def read_csv(text: str) -> list[SurveyRow]:
    """The rows of :func:`write_csv`'s output (to re-render the Markdown without re-running)."""
    kinds = {f.name: f.type for f in fields(SurveyRow)}
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        values: dict[str, Any] = {}
        for name, raw in record.items():
            kind = str(kinds[name])
            if kind in ("int",):
                values[name] = int(raw)
            elif kind == "float":
                values[name] = float(raw) if raw else math.nan
            elif kind == "float | None":
                values[name] = float(raw) if raw else None
            else:
                values[name] = raw
        rows.append(SurveyRow(**values))
    return rows


def _csv_value(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def format_shift(shift: float | None, stderr: float | None = None, basis: str = "") -> str:
    if shift is None:
        return "–"
    if basis == "estimated" and stderr is not None:
        return f"{shift:.3f} ± {stderr:.3f}"
    return f"{shift:.3f}"


_COLUMNS = (
    ("model", "---"), ("config", "---"), ("input", "---"), ("params (M)", "--:"), ("BN", "--:"),
    ("BN fed by noise", "--:"), ("by kind", "---"), ("min Δ", "--:"), ("at BN", "---"),
("lint (s)", "--:"), ("check", "---"),
)
_MEASURED_COLUMNS = (("measured Δ there", "--:"), ("measured min Δ", "--:"))


def table_lines(rows: Sequence[SurveyRow]) -> list[str]:
    """A Markdown table, one line per row; the measured columns only where some row has them."""
    measured = any(row.measured_at_bn is not None for row in rows)
    columns = [*_COLUMNS[:9], *(_MEASURED_COLUMNS if measured else ()), *_COLUMNS[9:]]
    lines = [_table_line(name for name, _ in columns), _table_line(rule for _, rule in columns)]
    for row in rows:
        head = [row.model, row.config, _input(row)]
        if not row.ok:
            lines.append(_table_line([*head, "", "", "", _cell(row.status)]
                                     + [""] * (len(columns) - 7)))
            continue
        cells = [
            *head, f"{row.params_m:.1f}", str(row.batchnorms), str(row.flagged), row.by_kind,
            format_shift(row.min_shift, row.min_shift_stderr, row.min_shift_basis),
            _cell(row.min_shift_bn),
        ]
        if measured:
            cells += [format_shift(row.measured_at_bn), format_shift(row.measured_min)]
        lines.append(_table_line([*cells, f"{row.lint_seconds:.1f}", row.cross_check]))
    return lines


def _table_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _input(row: SurveyRow) -> str:
    return f"{row.batch}×{row.input_size}²"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_lines(rows: Sequence[SurveyRow], variants: Sequence[str]) -> list[str]:
    """The summary: per library, how many models have BatchNorm, noise, noise feeding BN (by
    family and kind); then the strongest predicted shifts."""
    lines: list[str] = []
    main = [row for row in rows if row.model not in variants]
    for library in dict.fromkeys(row.library for row in main):
        own = [row for row in main if row.library == library]
        done = [row for row in own if row.ok]
        with_bn = [row for row in done if row.batchnorms]
        fed = [row for row in done if row.flagged]
        noisy_no_feed = [row for row in with_bn if row.noise_layers and not row.flagged]
        families = Counter(row.family for row in fed)
        kinds: Counter[str] = Counter()
        for row in fed:
            kinds.update(part.rsplit(" ", 1)[0] for part in row.by_kind.split(", ") if part)
        text = (
            f"- **{library}**: {len(own)} models surveyed ({len(own) - len(done)} skipped or "
            f"failed); {len(with_bn)} with BatchNorm; **{len(fed)} with noise feeding a "
            f"BatchNorm**"
        )
        if fed:
            text += " (" + ", ".join(f"{family} {n}" for family, n in families.most_common())
            text += "; kinds: " + ", ".join(f"{kind} in {n}" for kind, n in kinds.most_common())
            text += ")"
        text += (f"; {len(noisy_no_feed)} more with BatchNorm and noise that reaches none "
                 "(dropout before the classifier)")
        text += f"; {len(done) - len(with_bn)} without BatchNorm."
        lines.append(text)
    ranked = sorted((row for row in rows if row.ok and row.min_shift is not None),
                    key=lambda row: float(row.min_shift or 0.0))
    if ranked:
        lines.append("- Strongest predicted shifts (smallest min Δ; BatchNorm statistics set on "
                     "random images; DropBlock overstated at 64×64, see below):")
        for row in ranked[:10]:
            lines.append(
                f"  - {row.library} {row.model}: "
                f"{format_shift(row.min_shift, row.min_shift_stderr, row.min_shift_basis)} at "
                f"`{row.min_shift_bn}` ({row.by_kind}"
                + (f"; measured there {format_shift(row.measured_at_bn)})"
                   if row.measured_at_bn is not None else ")")
            )
    lines += agreement_lines(rows)
    checked = [row for row in rows if row.cross_check]
    if checked:
        agree = sum(1 for row in checked if row.cross_check == "agrees")
        lines.append(f"- lint's flagged BatchNorms matched a forward-pass check (noise on vs off, "
                     f"`tests/helpers/dynamic_check.py`) on {agree} of {len(checked)} models.")
    return lines


def agreement_lines(rows: Sequence[SurveyRow]) -> list[str]:
    """How far lint's prediction is from the measured shift at the same BatchNorm."""
    pairs = [
        (row, float(row.min_shift), float(row.measured_at_bn))
        for row in rows
        if row.ok and row.min_shift is not None and row.measured_at_bn is not None
    ]
    if not pairs:
        return []
    gaps = sorted(abs(predicted - measured) for _, predicted, measured in pairs)
    far = [(row, p, m) for row, p, m in pairs if abs(p - m) > AGREEMENT]
    text = (
        f"- Predicted against measured Δ at the same BatchNorm, {len(pairs)} models: median gap "
        f"{gaps[len(gaps) // 2]:.3f}, largest {gaps[-1]:.3f}; a gap above {AGREEMENT} in "
        f"{len(far)}"
    )
    if far:
        text += " (" + ", ".join(f"{row.model} {p:.3f} vs {m:.3f}" for row, p, m in far[:8])
        text += ", …)" if len(far) > 8 else ")"
    return [text + "."]


def check_lines(rows: Sequence[SurveyRow]) -> list[str]:
    """A note on the models where the forward-pass check disagrees with lint, if any."""
    disagree = [row for row in rows if row.cross_check not in ("", "agrees")]
    if not disagree:
        return []
    names = ", ".join(f"{row.library} {row.model} ({row.cross_check})" for row in disagree)
    text = (
        f"- **Where the check disagrees** ({names}): *extra* counts BatchNorms lint flags whose "
        "input the forward pass did not change beyond its relative tolerance of 1e-5, *missed* "
        "the reverse."
    )
    if any(row.family == "fastvit" for row in disagree):
        text += (
            " FastViT's extras are real: each block scales its drop-path branch by a layer "
            "scale initialized to 1e-5, so at init the noise reaches the BatchNorm but moves "
            "it by almost nothing (hence Δ = 1.000); training grows the scale."
        )
    return [text]


def measurement_lines(rows: Sequence[SurveyRow]) -> list[str]:
    """The bullet on the measured columns, or on their absence."""
    if any(row.measured_at_bn is not None for row in rows):
        return [
            f"- **Measured Δ** comes from `varshift.diagnose.measure` on {DRAWS} further batches "
            "of random images (each a fresh noise draw): the BatchNorm input's variance with "
            "the noise off over that with the noise on, every BatchNorm normalizing with batch "
            "statistics as in training (`LayerShift.noise_shift`, averaged over channels). "
            "*measured Δ there* is at the BatchNorm of *min Δ*; *measured min Δ* the smallest "
            "over the flagged BatchNorms. Predicted and measured answer slightly different "
            "questions (statistics frozen against batch statistics upstream) on small samples."
        ]
    return [
        "- **Predicted, not measured.** This run has no measured column (`--measure` adds one, "
        "at several times the run time). In trial runs on torchvision efficientnet_b0/b1 the "
        "shift measured with `varshift.diagnose.measure` (every BatchNorm on batch statistics, "
        "as in training) was weaker than predicted: about 0.86–0.94 against 0.80–0.85. Part of "
        "the gap is lint's: it labels a prediction exact when the path along the trunk is "
        "linear, although the same noise also reaches the BatchNorm through later blocks' "
        "non-linear branches (efficientnet_b0, stochastic depth of block 6.1 at "
        "`features.7.0.block.0.1`: lint 0.943 exact, measured 0.763 with that source alone and "
        "every BatchNorm frozen; for block 6.3, a purely linear path, 0.867 against 0.863)."
    ]


def header_line(rows: Sequence[SurveyRow], meta: SurveyMeta) -> str:
    """The line under the title: command, date, versions, wall time, machine."""
    return (
        f"Generated by `{meta.command}` on {meta.date} ({meta.versions}); {len(rows)} rows in "
        f"{meta.wall_seconds:.0f} s of wall time on {meta.machine}."
        + (f" {meta.note}" if meta.note else "")
    )


_HEADER_START = "Generated by `"


def write_markdown(rows: Sequence[SurveyRow], header: str, variants: Sequence[str]) -> str:
    """The whole document; ``header`` is :func:`header_line`'s line."""
    lines = [
        "# The model zoo: which BatchNorms does training-time noise feed?",
        "",
        header,
        "",
        "## Summary",
        "",
        *summary_lines(rows, variants),
        "",
        "## How to read this",
        "",
        "- **Δ = Var_test / Var_train** at a BatchNorm's input, as predicted by "
        "`varshift.diagnose.lint(model, example_inputs=x)` with all the noise reaching it on. "
        "Δ < 1: at test time (noise off) the BatchNorm sees a smaller variance than the running "
        "variance it learnt in training. **min Δ** is the smallest over a model's flagged "
        "BatchNorms, i.e. the strongest shift; 1.000 means none. ± is the Monte Carlo standard "
        "error where lint estimated it (non-linear path); other figures are lint's closed "
        "form. lint predicts with every other BatchNorm in eval mode (frozen statistics).",
        *measurement_lines(rows),
        "- **Random initialization, not trained weights.** Training moves every figure here. In "
        "particular timm's ResNets and RegNets zero-initialize the last BatchNorm of each "
        "residual branch (`zero_init_last=True`): at init a dropped branch adds nothing, so "
        "drop path's shift there is 1; the *Variants* rows show two of them with "
        "`zero_init_last=False`, which is roughly where training takes those weights.",
        f"- **BatchNorm statistics.** *min Δ* is predicted after noise-off forwards of "
        f"{CALIBRATION_IMAGES} other random images have set every BatchNorm's running "
        "statistics (the normalization a network does at the start of training). The buffers "
        "as built (mean 0, variance 1) make each BatchNorm in eval mode pass activations "
        "through unscaled, so branch and trunk keep their raw init scales and the shift "
        "mostly vanishes: see the *Variants* row of efficientnet_b0.",
        f"- **Small inputs**: lint's example batch is {SMALL_BATCH} random images of "
        f"{SMALL_SIZE}×{SMALL_SIZE} ({LARGE_BATCH} of 224×224 for ViT, Swin and MaxViT, "
        f"{LARGE_BATCH} of 299×299 for Inception v3). The deepest feature maps (2×2 at 64×64) "
        "then give each channel's variance only 16 values, and the minimum over dozens of "
        "noisy per-BatchNorm estimates is biased low: torchvision efficientnet_b0's min Δ was "
        "0.77–0.80 with 2 images and about 0.85–0.86 with 8 in trial runs, so read the "
        "figures as ±0.05. At 64×64, DropBlock's 5×5/3×3 blocks cover the deepest maps whole "
        "and act as channel dropout, so its figures overstate what 224×224 inputs would get.",
        f"- **Rates**: torchvision models use torchvision's defaults (e.g. EfficientNet's "
        f"`stochastic_depth_prob=0.2`, MaxViT's 0.2; DenseNet's `drop_rate=0`). {RATE_RULE}",
        "- **Counts**: *BN* counts normalizations with running statistics; *BN fed by noise* those "
        "with a stochastic layer upstream and no other such normalization in between (lint's "
        "findings); *by kind* splits them by the type of the noise source (a BatchNorm reached "
        "by two kinds counts under both). *lint (s)* is the time of the lint call behind *min "
        "Δ* (with predictions); *check* compares the flagged set with a forward pass that "
        "switches the noise on and off (`tests/helpers/dynamic_check.py`; models with "
        "BatchNorm only).",
        *check_lines(rows),
        "",
    ]
    for library in dict.fromkeys(row.library for row in rows if row.model not in variants):
        own = [row for row in rows if row.library == library and row.model not in variants]
        lines += [f"## {library}", "", *table_lines(own), ""]
    variant_rows = [row for row in rows if row.model in variants]
    if variant_rows:
        lines += ["## Variants", "", "The same models with one setting changed.", "",
                  *table_lines(variant_rows), ""]
    problems = [row for row in rows if not row.ok]
    lines += ["## Skipped and failed", ""]
    lines += [f"- {row.library} {row.model}: {row.status}" for row in problems] or ["- none"]
    return "\n".join(lines) + "\n"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for module in ("torchvision", "timm"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{module} not installed")
    return ", ".join(parts)


def machine(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{threads}, load average {load:.1f} at the start")


def load_cross_check() -> CrossCheck:
    """The forward-pass check of the test suite (``tests/helpers/dynamic_check.py``)."""
    sys.path.insert(0, str(REPO / "tests"))
    check: CrossCheck = importlib.import_module("helpers.dynamic_check").noise_fed_batchnorms
    return check


def command_line(args: argparse.Namespace) -> str:
    """The command that regenerates the survey with ``args`` (the header's note left out)."""
    words = [SCRIPT, f"--threads {args.threads}"]
    if args.quick:
        words.append("--quick")
    if args.timeout != DEFAULT_TIMEOUT:
        words.append(f"--timeout {args.timeout:g}")
    if args.measure:
        words.append("--measure")
    if args.no_cross_check:
        words.append("--no-cross-check")
    if args.only:
        words.append("--only " + " ".join(args.only))
    if args.output != DEFAULT_OUTPUT:
        words.append(f"--output {args.output}")
    return " ".join(words)


def render_only(output: Path, quick: bool) -> int:
    """Rewrite ``output`` from the CSV beside it and the header line it already has."""
    old = output.read_text(encoding="utf-8").splitlines()
    header = next((line for line in old if line.startswith(_HEADER_START)), None)
    if header is None:
        raise SystemExit(f"zoo_survey: error: {output} has no line starting {_HEADER_START!r}")
    rows = read_csv(output.with_suffix(".csv").read_text(encoding="utf-8"))
    variants = [spec.title for spec in all_specs(quick) if spec.label]
    output.write_text(write_markdown(rows, header, variants), encoding="utf-8")
    print(f"rewrote {output} from {output.with_suffix('.csv')}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of small models")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="the Markdown file; the CSV goes beside it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds per model before it is skipped (0: no limit)")
    parser.add_argument("--no-cross-check", action="store_true",
                        help="skip the forward-pass check of lint's flagged set")
    parser.add_argument("--measure", action="store_true",
                        help=f"also measure the shift (varshift.diagnose.measure, {DRAWS} batches)")
    parser.add_argument("--only", nargs="*", help="survey only these model names")
    parser.add_argument("--note", default="", help="a sentence added to the header")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the Markdown from the CSV beside it, keeping its header line "
                        "(after a change to the text; runs no model)")
    args = parser.parse_args(argv)
    if args.render_only:
        return render_only(args.output, args.quick)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    specs = all_specs(args.quick)
    if args.only:
        specs = [spec for spec in specs if spec.name in args.only or spec.title in args.only]
    variants = [spec.title for spec in specs if spec.label]
    cross_check = None if args.no_cross_check else load_cross_check()
    meta = SurveyMeta(
        command=command_line(args),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions(),
        machine=machine(args.threads),
        note=args.note,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run_survey(specs, timeout=args.timeout, cross_check=cross_check, measured=args.measure,
                      progress=lambda line: print(line, file=sys.stderr, flush=True),
                      csv_path=args.output.with_suffix(".csv"))
    meta.wall_seconds = time.perf_counter() - start
    markdown = write_markdown(rows, header_line(rows, meta), variants)
    args.output.write_text(markdown, encoding="utf-8")
    print(f"wrote {args.output} and {args.output.with_suffix('.csv')} "
          f"({meta.wall_seconds:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
