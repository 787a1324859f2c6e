"""Run one trial: train the configured model with one seed, then measure its variance shift.

:func:`run_trial` is what every backend calls, in the driver or in a worker process, so it is a
top-level function with picklable arguments and a picklable :class:`TrialResult`. It is
deterministic on CPU for a given thread count: the seed sets torch's global RNG before the model
is built (initialisation, then every dropout mask) and a separate ``torch.Generator`` for the
order of the training samples, so the same configuration and seed give the same numbers.

Small datasets live in memory as tensors, so batches are cut by indexing with a permutation
instead of a per-sample ``DataLoader`` (see ``benchmarks/bench_trial.py`` for the difference).
Datasets are loaded once per process and cached by their spec.

At the end of training, for a model with BatchNorm layers: the per-layer variance shift on
test data (:func:`varshift.diagnose.measure`), and the test metric after re-estimating the
BatchNorm statistics on training data with dropout off (:func:`varshift.fix.recalibrate_bn`,
on a copy of the model).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from varshift.data import SplitDataset, load_dataset
from varshift.diagnose import lint, measure
from varshift.fix import recalibrate_bn
from varshift.lab.config import (
    ConfigError,
    DataConfig,
    TrialConfig,
    adapted_input_shape,
    per_block,
    resolve_task,
)
from varshift.lab.models import SparseAutoencoder, build_model
from varshift.lab.results import EpochRecord, LayerShiftRecord, TrialResult, one_line_reason
from varshift.layers import DropBlock2d, DropBlockScheduler

__all__ = ["clear_data_cache", "load_trial_data", "run_trial"]

#: Batch size for evaluation and measurement: only memory depends on it (eval mode).
EVAL_BATCH = 1000


@dataclass
class _Tensors:
    """The trial's data on its device and dtype; regression targets as ``(N, k)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@functools.lru_cache(maxsize=8)
def _cached_data(spec: DataConfig, data_dir: str | None) -> SplitDataset:
    data = _cached_subset(spec.dataset, data_dir, spec.seed, spec.train_size, spec.test_size)
    if spec.image_size is None and spec.channels is None:
        return data
    adapted_input_shape(spec, data.input_shape)  # the study's check, naming the key
    return data.as_images(spec.image_size, spec.channels)


@functools.lru_cache(maxsize=8)
def _cached_subset(dataset: str, data_dir: str | None, seed: int, train_size: int | None,
                   test_size: int | None) -> SplitDataset:
    data = load_dataset(dataset, data_dir=data_dir, seed=seed)
    problems = [f"data.{split}_size: {size} is more than the {len(x)} {split}ing samples of "
                f"{dataset!r}" for split, size, x in (("train", train_size, data.x_train),
                                                      ("test", test_size, data.x_test))
                if size is not None and size > len(x)]
    if problems:
        raise ConfigError(problems)
    if train_size is None and test_size is None:
        return data
    return data.subset(train=train_size, test=test_size, seed=seed)


def load_trial_data(config: TrialConfig, data_dir: str | Path | None = None) -> SplitDataset:
    """The (subset of the) dataset ``config`` trains on, loaded once per process."""
    spec = config.data
    return _cached_data(spec, None if data_dir is None else str(data_dir))


def clear_data_cache() -> None:
    """Forget the datasets this process has loaded."""
    _cached_data.cache_clear()
    _cached_subset.cache_clear()


def _device(config: TrialConfig) -> torch.device:
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device: 'cuda' was asked for but torch.cuda.is_available() is "
                           "False on this machine; use device = 'cpu'"])
    return torch.device(config.train.device)


