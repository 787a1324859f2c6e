"""What :func:`varshift.diagnose.lint` returns: a :class:`LintReport` of :class:`Finding` records
(one per normalization layer with running statistics and stochastic layer upstream of it), the
:class:`StochasticLayer` records of every noise layer or call, and the :class:`UnaffectedNorm`
records of the normalizations that use no running statistics; printed as a table, and written to
and read from JSON.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BnPrediction", "Finding", "LintReport", "StochasticLayer", "UnaffectedNorm"]


@dataclass(frozen=True)
class Finding:
    """A normalization layer with running statistics whose input depends on a stochastic layer.

    Attributes:
        bn: qualified name of the normalization module (or ``F.batch_norm@owner``).
        bn_type: its class name, e.g. ``"BatchNorm2d"``.
        source: the stochastic layer upstream: a module's qualified name, or
            ``"F.dropout@block1"`` for a functional call made in ``block1``'s ``forward``
            (``<root>`` for the model's own ``forward``; ``#2`` marks a second such call).
        source_type: ``"module"`` or ``"function"``.
        noise: the noise kind in :mod:`varshift.theory` terms (``"bernoulli"``, ``"gaussian"``,
            ``"uout"``…), ``None`` when the registry does not model it (alpha dropout, a bare
            ``torch.rand_like``).
        rate: its strength: the drop probability ``p``, or ``β`` for Uout; ``None`` if unknown.
        rate_name: ``"p"``, ``"beta"`` or the kind's own parameter name.
        path: the names of the calls from ``source`` to ``bn``, both included (a shortest path).
        predicted_shift: ``Δ = Var_test / Var_train`` at ``bn`` with this source's noise alone
            (every other noise off), ``None`` when the noise is not modelled. With
            ``example_inputs``: exact where the path is linear, a Monte Carlo estimate
            otherwise; without them (or where the exact pass cannot reach: a functional or
            instance norm, a functional source traced by hooks), the single-path formula of
            :func:`varshift.theory.variance_shift` (see :func:`lint`). :attr:`basis` says which.
        width: fan-in ``d`` of the first linear/conv on the path (``None``: no weight layer).
        cos2: mean ``cos²θ`` of that layer's weights, as used in the prediction.
        rho: the correlation ``ρ`` between its inputs used in the prediction.
        measured: whether the mean and variance came from ``example_inputs`` (else zero-mean
            input was assumed).
        exact: ``True``: the closed form through a linear path; ``False``: a Monte Carlo
            estimate on ``example_inputs`` (see ``stderr``); ``None``: the single-path formula.
        stderr: the estimate's standard error over mask draws (``None`` unless estimated).
    """

    bn: str
    bn_type: str
    source: str
    source_type: str
    noise: str | None
    rate: float | None
    rate_name: str | None
    path: tuple[str, ...]
    predicted_shift: float | None
    width: int | None = None
    cos2: float | None = None
    rho: float | None = None
    measured: bool = False
    exact: bool | None = None
    stderr: float | None = None

    @property
    def basis(self) -> str:
        """``"exact"``, ``"estimated"`` (Monte Carlo), ``"formula"`` (single-path formula on
        measured moments) or ``"assumed"`` (no data: zero-mean input, the worst case)."""
        return _basis(self.exact, self.measured)


@dataclass(frozen=True)
class BnPrediction:
    """The predicted shift of one flagged normalization with all its noise on.

    ``sources``: the noise sources counted (with ``example_inputs``, every modelled source
    whose noise reaches it before any other normalization); ``nearest``: the source
    of its finding with the shortest path. ``shift``: with ``example_inputs``, the exact or
    Monte Carlo prediction with all sources on together; otherwise its findings' shifts
    combined as independent noise (extra variances add). ``exact`` and ``stderr`` as in
    :class:`Finding`."""

    bn: str
    bn_type: str
    sources: tuple[str, ...]
    nearest: str
    shift: float | None
    exact: bool | None = None
    stderr: float | None = None

    @property
    def basis(self) -> str:
        return _basis(self.exact, self.exact is not None)


@dataclass(frozen=True)
class StochasticLayer:
    """A stochastic module or functional call found in the model.

    ``feeds`` names the normalization layers it reaches (empty: it feeds none, e.g. dropout
    before the classifier); ``called`` is ``False`` for a registered noise module that the
    traced ``forward`` never used."""

    name: str
    source_type: str
    type_name: str
    noise: str | None
    rate: float | None
    rate_name: str | None
    feeds: tuple[str, ...] = ()
    called: bool = True

    @property
    def feeds_bn(self) -> bool:
        return bool(self.feeds)


@dataclass(frozen=True)
class UnaffectedNorm:
    """A normalization that uses no running statistics, so no variance shift; ``fed_by_noise``
    tells whether a stochastic layer reaches it (which is then harmless)."""

    name: str
    type_name: str
    reason: str
    fed_by_noise: bool = False


@dataclass
class LintReport:
    """What :func:`lint` found. ``ok`` is ``True`` when no finding was made.

    ``method`` is ``"fx"`` or ``"hooks"``; ``predictions`` holds one :class:`BnPrediction` per
    flagged normalization, in model order; ``batchnorms`` names every normalization with running
    statistics that was checked, flagged or not; ``notes`` holds everything else worth knowing
    (why fx failed, which assumptions the predictions make). ``str(report)`` is
    :meth:`format`."""

    findings: list[Finding]
    method: str
    predictions: dict[str, BnPrediction] = field(default_factory=dict)
    stochastic_layers: list[StochasticLayer] = field(default_factory=list)
    unaffected: list[UnaffectedNorm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batchnorms: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def flagged(self) -> list[str]:
        """The names of the normalization layers with at least one finding, in model order."""
        return list(dict.fromkeys(finding.bn for finding in self.findings))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; :meth:`from_dict` reads it back."""
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LintReport:
        return cls(
            findings=[Finding(**{**f, "path": tuple(f["path"])}) for f in data["findings"]],
            method=data["method"],
            predictions={
                bn: BnPrediction(**{**p, "sources": tuple(p["sources"])})
                for bn, p in data.get("predictions", {}).items()
            },
            stochastic_layers=[
                StochasticLayer(**{**s, "feeds": tuple(s["feeds"])})
                for s in data.get("stochastic_layers", [])
            ],
            unaffected=[UnaffectedNorm(**u) for u in data.get("unaffected", [])],
            notes=list(data.get("notes", [])),
            batchnorms=list(data.get("batchnorms", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> LintReport:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        return self.format()

    def format(self, *, verbose: bool = False, width: int = 120) -> str:
        """The report for a terminal: the summary line first, then one row per flagged
        BatchNorm (how many noise sources reach it, the nearest one and its rate, the predicted
        shift with all of them on), module paths shortened in the middle so that no line is
        longer than ``width``; then one line each on the stochastic layers, the unaffected
        normalizations and the notes. ``verbose=True`` lists every (BatchNorm, source) pair with
        its full path, every stochastic layer and unaffected normalization, unshortened (lines
        may then exceed ``width``); :meth:`to_json` keeps everything too."""
        if width < _MIN_WIDTH:
            raise ValueError(f"width must be at least {_MIN_WIDTH}, got {width}")
        if verbose:
            return "\n".join([self._summary(width=None), *_verbose_lines(self)])
        lines = [self._summary(width=width)]
        if self.findings:
            lines += _bn_rows(self, width)
        lines += _digest_lines(self, width)
        return "\n".join(line.rstrip() for line in lines)

    def _summary(self, width: int | None) -> str:
        head = f"varshift lint ({self.method}): "
        checked = max(len(self.batchnorms), len(self.flagged))
        if self.ok:
            return head + f"no BatchNorm layer is fed by a stochastic layer ({checked} checked)"
        count = len(self.flagged)
        layers = "layer is" if count == 1 else "layers are"
        text = head + f"{count} BatchNorm {layers} fed by a stochastic layer, of {checked}"
        worst = _worst(self.predictions.values())
        if worst is None:
            return text + "; no predicted shift"
        shift = _format_shift(worst.shift, worst.basis, worst.stderr)
        text += f"; worst predicted shift {shift} at "
        if width is None or len(text) + len(worst.bn) <= width:
            return text + worst.bn
        if len(text) + _MIN_NAME <= width:
            return text + _shorten(worst.bn, width - len(text))
        # A narrow terminal: the summary wraps rather than losing the name.
        return "\n".join(_wrap(text + worst.bn, width))


_MIN_WIDTH = 80
_MIN_NAME = 12
_MIN_HEAD = 4
_ROW_COLUMNS = ("BatchNorm", "sources", "nearest source", "rate", "predicted shift")
_VERBOSE_COLUMNS = ("BN layer", "upstream noise", "p", "predicted shift", "path")


def _worst(predictions: Iterable[BnPrediction]) -> BnPrediction | None:
    """The prediction with the smallest shift ratio (the largest variance shift)."""
    known = [p for p in predictions if p.shift is not None]
    return min(known, key=lambda p: p.shift or 0.0) if known else None


def _shorten(text: str, room: int | None) -> str:
    """``text`` in at most ``room`` characters, its middle replaced by ``…``: the tail kept
    whole from a ``.`` on where it can be (the last components of a module path say the most),
    the head filling the rest (``F.dropou…denseblock4.denselayer16``)."""
    if room is None or len(text) <= room:
        return text
    if room < 3:
        return text[:room]
    keep = room - 1  # the ellipsis
    starts = [i + 1 for i, char in enumerate(text) if char in ".@" and len(text) - i - 1 <= keep]
    tail_start = min((i for i in starts if len(text) - i <= keep - _MIN_HEAD), default=None)
    if tail_start is None:
        tail_start = len(text) - keep // 2
    tail = text[tail_start:]
    return f"{text[: keep - len(tail)]}…{tail}"


def _bn_rows(report: LintReport, width: int) -> list[str]:
    """One row per flagged normalization, the two name columns shortened to fit ``width``."""
    by_pair = {(f.bn, f.source): f for f in report.findings}
    rows: list[list[str]] = []
    for bn in report.flagged:
        prediction = report.predictions.get(bn)
        if prediction is None:  # a report built by hand: fall back on its findings
            own = [f for f in report.findings if f.bn == bn]
            nearest = min(own, key=lambda f: len(f.path))
            count, shift = len(own), "?"
        else:
            nearest = by_pair.get((bn, prediction.nearest)) or next(
                f for f in report.findings if f.bn == bn
            )
            count = len(prediction.sources)
            shift = _format_shift(prediction.shift, prediction.basis, prediction.stderr)
        rate = _format_rate(nearest.rate, nearest.rate_name, bare_p=False, spec=".3g")
        rows.append([bn, str(count), nearest.source, rate, shift])
    widths = [max(len(row[i]) for row in (_ROW_COLUMNS, *rows)) for i in range(5)]
    excess = sum(widths) + 3 * (len(widths) - 1) - width
    for column in sorted((2, 0), key=lambda c: -widths[c]):  # the longer name column first
        if excess > 0:
            cut = min(excess, widths[column] - max(_MIN_NAME, len(_ROW_COLUMNS[column])))
            widths[column] -= max(cut, 0)
            excess -= max(cut, 0)
    shortened = [[_shorten(cell, widths[i]) for i, cell in enumerate(row)] for row in rows]
    return _text_table(_ROW_COLUMNS, shortened)


def _digest_lines(report: LintReport, width: int) -> list[str]:
    """A few lines: stochastic layers by type, unaffected normalizations by type, the notes,
    each wrapped to ``width``."""
    lines: list[str] = []
    layers = report.stochastic_layers
    if layers:
        feeding = sum(1 for layer in layers if layer.feeds_bn)
        idle = sum(1 for layer in layers if not layer.called)
        types = _count_types(layer.type_name for layer in layers)
        text = f"stochastic layers: {len(layers)} ({types})"
        verb = "feeds" if feeding == 1 else "feed"
        text += f"; {feeding} {verb} a BatchNorm" if feeding else "; none feeds a BatchNorm"
        text += f"; {idle} never called by forward" if idle else ""
        lines += _wrap(text, width)
    if report.unaffected:
        fed = sum(1 for norm in report.unaffected if norm.fed_by_noise)
        types = _count_types(norm.type_name for norm in report.unaffected)
        text = f"not affected (no running statistics): {len(report.unaffected)} ({types})"
        text += f", {fed} fed by noise" if fed else ""
        lines += _wrap(text, width)
    for note in report.notes:
        lines += _wrap(f"- {note}", width, indent="  ")
    if report.findings or layers or report.unaffected:
        hint = "every (BatchNorm, source) pair with its path: report.format(verbose=True), "
        lines += _wrap(hint + "varshift diagnose --verbose, to_json()", width)
    return lines


def _count_types(names: Iterable[str]) -> str:
    counts = Counter(names)
    return ", ".join(f"{count} {name}" for name, count in counts.most_common())


def _wrap(text: str, width: int, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _verbose_lines(report: LintReport) -> list[str]:
    lines: list[str] = []
    if report.findings:
        rows = [
            (
                f.bn,
                f.source,
                _format_rate(f.rate, f.rate_name),
                _format_shift(f.predicted_shift, f.basis, f.stderr),
                " -> ".join(f.path),
            )
            for f in report.findings
        ]
        lines += _text_table(_VERBOSE_COLUMNS, rows)
    if report.predictions:
        lines.append("predicted shift per BatchNorm, all its noise on:")
        lines += [f"  {_prediction_line(p)}" for p in report.predictions.values()]
    if report.stochastic_layers:
        lines.append("stochastic layers:")
        lines += [f"  {_stochastic_layer_line(layer)}" for layer in report.stochastic_layers]
    if report.unaffected:
        lines.append("not affected (no running statistics):")
        for norm in report.unaffected:
            fed = ", fed by noise" if norm.fed_by_noise else ""
            lines.append(f"  {norm.name} ({norm.type_name}{fed}): {norm.reason}")
    if report.notes:
        lines.append("notes:")
        lines += [f"  - {note}" for note in report.notes]
    return lines


def _basis(exact: bool | None, measured: bool) -> str:
    if exact is None:
        return "formula" if measured else "assumed"
    return "exact" if exact else "estimated"


def _format_shift(shift: float | None, basis: str, stderr: float | None) -> str:
    """``0.7721 exact``, ``≈ 0.772 ± 0.004`` (estimated), ``0.7000 assumed``, ``?``."""
    if shift is None:
        return "?"
    if basis == "estimated":
        return f"≈ {shift:.3f} ± {stderr or 0:.3f}"
    return f"{shift:.4f} {basis}"


def _prediction_line(prediction: BnPrediction) -> str:
    count = len(prediction.sources)
    shift = _format_shift(prediction.shift, prediction.basis, prediction.stderr)
    noun = "source" if count == 1 else "sources"
    return f"{prediction.bn}: {shift} ({count} {noun}, nearest {prediction.nearest})"


def _format_rate(
    rate: float | None, name: str | None, *, bare_p: bool = True, spec: str = "g"
) -> str:
    if rate is None:
        return "?"
    if bare_p and name in (None, "p"):
        return format(rate, spec)
    return f"{name or 'p'}={format(rate, spec)}"


def _stochastic_layer_line(layer: StochasticLayer) -> str:
    what = layer.type_name
    if layer.source_type == "function":
        owner = layer.name.partition("@")[2].partition("#")[0]
        what += f" in the forward of {owner}"
    what += ", " + _format_rate(layer.rate, layer.rate_name, bare_p=False)
    if not layer.called:
        return f"{layer.name} ({what}) is never called by forward"
    feeds = ", ".join(layer.feeds) if layer.feeds else "no BatchNorm"
    return f"{layer.name} ({what}) feeds {feeds}"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return [line(header), "-+-".join("-" * width for width in widths), *map(line, rows)]
