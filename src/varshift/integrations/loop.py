"""Re-estimate BatchNorm statistics with dropout off from inside a training run.

:func:`varshift.fix.recalibrate_bn` fixes a trained model once. A training run needs more: the
statistics fixed every so many steps (so that validation, checkpoints and early stopping see
the statistics the model will have at inference), only some BatchNorms, and a record of what
each re-estimation changed. :class:`Recalibrator` holds those settings and runs one
re-estimation on demand; :class:`PeriodicRecalibration` binds it to a model and a loader for a
hand-written loop (``maybe_recalibrate(step)``). The Lightning callback
(:mod:`varshift.integrations.lightning`) is built on :class:`Recalibrator` too.

What a re-estimation records (:class:`Recalibration`): per BatchNorm, how much the stored
running variance changed (``before / after``, channel mean: above 1 when dropout upstream had
inflated it), and optionally a :func:`varshift.diagnose.measure` report taken just before, which
gives the variance shift itself, the mismatch between stored and dropout-off statistics before
and after, and the loss and accuracy with the old and the new statistics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from varshift.diagnose import ShiftReport, measure
from varshift.diagnose.bn_stats import batch_norms, check_model
from varshift.diagnose.shift_report import channel_mean_ratio
from varshift.fix import recalibrate_bn

__all__ = ["PeriodicRecalibration", "Recalibration", "Recalibrator"]

LossFn = Callable[[Any, Any], Tensor]


@dataclass(frozen=True, eq=False)
class Recalibration:
    """What one re-estimation did.

    ``layers`` are the qualified names of the BatchNorms re-estimated, ``var_change`` per layer
    the channel mean of ``running_var`` before / after (1: nothing changed; above 1: the stored
    variance was inflated, as dropout upstream does). ``report`` is the
    :func:`varshift.diagnose.measure` report taken just before the re-estimation (``None`` when
    ``measure_batches=0``); ``mismatch_after`` is, per layer, the channel mean of the new
    ``running_var`` over that report's dropout-off ``precise_var`` (1 when estimated on the
    same samples). ``step`` is the caller's step counter, ``seconds`` the wall time of the
    whole call, measurement included.
    """

    step: int | None
    layers: tuple[str, ...]
    var_change: tuple[float, ...]
    seconds: float
    report: ShiftReport | None = None
    mismatch_after: tuple[float, ...] | None = None

    @property
    def mean_var_change(self) -> float:
        """:attr:`var_change` averaged over layers."""
        return _mean(self.var_change)

    def metrics(self, prefix: str = "varshift/") -> dict[str, float]:
        """Scalars for a logger, keys prefixed by ``prefix``: ``var_change``, ``seconds`` and,
        with a report, ``shift`` (Li et al.'s eval/train variance ratio), ``mismatch_before``
        and ``mismatch_after`` (stored / dropout-off variance), ``loss_before``/``loss_after``
        and ``accuracy_before``/``accuracy_after`` where measured; layer figures are means
        over the re-estimated layers. Values that were not measured are left out."""
        out: dict[str, float | None] = {
            "var_change": self.mean_var_change,
            "seconds": self.seconds,
        }
        if self.report is not None:
            shifts = [self.report.layer(name) for name in self.layers]
            out["shift"] = _mean([entry.mean_ratio for entry in shifts])
            out["mismatch_before"] = _mean([entry.inference_mismatch for entry in shifts])
            out["mismatch_after"] = _mean(self.mismatch_after or ())
            out["loss_before"] = self.report.loss_before
            out["loss_after"] = self.report.loss_after
            out["accuracy_before"] = self.report.accuracy_before
            out["accuracy_after"] = self.report.accuracy_after
        return {
            f"{prefix}{key}": float(value)
            for key, value in out.items()
            if value is not None and not math.isnan(value)
        }


class Recalibrator:
    """Settings for re-estimating BatchNorm statistics with dropout off, and :meth:`run`.

    Args:
        samples, batches: estimate from exactly this many samples / at most this many batches
            of the data (``None``, both: one full pass), as in :func:`recalibrate_bn`.
        layers: qualified names of the BatchNorms to re-estimate, or of modules containing
            them (``"blocks.2"`` selects every BatchNorm under it); the others keep their
            statistics. ``None``: every BatchNorm.
        measure_batches: before each re-estimation, run :func:`varshift.diagnose.measure` on
            this many batches of the data and keep its report (it costs about four forwards
            per batch); ``0`` measures nothing.
        exact, input_fn: passed to :func:`recalibrate_bn`; ``input_fn`` also to ``measure``.
        target_fn, loss_fn: passed to ``measure`` (loss and accuracy before and after).

    Raises:
        ValueError: ``samples``, ``batches`` below 1, ``measure_batches`` below 0, both
            ``samples`` and ``batches``, an empty ``layers``.
        TypeError: one of them is not an int (or ``layers`` is a bare string).
    """

    def __init__(
        self,
        *,
        samples: int | None = None,
        batches: int | None = None,
        layers: Sequence[str] | None = None,
        measure_batches: int = 0,
        exact: bool = False,
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Any] | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        _check_count("samples", samples, minimum=1)
        _check_count("batches", batches, minimum=1)
        _check_count("measure_batches", measure_batches, minimum=0)
        if samples is not None and batches is not None:
            raise ValueError(
                f"give samples or batches, not both; got samples={samples}, batches={batches}"
            )
        if isinstance(layers, str):
            raise TypeError(f"layers must be a sequence of names, not a string: {layers!r}")
        if layers is not None and len(layers) == 0:
            raise ValueError("layers must name at least one module, got an empty sequence")
        self.samples = samples
        self.batches = batches
        self.layers = None if layers is None else tuple(layers)
        self.measure_batches = measure_batches
        self.exact = exact
        self.input_fn = input_fn
        self.target_fn = target_fn
        self.loss_fn = loss_fn

    def select(self, model: nn.Module) -> list[tuple[str, _BatchNorm]]:
        """The BatchNorms :meth:`run` re-estimates in ``model``, by qualified name; ``[]`` for a
        model without BatchNorm. ``ValueError`` when a name in ``layers`` selects none."""
        named = batch_norms(check_model(model))
        if self.layers is None or not named:
            return named
        chosen: list[tuple[str, _BatchNorm]] = []
        for wanted in self.layers:
            hits = [(name, bn) for name, bn in named if _inside(name, wanted)]
            if not hits:
                raise ValueError(
                    f"layers: {wanted!r} is neither a BatchNorm nor a module containing one; "
                    f"BatchNorms of the model: {[name for name, _ in named]}"
                )
            chosen += [hit for hit in hits if hit not in chosen]
        return chosen

    def run(
        self, model: nn.Module, data: Iterable[Any], *, step: int | None = None
    ) -> Recalibration:
        """Measure (if asked), re-estimate the selected BatchNorms of ``model`` in place over
        ``data`` with dropout and every registered noise off, and record what changed. Every
        module's ``training`` flag is restored (by :func:`recalibrate_bn`); the BatchNorms
        left out keep their buffers. ``ValueError`` for a model without BatchNorm."""
        started = time.perf_counter()
        chosen = self.select(model)
        if not chosen:
            raise ValueError(
                f"model ({type(model).__name__}) has no BatchNorm layer with running "
                "statistics; there is nothing to recalibrate"
            )
        report = None
        if self.measure_batches:
            report = measure(
                model,
                data,
                batches=self.measure_batches,
                input_fn=self.input_fn,
                target_fn=self.target_fn,
                loss_fn=self.loss_fn,
                progress=False,
            )
        before = [_cpu_var(bn) for _, bn in chosen]
        with _kept(bn for _, bn in batch_norms(model) if all(bn is not c for _, c in chosen)):
            recalibrate_bn(
                model,
                data,
                samples=self.samples,
                batches=self.batches,
                exact=self.exact,
                input_fn=self.input_fn,
                progress=False,
            )
        after = [_cpu_var(bn) for _, bn in chosen]
        mismatch = None
        if report is not None:
            precise = [report.layer(name).precise_var for name, _ in chosen]
            mismatch = tuple(
                math.nan if p is None else channel_mean_ratio(new, p)
                for new, p in zip(after, precise)
            )
        return Recalibration(
            step=step,
            layers=tuple(name for name, _ in chosen),
            var_change=tuple(channel_mean_ratio(old, new) for old, new in zip(before, after)),
            seconds=time.perf_counter() - started,
            report=report,
            mismatch_after=mismatch,
        )


class PeriodicRecalibration:
    """Re-estimate a model's BatchNorm statistics with dropout off every ``every`` steps of a
    hand-written training loop, and once more at the end::

        recal = PeriodicRecalibration(model, train_loader, every=500, samples=4096)
        for x, y in batches:
            ...  # forward, backward, optimizer.step()
            step += 1
            recal.maybe_recalibrate(step)  # re-estimates when step is a multiple of 500
        recal.recalibrate(step)            # the statistics the model is saved with

    ``data`` must be re-iterable (a ``DataLoader``, a list of batches): every call starts a new
    pass over it. Between re-estimations training goes on updating the moving averages as
    usual (with dropout on), so evaluate right after a re-estimation. The other keyword
    arguments are :class:`Recalibrator`'s. Every record is kept in :attr:`history`.

    Raises:
        TypeError: ``model`` is not a module; ``every`` is not an int.
        ValueError: ``every`` below 1; ``data`` is a one-shot iterator; ``model`` has no
            BatchNorm with running statistics; a bad ``layers`` name; the
            :class:`Recalibrator` errors.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        every: int | None = None,
        **settings: Any,
    ) -> None:
        check_model(model)
        _check_count("every", every, minimum=1)
        if iter(data) is data:
            raise ValueError(
                "data must be re-iterable (a DataLoader or a list of batches), got a one-shot "
                f"iterator ({type(data).__name__}): every re-estimation reads it again"
            )
        self.recalibrator = Recalibrator(**settings)
        if not self.recalibrator.select(model):
            raise ValueError(
                f"model ({type(model).__name__}) has no BatchNorm layer with running "
                "statistics; there is nothing to recalibrate"
            )
        self.model = model
        self.data = data
        self.every = every
        self.history: list[Recalibration] = []

    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_recalibrate` would re-estimate at ``step``: a positive multiple
        of ``every`` not re-estimated yet."""
        if self.every is None or step < 1 or step % self.every:
            return False
        return not self.history or self.history[-1].step != step

    def maybe_recalibrate(self, step: int) -> Recalibration | None:
        """Re-estimate when :meth:`due`; the record, or ``None`` when nothing ran."""
        return self.recalibrate(step) if self.due(step) else None

    def recalibrate(self, step: int | None = None) -> Recalibration:
        """Re-estimate now; the record is appended to :attr:`history` and returned."""
        record = self.recalibrator.run(self.model, self.data, step=step)
        self.history.append(record)
        return record


def _check_count(name: str, value: int | None, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum} or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _inside(name: str, wanted: str) -> bool:
    """Whether the module called ``name`` is ``wanted`` or lies under it."""
    return wanted == "" or name == wanted or name.startswith(wanted + ".")


def _cpu_var(bn: _BatchNorm) -> Tensor:
    assert bn.running_var is not None  # batch_norms() keeps only layers with statistics
    return bn.running_var.detach().double().cpu().clone()


def _mean(values: Iterable[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@contextmanager
def _kept(bns: Iterable[_BatchNorm]) -> Iterator[None]:
    """Put the buffers of ``bns`` back as they were when the block exits, even on error."""
    saved = [
        (buffer, buffer.detach().clone())
        for bn in bns
        for buffer in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
