"""Measure the variance shift of Li et al. (CVPR 2019) at every BatchNorm of a model, on data.

For each BatchNorm the input variance is estimated per channel in three forwards of every batch
(definitions in :mod:`varshift.diagnose.shift_report`): training style (noise on, batch
statistics), eval (``model.eval()``) and, unless ``recalibrate=False``, precise (noise off,
batch statistics). Comparing them with the stored ``running_var`` separates the two reasons why
re-estimating BatchNorm statistics helps: the dropout-induced shift (Li et al. 2019) and the
staleness of the moving average (Wu & Johnson 2021).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from varshift.diagnose.batches import Batch, BatchStream, call_model, is_one_shot, model_device
from varshift.diagnose.bn_stats import (
    BnMode,
    ChannelMoments,
    ModeControl,
    check_finite,
    eager_module,
    mode_control,
    read_batch_statistics,
    require_batch_norms,
    running_stats,
    store_statistics,
)
from varshift.diagnose.shift_report import LayerShift, ShiftReport

__all__ = ["LayerShift", "ShiftReport", "measure"]

LossFn = Callable[[Any, Any], Tensor]


def measure(
    model: nn.Module,
    data: Iterable[Any],
    *,
    batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    target_fn: Callable[[Any], Any] | None = None,
    loss_fn: LossFn | None = None,
    recalibrate: bool = True,
    progress: bool = True,
) -> ShiftReport:
    """Per-BatchNorm variance of the BN input with dropout on and off, against the stored
    running variance; eval loss/accuracy before and after re-estimating the statistics.

    Every batch goes through the model in up to three forwards, so all figures come from the
    same inputs:

    1. *training style*: every module in training mode (dropout on, BatchNorms normalising with
       batch statistics) but no BatchNorm stores anything → ``train_var``;
    2. *eval*: every module in eval mode, i.e. ``model.eval()`` → ``eval_var``, loss and
       accuracy "before";
    3. *precise* (``recalibrate=True``): dropout off, BatchNorms on batch statistics →
       ``precise_var``, the statistics :func:`varshift.fix.recalibrate_bn` would store. With
       targets, a second pass over the labelled batches evaluates the model with these
       statistics swapped in → loss and accuracy "after". That pass reads ``data`` again (a
       shuffling loader with a ``batches`` limit gives it other samples of the same
       population); a one-shot iterator's labelled batches are kept in memory for it instead.

    The model is left exactly as it was: parameters, buffers, every ``training`` flag, BatchNorm
    momenta and the global torch (and CUDA) random state are restored, even on error. A
    ``torch.compile``'d model is measured through the module it wraps.

    Args:
        model: a module with at least one BatchNorm keeping running statistics.
        data: batches as described in :mod:`varshift.diagnose.batches`: tensors, ``(x, y)``
            tuples/lists or dicts; inputs are moved to the model's device. Streamed: memory
            does not grow with the number of batches, except for what a one-shot iterator
            keeps (see ``recalibrate``).
        batches: use at most this many batches (``None``: all of ``data``).
        input_fn, target_fn: pick the model input / the target from each item of ``data``.
        loss_fn: ``loss_fn(output, target)`` returning the batch-mean loss; by default cross
            entropy for integer targets (class labels, output ``Tensor[N, K, *]``) and mean
            squared error for targets shaped like the output. Accuracy is reported for class
            labels only, which must lie in ``[0, K − 1]`` for an output with ``K`` classes.
        recalibrate: run the precise forward (and, with targets, the "after" pass). A one-shot
            iterator (a generator) is then kept in memory for the "after" pass, so it needs a
            ``batches`` limit.
        progress: tqdm bars on stderr when ``data`` has a length.

    Raises:
        TypeError: ``model`` is not a module, or is a TorchScript module.
        ValueError: no BatchNorm with running statistics; empty ``data``; ``batches`` < 1; a
            one-shot iterator without ``batches`` when ``recalibrate``; reading ``data`` raised
            (the message names the batch); a batch with nan/inf statistics at a BatchNorm or a
            nan/inf loss; class labels out of range. Each message is one line.
    """
    model = eager_module(model)
    named = require_batch_norms(model, "measure")
    if recalibrate and batches is None and is_one_shot(data):
        raise ValueError(
            "measure: data is a one-shot iterator (such as a generator) and batches is None: "
            "its labelled batches would be kept in memory without bound for the before/after "
            "comparison; pass batches=N, recalibrate=False, or a re-iterable (list, DataLoader)"
        )
    device = model_device(model)
    stream = BatchStream(
        data,
        batches=batches,
        input_fn=input_fn,
        target_fn=target_fn,
        device=device,
        progress=progress,
        desc="measure",
        keep="labelled" if recalibrate else "never",
    )
    rng_devices = [device] if device is not None and device.type == "cuda" else []
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=rng_devices),
            mode_control(model, [bn for _, bn in named]) as modes,
        ):
            run = _Run(model, named, modes, loss_fn)
            run.collect(stream, precise=recalibrate)
            if recalibrate and run.before.count:
                run.evaluate_recalibrated(stream)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return run.report()


def _cloned(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return pair[0].clone(), pair[1].clone()


class _Metrics:
    """Sample-weighted eval loss and accuracy over batches."""

    def __init__(self, loss_fn: LossFn | None) -> None:
        self.loss_fn = loss_fn
        self.count = 0
        self.loss_sum = 0.0
        self.correct = 0.0
        self.has_loss = True
        self.has_accuracy = True

    def add(self, output: Any, target: Any, size: int, batch: int) -> None:
        """Add batch number ``batch``; refuse class labels outside the output's classes (cross
        entropy would fail obscurely, on CUDA with a device assert) and a nan/inf loss."""
        if target is None:
            return
        self.count += size
        labels = isinstance(target, Tensor) and not target.is_floating_point()
        logits = labels and isinstance(output, Tensor) and output.dim() == target.dim() + 1
        if logits:
            _check_labels(batch, output, target)
        loss: Tensor | None = None
        if self.loss_fn is not None:
            loss = self.loss_fn(output, target)
        elif logits:
            loss = F.cross_entropy(output.float(), target)
        elif (
            isinstance(output, Tensor)
            and isinstance(target, Tensor)
            and output.shape == target.shape
        ):
            loss = F.mse_loss(output.float(), target.float())
        if loss is None:
            self.has_loss = False
        else:
            value = float(loss)
            if not math.isfinite(value):
                raise ValueError(
                    f"batch {batch} of the data gives loss {value} in eval mode: the model "
                    "output or the target holds nan/inf; the model was left unchanged"
                )
            self.loss_sum += value * size
        if logits:
            # Per-position labels (segmentation) count each position as a fraction of a sample.
            hits = float((output.argmax(dim=1) == target).sum())
            self.correct += hits * size / target.numel()
        else:
            self.has_accuracy = False

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.count if self.count and self.has_loss else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.count if self.count and self.has_accuracy else None


def _check_labels(batch: int, output: Tensor, target: Tensor) -> None:
    if target.numel() == 0:
        return
    classes = output.shape[1]
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= classes:
        raise ValueError(
            f"batch {batch} of the data has class labels from {low} to {high}, but the model "
            f"output has {classes} classes (dimension 1): labels must be in [0, {classes - 1}]; "
            "pass target_fn to pick or map the labels"
        )


class _Run:
    """The hooks, accumulators and passes of one :func:`measure` call.

    The eval forward reduces each BatchNorm input in a pre-hook. The two forwards with batch
    statistics run their BatchNorms in ``"update"`` mode and a post-hook reads the batch
    statistics the layer computed anyway; they overwrite the stored statistics, which are put
    back from ``stored`` before every eval forward (and, with all buffers, at the end).
    """

    def __init__(
        self,
        model: nn.Module,
        named: list[tuple[str, _BatchNorm]],
        modes: ModeControl,
        loss_fn: LossFn | None,
    ) -> None:
        self.model = model
        self.named = named
        self.bns = [bn for _, bn in named]
        self.stored = [_cloned(running_stats(bn)) for bn in self.bns]
        self.modes = modes
        self.moments: dict[str, list[ChannelMoments]] = {
            key: [ChannelMoments() for _ in named] for key in ("train", "eval", "precise")
        }
        self.target: list[ChannelMoments] | None = None
        self.reading = False  # True: post-hooks read BatchNorm's own statistics
        self.order: list[int] = []  # BatchNorm indexes in the order the forward first runs them
        self._seen: set[int] = set()
        self.before = _Metrics(loss_fn)
        self.after = _Metrics(loss_fn)
        self.samples = 0
        self.batches = 0

    def _pre_hook(self, i: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if i not in self._seen:
                self._seen.add(i)
                self.order.append(i)
            if self.target is not None and not self.reading:
                self.target[i].add(args[0])

        return hook

    def _post_hook(self, i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.target is not None and self.reading:
                read_batch_statistics(self.target[i], self.bns[i], args[0])

        return hook

    def _forward(self, batch: Batch, noise: bool, bn: BnMode, into: str | None) -> Any:
        self.modes.noise(noise)
        self.modes.bn(bn)
        self.target = None if into is None else self.moments[into]
        self.reading = bn == "update"
        try:
            return call_model(self.model, batch.inputs)
        finally:
            self.target = None

    def _put_stored(self) -> None:
        for bn, (mean, var) in zip(self.bns, self.stored):
            store_statistics(bn, mean, var)

    def collect(self, stream: BatchStream, *, precise: bool) -> None:
        with ExitStack() as stack:
            for i, bn in enumerate(self.bns):
                stack.callback(bn.register_forward_pre_hook(self._pre_hook(i)).remove)
                stack.callback(bn.register_forward_hook(self._post_hook(i)).remove)
            for index, batch in enumerate(stream):
                if index:
                    self._put_stored()
                output = self._forward(batch, False, "running", "eval")
                self._forward(batch, True, "update", "train")
                if precise:
                    self._forward(batch, False, "update", "precise")
                check_finite(stream.index, batch.inputs, self._layers_in_order())
                self.before.add(output, batch.target, batch.size, stream.index)
        self.samples, self.batches = stream.samples_seen, stream.batches_seen

    def _layers_in_order(self) -> list[tuple[str, ChannelMoments]]:
        return [
            (self.named[i][0], moments[i]) for i in self.order for moments in self.moments.values()
        ]

    def evaluate_recalibrated(self, stream: BatchStream) -> None:
        """Eval pass with the precise statistics written into the BatchNorms; :func:`measure`
        puts the stored ones back afterwards."""
        for bn, precise in zip(self.bns, self.moments["precise"]):
            if precise.count:
                store_statistics(bn, *precise.result())
        for batch in stream:
            if batch.target is None:
                continue  # nothing to evaluate
            output = self._forward(batch, False, "running", None)
            self.after.add(output, batch.target, batch.size, stream.index)

    def report(self) -> ShiftReport:
        unused = [name for i, (name, _) in enumerate(self.named) if i not in self._seen]
        if unused:
            warnings.warn(
                f"measure: BatchNorm layer(s) {unused} never ran in the forward; left out",
                stacklevel=3,
            )

        def cpu(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return pair[0].detach().double().cpu(), pair[1].detach().double().cpu()

        layers = []
        for depth, i in enumerate(self.order):
            train_mean, train_var = cpu(self.moments["train"][i].result())
            eval_mean, eval_var = cpu(self.moments["eval"][i].result())
            precise = self.moments["precise"][i]
            precise_mean, precise_var = cpu(precise.result()) if precise.count else (None, None)
            running_mean, running_var = cpu(self.stored[i])
            layers.append(
                LayerShift(
                    name=self.named[i][0],
                    depth=depth,
                    channels=int(train_var.numel()),
                    train_mean=train_mean,
                    train_var=train_var,
                    eval_mean=eval_mean,
                    eval_var=eval_var,
                    running_mean=running_mean,
                    running_var=running_var,
                    precise_mean=precise_mean,
                    precise_var=precise_var,
                )
            )
        return ShiftReport(
            layers=tuple(layers),
            samples=self.samples,
            batches=self.batches,
            loss_before=self.before.loss,
            loss_after=self.after.loss,
            accuracy_before=self.before.accuracy,
            accuracy_after=self.after.accuracy,
        )
