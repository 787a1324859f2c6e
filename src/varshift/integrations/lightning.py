"""A PyTorch Lightning callback that re-estimates BatchNorm statistics with dropout off.

Every BatchNorm re-estimator a Lightning user reaches today keeps dropout on:
:func:`torch.optim.swa_utils.update_bn` calls ``model.train()``, and Lightning's
``StochasticWeightAveraging`` re-estimates the averaged model's statistics in one extra epoch of
training-mode forwards. A model with dropout before a BatchNorm is then evaluated with the
variance its BatchNorms saw *with* noise (Li et al., CVPR 2019). :class:`RecalibrateBatchNorm`
replaces those statistics by estimates with dropout and every registered noise off
(:func:`varshift.fix.recalibrate_bn`):

- at the end of training (``on_train_end``, while the model is still on its device, before the
  trainer moves it back to the CPU), so that the model ``fit`` returns and a checkpoint saved
  afterwards (``trainer.save_checkpoint``) carry the fixed statistics;
- optionally before every validation run of ``fit`` (``before_validation=True``), so that the
  validation metrics, ``ModelCheckpoint`` and ``EarlyStopping`` see test-time statistics. The
  re-estimated statistics stay in the model (a checkpoint saved after that validation holds
  them); training then updates the moving averages as usual.

*With StochasticWeightAveraging* the callback runs *after* SWA's own BatchNorm update and
overwrites it. SWA copies the averaged weights into the model at the start of its extra epoch
(when the model has a BatchNorm and ``max_epochs`` is set), re-estimates the statistics with
dropout on during that epoch, and in its ``on_train_end`` only restores momenta; our
``on_train_end`` then re-estimates the statistics of the averaged weights with dropout off.
Replacing SWA's epoch instead would mean editing the private loop state SWA drives
(``fit_loop.max_batches``, ``_skip_backward``), which changes between Lightning versions; what
keeping it costs is one forward pass over the training data. With ``max_epochs=-1`` SWA copies
the averaged weights only in its ``on_train_end``, so list this callback *after* SWA in
``callbacks`` (it warns when it finds SWA after itself).

Needs ``pytorch_lightning`` (``pip install 'varshift[lightning]'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from varshift.diagnose.bn_stats import batch_norms
from varshift.integrations.loop import Recalibration, Recalibrator

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback, StochasticWeightAveraging
    from pytorch_lightning.trainer.states import TrainerFn
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "varshift.integrations.lightning needs PyTorch Lightning: pip install 'varshift[lightning]'"
    ) from error

__all__ = ["RecalibrateBatchNorm"]


class RecalibrateBatchNorm(Callback):
    """Re-estimate BatchNorm statistics with dropout off at the end of ``fit`` and, optionally,
    before each validation run of ``fit``; log what changed.

    Args:
        data: the batches to estimate from (re-iterable: a ``DataLoader`` or a list; tensors,
            ``(x, y)`` tuples or dicts). ``None`` (default): the trainer's training
            dataloader, which must then be a single loader.
        samples, batches: estimate from exactly this many samples / at most this many batches
            (``None``, both: one full pass over ``data``).
        layers: qualified names of the BatchNorms to re-estimate, or of modules containing
            them; the others keep their statistics. ``None``: all.
        at_train_end: re-estimate in ``on_train_end`` (default ``True``).
        before_validation: re-estimate before each validation run during ``fit`` (not in the
            sanity check, nor in ``trainer.validate``). Costs one estimation pass per
            validation.
        measure_batches: before each re-estimation run :func:`varshift.diagnose.measure` on
            this many batches (about four forwards each) and log the variance shift, the
            stored/dropout-off mismatch before and after, and the loss and accuracy with the
            old and new statistics; ``0`` logs only ``var_change`` and ``seconds``.
        exact, input_fn, target_fn, loss_fn: see :class:`varshift.integrations.Recalibrator`;
            ``input_fn`` picks the model input from a batch (default: the first tensor of a
            tuple, ``batch["input"]``-style keys of a dict), the model is called as
            ``pl_module(input)``.
        prefix: key prefix of the logged metrics.

    Metrics (:meth:`Recalibration.metrics <varshift.integrations.Recalibration.metrics>`) go to
    every logger of the trainer with ``step=trainer.global_step``; every record is kept in
    :attr:`history`. On a model without BatchNorm the callback warns once and does nothing.
    Under DDP every process estimates on its own shard of the data. A training ``DataLoader``
    with ``persistent_workers=True`` reuses one iterator, which a re-estimation in the middle of
    an epoch (``val_check_interval < 1``) would reset: give such runs their own ``data``.
    """

    def __init__(
        self,
        *,
        data: Iterable[Any] | None = None,
        samples: int | None = None,
        batches: int | None = None,
        layers: Sequence[str] | None = None,
        at_train_end: bool = True,
        before_validation: bool = False,
        measure_batches: int = 4,
        exact: bool = False,
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Any] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        prefix: str = "varshift/",
    ) -> None:
        super().__init__()
        for name, flag in (
            ("at_train_end", at_train_end),
            ("before_validation", before_validation),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if data is not None and iter(data) is data:
            raise ValueError(
                "data must be re-iterable (a DataLoader or a list of batches), got a one-shot "
                f"iterator ({type(data).__name__}): every re-estimation reads it again"
            )
        self.recalibrator = Recalibrator(
            samples=samples,
            batches=batches,
            layers=layers,
            measure_batches=measure_batches,
            exact=exact,
            input_fn=input_fn,
            target_fn=target_fn,
            loss_fn=loss_fn,
        )
        self.data = data
        self.at_train_end = at_train_end
        self.before_validation = before_validation
        self.prefix = prefix
        self.history: list[Recalibration] = []
        self._has_batch_norm = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._has_batch_norm = bool(batch_norms(pl_module))
        if not self._has_batch_norm:
            warnings.warn(
                f"RecalibrateBatchNorm: {type(pl_module).__name__} has no BatchNorm layer with "
                "running statistics; the callback does nothing",
                UserWarning,
                stacklevel=2,
            )
            return
        self.recalibrator.select(pl_module)  # a wrong `layers` name fails now, not at the end
        # Trainer sets `callbacks` in its connector, out of mypy's sight.
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        later = callbacks[callbacks.index(self) + 1 :]
        if any(isinstance(callback, StochasticWeightAveraging) for callback in later):
            warnings.warn(
                "RecalibrateBatchNorm is listed before StochasticWeightAveraging; list it after "
                "SWA so that it re-estimates the statistics of the averaged weights whatever "
                "max_epochs is",
                UserWarning,
                stacklevel=2,
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.before_validation
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
        ):
            self.recalibrate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            self.recalibrate(trainer, pl_module)

    def recalibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Recalibration | None:
        """Re-estimate now, log the record and return it (``None`` without BatchNorm)."""
        if not self._has_batch_norm:
            return None
        record = self.recalibrator.run(
            pl_module, self._data(trainer), step=int(trainer.global_step)
        )
        self.history.append(record)
        metrics = record.metrics(self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(trainer.global_step))
        return record

    def _data(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.data is not None:
            return self.data
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            raise ValueError(
                "RecalibrateBatchNorm needs one training dataloader to estimate from, found "
                f"{type(loader).__name__}; pass data=... (a DataLoader or a list of batches)"
            )
        return loader  # type: ignore[no-any-return]