@contextlib.contextmanager
def _thread_count(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block (``None``: leave as is)."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _usable(count: int, batch: int) -> int:
    """Training samples used per epoch: all, except a last batch of one sample, which would make
    BatchNorm fail in training mode."""
    return count - 1 if count % batch == 1 and count > 1 else count


def _metric(task: str) -> tuple[str, bool]:
    return ("accuracy", True) if task == "classification" else ("mse", False)


class _Trainer:
    """The training loop and evaluation of one trial; state kept here keeps the loop short."""

    def __init__(self, config: TrialConfig, task: str, model: nn.Module, data: _Tensors,
                 seed: int) -> None:
        self.config, self.task, self.model, self.data = config, task, model, data
        self.optimizer = _optimizer(config, model)
        self.order = torch.Generator().manual_seed(seed)
        self.schedulers = _dropblock_schedulers(config, model, len(data.x_train))
        self.sparsity = config.autoencoder.sparsity
        self.sparsity_weight = config.autoencoder.sparsity_weight

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The training objective on one batch."""
        if self.task == "classification":
            return F.cross_entropy(self.model(x), y)
        if self.task == "regression":
            return F.mse_loss(self.model(x), y)
        assert isinstance(self.model, SparseAutoencoder)
        code = self.model.encode(x)
        loss = F.mse_loss(self.model.decode(code), x)
        if self.sparsity_weight > 0:
            loss = loss + self.sparsity_weight * _kl_sparsity(self.sparsity, code)
        return loss

    def train_epoch(self) -> float:
        """One pass over the training data in a fresh random order; the mean training loss."""
        x, y = self.data.x_train, self.data.y_train
        batch = self.config.train.batch_size
        count = len(x)
        usable = _usable(count, batch)
        order = torch.randperm(count, generator=self.order).to(x.device)
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        self.model.train()
        for start in range(0, usable, batch):
            index = order[start:min(start + batch, usable)]
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(x[index], y[index])
            torch.autograd.backward(loss)
            self.optimizer.step()
            total += loss.detach() * len(index)
            for scheduler in self.schedulers:
                scheduler.step()
        return float(total) / usable

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test loss and metric in eval mode (and the mean code for autoencoders)."""
        model = model or self.model
        was_training = model.training
        model.eval()
        x, y = self.data.x_test, self.data.y_test
        loss_sum = metric_sum = code_sum = 0.0
        for start in range(0, len(x), EVAL_BATCH):
            xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            if self.task == "autoencoding":
                assert isinstance(model, SparseAutoencoder)
                code = model.encode(xb)
                recon = model.decode(code)
                loss_sum += float(F.mse_loss(recon, xb, reduction="sum")) / xb[0].numel()
                code_sum += float(code.mean()) * len(xb)
                continue
            out = model(xb)
            if self.task == "classification":
                loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
                metric_sum += float((out.argmax(dim=1) == yb).sum())
            else:
                loss_sum += float(F.mse_loss(out, yb, reduction="sum")) / yb[0].numel()
        model.train(was_training)
        n = len(x)
        result = {"test_loss": loss_sum / n}
        result["test_metric"] = metric_sum / n if self.task == "classification" else loss_sum / n
        if self.task == "autoencoding":
            result["mean_activation"] = code_sum / n
        return result


def _kl_sparsity(rho: float, code: Tensor) -> Tensor:
    """KL(ρ ‖ ρ̂_j) summed over code units, ρ̂_j the batch-mean activation of unit j (the sparse
    autoencoder penalty; ρ̂ is clamped away from 0 and 1 so the logarithms stay finite)."""
    rho_hat = code.flatten(1).mean(dim=0).clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat)
            + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def _optimizer(config: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    train = config.train
    params = model.parameters()
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def _dropblock_schedulers(config: TrialConfig, model: nn.Module,
                          samples: int) -> list[DropBlockScheduler]:
    """One linear ramp per block with DropBlock (blocks may have different final rates)."""
    dropout = config.dropout
    if dropout.kind != "dropblock" or dropout.schedule != "linear":
        return []
    batch = config.train.batch_size
    steps = config.train.epochs * math.ceil(_usable(samples, batch) / batch)
    blocks = list(model.get_submodule("blocks").children())
    rates = per_block(dropout.rate, len(blocks))
    return [DropBlockScheduler(block, start_p=0.0, end_p=rate, total_steps=steps)
            for block, rate in zip(blocks, rates)
            if any(isinstance(m, DropBlock2d) for m in block.modules())]


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def _eval_batches(x: Tensor, limit: int | None) -> list[Tensor]:
    x = x if limit is None else x[:limit]
    return [x[start:start + EVAL_BATCH] for start in range(0, len(x), EVAL_BATCH)]


def _layer_shift(model: nn.Module, x_test: Tensor, samples: int | None,
                 predict_samples: int | None) -> tuple[LayerShiftRecord, ...]:
    """Per-BatchNorm variance shift of the trained model on test inputs (dropout on vs off)."""
    batches = _eval_batches(x_test, samples)
    report = measure(model, batches, recalibrate=False, progress=False)
    predicted = _predicted_shift(model, batches[0][:predict_samples])
    return tuple(
        LayerShiftRecord(layer=layer.name, depth=layer.depth,
                         train_var=float(layer.train_var.mean()),
                         eval_var=float(layer.eval_var.mean()),
                         running_var=float(layer.running_var.mean()),
                         ratio=layer.mean_ratio,
                         predicted=predicted.get(layer.name))
        for layer in report.layers)


def _predicted_shift(model: nn.Module, example: Tensor) -> dict[str, float]:
    """The shift :func:`varshift.diagnose.lint` predicts at each BatchNorm fed by noise, on
    ``example``: one combined prediction per BatchNorm with all its noise on (exact through a
    linear path, a Monte Carlo estimate otherwise), as the measured ratio sees it."""
    predictions = lint(model, example_inputs=example).predictions
    return {bn: p.shift for bn, p in predictions.items() if p.shift is not None}


def _recalibrated(trainer: _Trainer) -> dict[str, float]:
    """Test metrics of a copy of the model whose BatchNorm statistics were re-estimated on
    training inputs with dropout off."""
    model = copy.deepcopy(trainer.model)
    samples = trainer.config.measure.recal_samples
    recalibrate_bn(model, _eval_batches(trainer.data.x_train, samples), keep_noise=False,
                   progress=False)
    return {f"recal_{key}": value for key, value in trainer.evaluate(model).items()}


def _prepare(data: SplitDataset, task: str, device: torch.device,
             dtype: torch.dtype) -> _Tensors:
    def inputs(x: Tensor) -> Tensor:
        return x.to(device=device, dtype=dtype)

    def targets(y: Tensor) -> Tensor:
        if task == "classification":
            return y.to(device)
        y = y.to(device=device, dtype=dtype)
        return y.unsqueeze(1) if y.ndim == 1 else y

    return _Tensors(inputs(data.x_train), targets(data.y_train), inputs(data.x_test),
                    targets(data.y_test))


def _check_finite(values: Mapping[str, float], when: str) -> None:
    bad = {key: value for key, value in values.items() if not math.isfinite(value)}
    if bad:
        listed = ", ".join(f"{key} = {value}" for key, value in bad.items())
        raise FloatingPointError(f"{listed} {when} (diverged: lower train.lr?)")


def run_trial(config: TrialConfig | Mapping[str, Any], seed: int, *,
              data_dir: str | Path | None = None, threads: int | None = None) -> TrialResult:
    """Train ``config`` with ``seed`` and return what it measured.

    Records per epoch the mean training loss and the test loss/metric (accuracy for
    classification; mean squared error for regression and for autoencoding, whose epochs also
    carry ``extra["mean_activation"]``, the mean code). ``final`` holds the last epoch's
    figures and, when the model has BatchNorm layers, ``recal_test_loss`` /
    ``recal_test_metric`` after re-estimating BN statistics with dropout off; ``layer_shift``
    holds the per-BN variance shift on test data. ``meta`` times the phases (``load_s``,
    ``train_s``, ``measure_s``) and describes the run.

    The seed drives the initialisation, the dropout masks and the order of the training
    samples; the data subset is fixed by ``data.seed``. torch's global RNG state is restored
    afterwards, so calling this does not disturb the caller's random stream. ``threads`` sets
    torch's intra-op threads for the call (results can differ between thread counts).

    Raises :class:`~varshift.lab.config.ConfigError` for an invalid configuration (including
    a model that does not fit the data, or CUDA asked for where there is none) and
    ``ValueError`` for a bad seed; any other error, and a loss or metric that is NaN or
    infinite, gives ``TrialResult(status="failed")`` with the error and its traceback.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    device = _device(cfg)
    started = time.perf_counter()
    metric_name, higher = _metric(cfg.data.task)
    epochs: list[EpochRecord] = []
    meta: dict[str, Any] = {"seed": seed, "config_hash": cfg.config_hash(),
                            "device": str(device), "torch": torch.__version__}
    fork = [torch.cuda.current_device()] if device.type == "cuda" else []
    with _thread_count(threads), torch.random.fork_rng(devices=fork):
        meta["threads"] = torch.get_num_threads()
        try:
            data = load_trial_data(cfg, data_dir)
            task = resolve_task(cfg, data.task, cfg.data.dataset)
            metric_name, higher = _metric(task)
            tensors = _prepare(data, task, device, getattr(torch, cfg.train.dtype))
            meta.update(task=task, train_samples=len(data.x_train),
                        test_samples=len(data.x_test), input_shape=list(data.input_shape),
                        load_s=time.perf_counter() - started)
            torch.manual_seed(seed)
            model = build_model(cfg, data.input_shape, data.num_outputs)
            model.to(device=device, dtype=getattr(torch, cfg.train.dtype))
            meta["parameters"] = sum(p.numel() for p in model.parameters())
            trainer = _Trainer(cfg, task, model, tensors, seed)
            final = _train_epochs(trainer, epochs, meta)
            shift = _measure(trainer, final, meta)
        except ConfigError:
            raise
        except Exception as exc:  # a trial's own failure is a result, not a crash of the study
            return TrialResult(
                status="failed", metric_name=metric_name, higher_is_better=higher,
                wall_time_s=time.perf_counter() - started, epochs=tuple(epochs),
                error=one_line_reason(f"{type(exc).__name__}: {exc}", limit=None),
                traceback=traceback.format_exc(), meta=meta)
    return TrialResult(status="done", metric_name=metric_name, higher_is_better=higher,
                       wall_time_s=time.perf_counter() - started, epochs=tuple(epochs),
                       final=final, layer_shift=shift, meta=meta)


def _train_epochs(
    trainer: _Trainer, epochs: list[EpochRecord], meta: dict[str, Any]
) -> dict[str, float]:
    """Run every epoch, appending its record; the last epoch's figures."""
    start = time.perf_counter()
    final: dict[str, float] = {}
    for epoch in range(1, trainer.config.train.epochs + 1):
        train_loss = trainer.train_epoch()
        figures = trainer.evaluate()
        final = {"train_loss": train_loss, **figures}
        _check_finite(final, f"after epoch {epoch}")
        extra = {key: value for key, value in figures.items() if not key.startswith("test_")}
        epochs.append(EpochRecord(epoch, train_loss, figures["test_loss"],
                                  figures["test_metric"], extra))
    meta["train_s"] = time.perf_counter() - start
    return final


def _measure(trainer: _Trainer, final: dict[str, float],
             meta: dict[str, Any]) -> tuple[LayerShiftRecord, ...]:
    """The end-of-trial measurements (BatchNorm models only); adds recal figures to ``final``."""
    start = time.perf_counter()
    shift: tuple[LayerShiftRecord, ...] = ()
    if _has_batch_norm(trainer.model):
        shift = _layer_shift(trainer.model, trainer.data.x_test,
                             trainer.config.measure.shift_samples,
                             trainer.config.measure.predict_samples)
        if trainer.config.measure.recalibrate:
            recal = _recalibrated(trainer)
            _check_finite(recal, "after recalibrating BatchNorm")
            final.update(recal)
    meta["measure_s"] = time.perf_counter() - start
    return shift
