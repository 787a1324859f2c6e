"""BatchNorm statistics: which layers have them, how to estimate them, and the modes that decide
what a BatchNorm's input looks like.

Shared by :func:`measure <varshift.diagnose.measure>` and :func:`recalibrate_bn
<varshift.fix.recalibrate_bn>` so that both estimate the same quantity the same way.

*Which variance.* Per channel, every element of the BatchNorm input (each sample, each spatial
position) is one observation, as in BatchNorm itself (Ioffe & Szegedy 2015). The estimate is
the population mean and the *unbiased* population variance over all the batches seen, with each
batch weighted by its number of observations, so the answer is the same however the data is
split into batches (PyTorch's ``momentum=None`` averages per batch instead, which lets a small
last batch count as much as a full one; fvcore's PreciseBN weights by batch size, as here).

*Fail loudly.* A batch whose statistics hold nan or inf (bad data, or a model that produces them)
would turn every estimate into nan; :func:`check_finite` stops the pass at that batch instead,
naming it and the first BatchNorm it reached.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer

from varshift.diagnose.batches import all_finite

__all__ = [
    "BnMode",
    "ChannelMoments",
    "ModeControl",
    "batch_norms",
    "check_finite",
    "check_model",
    "eager_module",
    "mode_control",
    "read_batch_statistics",
    "require_batch_norms",
    "running_stats",
    "store_statistics",
]

BnMode = Literal["running", "batch", "update"]

# Batch summaries a ChannelMoments holds before merging them into its running sums: memory stays
# bounded on endless data, and merging stays vectorised over many batches.
_MERGE_EVERY = 256
# The largest mean²/variance of a channel for which ChannelMoments.add on CPU keeps the unshifted
# float32 sums of a batch (relative error of the variance about 1e-7 · (1 + this)).
_RAW_SUMS_MAX_CONDITION = 16.0
# Elements of a batch up to which ChannelMoments.add shifts the whole batch: the copy stays in
# cache, and the few tensor operations cost less than the checks of the unshifted sums.
_SMALL_BATCH = 1 << 16


def check_model(model: object) -> nn.Module:
    """``model`` itself when it is a ``torch.nn.Module``; ``TypeError`` otherwise. The one check
    every public entry point (lint, measure, recalibrate_bn, convert_dropout) makes first, so a
    wrong type is the same error everywhere."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def eager_module(model: object) -> nn.Module:
    """The module whose layers a statistics pass can hook and switch: ``model`` itself or, for a
    ``torch.compile``'d model, the original module it wraps (``_orig_mod``), which shares its
    parameters and buffers, so statistics written there are the ones the compiled model uses.

    ``TypeError`` for what is not a module (:func:`check_model`) and for a TorchScript module
    (``torch.jit.script``/``trace``), whose layers are compiled code: they are not BatchNorm
    modules any more, and no hook or training flag reaches them.
    """
    module = check_model(model)
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(module).__name__}, from torch.jit.script or "
            "torch.jit.trace) whose layers cannot be reached: pass the original (un-scripted) "
            "module"
        )
    # torch.compile has imported dynamo if the model is compiled; importing it here otherwise
    # would cost every caller a second.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(dynamo, "OptimizedModule", None)
    if compiled is not None and isinstance(module, compiled):
        return eager_module(module.get_submodule("_orig_mod"))
    return module


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The batch-statistics norms of ``model`` that keep running statistics, by qualified name
    (``BatchNorm1d/2d/3d``, their lazy forms and ``SyncBatchNorm``; the root is named ``""``).
    A norm created with ``track_running_stats=False`` normalises with batch statistics in eval
    too, so it has no train/eval mismatch and is left out."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    ]


def require_batch_norms(model: nn.Module, task: str) -> list[tuple[str, _BatchNorm]]:
    """:func:`batch_norms`, refusing what ``task`` cannot work on: a model that is not a module
    (``TypeError``), has no such layer, or has a lazy one not yet initialised (``ValueError``)."""
    check_model(model)
    named = batch_norms(model)
    if not named:
        raise ValueError(
            f"model ({type(model).__name__}) has no BatchNorm layer with running statistics "
            "(nn.BatchNorm1d/2d/3d, SyncBatchNorm, with track_running_stats=True); "
            f"there is nothing to {task}"
        )
    lazy = [name for name, bn in named if isinstance(bn.running_mean, UninitializedBuffer)]
    if lazy:
        raise ValueError(
            f"lazy BatchNorm layer(s) {lazy} are not initialised yet; run one forward before "
            f"you {task}"
        )
    return named


class ChannelMoments:
    """Pooled per-channel mean and unbiased variance of ``Tensor[N, C, *]`` batches.

    Every observation is taken relative to a fixed per-channel reference ``r`` (the first
    batch's mean): the sums ``S1 = Σ(x−r)`` and ``S2 = Σ(x−r)²`` are kept in float64, and
    ``mean = r + S1/N``, ``var = (S2 − S1²/N)/(N−1)``. With ``r`` near the mean,
    ``E[x²] − mean²`` loses nothing to cancellation, and the result is the statistics of the
    concatenated data, whatever the batch split. A count of one observation gives ``nan``.

    A batch only records a ``(2, C)`` summary: its shifted sums, or its mean and its spread
    ``Σ(x − batch mean)²`` (two reductions of ``x``, see :meth:`add`; on CPU a large batch is
    reduced without a shifted copy wherever that loses nothing, see :meth:`_add_cpu`), or a copy
    of the mean and variance BatchNorm computed (:meth:`add_unbiased`). Summaries are merged
    into the sums, vectorised, every ``_MERGE_EVERY`` batches and in :meth:`result`, and checked
    for nan/inf only when asked (:attr:`finite`, :meth:`all_finite`, which checks many layers in
    one go), so that the forward hooks that feed this class cost a few tensor operations and no
    device sync, and memory stays bounded however long the data.
    """

    def __init__(self) -> None:
        self.count = 0
        self._ref: Tensor | None = None
        self._sums: Tensor | None = None  # float64 [2, C]: S1, S2 of the merged batches
        self._shifted: list[Tensor] = []  # per batch: Σ(x−r), Σ(x−r)²
        self._moments: list[Tensor] = []  # per batch: mean, spread
        self._moment_counts: list[int] = []  # observations per batch
        self._spread_weights: list[int] = []  # spread × weight = Σ(x − batch mean)²
        self._unchecked: list[Tensor] = []  # summaries not yet checked for nan/inf
        self._nonfinite = False

    def add(self, x: Tensor) -> None:
        """Add a batch ``Tensor[N, C, *]`` (channels on dimension 1)."""
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        channels = x.shape[1]
        # [N, C, L]: reducing the contiguous positions of each (sample, channel) first, then
        # the few samples, is markedly faster on CPU than one reduction over dims (0, 2, ...).
        flat = x.reshape(x.shape[0], channels, -1)
        n = flat.shape[0] * flat.shape[2]
        if flat.device.type == "cpu" and flat.numel() > _SMALL_BATCH:
            self._add_cpu(flat, n)
            return
        if self._ref is None:
            self._ref = flat.mean(dim=(0, 2))
        d = flat - self._ref.view(1, channels, 1)
        s1 = d.sum(dim=2).sum(dim=0)
        s2 = torch.linalg.vector_norm(d, dim=2).square().sum(dim=0)  # no d² temporary
        self._record(self._shifted, torch.stack((s1, s2)))
        self.count += n

    def _add_cpu(self, flat: Tensor, n: int) -> None:
        """:meth:`add` on CPU, where the shifted copy ``x − r`` of the batch costs a write and a
        read of it, as much as the two reductions: ``Σx`` and ``Σx²`` are taken from ``flat``
        itself. Their float32 rounding error, relative to the variance, grows like
        ``1 + mean²/var``, so the few channels with ``mean² > _RAW_SUMS_MAX_CONDITION · var``
        are summed again about their batch mean (a copy of those channels only). Choosing them
        reads the sums on the host: free on CPU, a sync on an accelerator, which therefore
        keeps the shifted path."""
        s1 = flat.sum(dim=2).double().sum(dim=0)
        s2 = torch.linalg.vector_norm(flat, dim=2).double().square().sum(dim=0)
        mean = s1 / n
        spread = s2 - s1 * mean  # Σ(x − mean)², if the sums were exact
        unsure = (mean.square() * n > _RAW_SUMS_MAX_CONDITION * spread).nonzero().flatten()
        if unsure.numel():
            centre = mean.index_select(0, unsure)
            d = flat.index_select(1, unsure) - centre.to(flat.dtype).view(1, -1, 1)
            d1 = d.sum(dim=2).double().sum(dim=0)
            d2 = torch.linalg.vector_norm(d, dim=2).double().square().sum(dim=0)
            mean.index_copy_(0, unsure, centre.to(flat.dtype).double() + d1 / n)
            spread.index_copy_(0, unsure, d2 - d1.square() / n)
        if self._ref is None:
            self._ref = mean
        self._record_moments(n, torch.stack((mean, spread.clamp_(min=0.0))), 1)

    def add_unbiased(self, n: int, mean: Tensor, unbiased_var: Tensor) -> None:
        """Add a batch of ``n`` observations per channel given by its mean and unbiased
        variance (as BatchNorm stores them after a training-mode forward with ``momentum=1``)."""
        if self._ref is None:
            self._ref = mean.detach().clone()
        # stack copies: the caller's tensors may be overwritten by the next batch.
        self._record_moments(n, torch.stack((mean.detach(), unbiased_var.detach())), n - 1)

    @property
    def finite(self) -> bool:
        """Whether every batch added so far had finite statistics (one device sync)."""
        if self._unchecked:
            summaries = self._unchecked
            self._unchecked = []
            if not bool(torch.isfinite(torch.cat(summaries, dim=1)).all()):
                self._nonfinite = True
        return not self._nonfinite

    @staticmethod
    def all_finite(group: list[ChannelMoments]) -> bool:
        """Whether every batch added to every member of ``group`` had finite statistics: what
        :attr:`finite` tells of each, in one device sync for the whole group when its data
        lies on one device."""
        if any(moments._nonfinite for moments in group):
            return False
        pending = [summary for moments in group for summary in moments._unchecked]
        if not pending:
            return True
        if len({summary.device for summary in pending}) > 1:
            return all(moments.finite for moments in group)
        if not bool(torch.isfinite(torch.cat(pending, dim=1)).all()):
            flags = [moments.finite for moments in group]  # all of them: marks every culprit
            return all(flags)
        for moments in group:
            moments._unchecked = []
        return True

    def result(self) -> tuple[Tensor, Tensor]:
        """``(mean, unbiased variance)``, float64 ``Tensor[C]`` on the data's device."""
        if self._ref is None:
            raise RuntimeError("ChannelMoments.result() called before any batch was added")
        self._merge()
        assert self._sums is not None, "merging after a batch leaves sums"
        s1, s2 = self._sums[0], self._sums[1]
        mean = self._ref.double() + s1 / self.count
        if self.count < 2:
            return mean, torch.full_like(mean, float("nan"))
        return mean, (s2 - s1.square() / self.count).clamp_(min=0.0) / (self.count - 1)

    def _record_moments(self, n: int, summary: Tensor, spread_weight: int) -> None:
        self._moment_counts.append(n)
        self._spread_weights.append(spread_weight)
        self._record(self._moments, summary)
        self.count += n

    def _record(self, summaries: list[Tensor], summary: Tensor) -> None:
        summaries.append(summary)
        self._unchecked.append(summary)
        if len(self._shifted) + len(self._moments) >= _MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        """Fold the recorded batch summaries into ``S1``, ``S2`` and forget them."""
        assert self._ref is not None, "a batch was added"
        _ = self.finite  # check what is about to be forgotten, so that the flag stays exact
        ref = self._ref.double()
        sums = torch.zeros((2, ref.numel()), dtype=torch.float64, device=ref.device)
        if self._sums is not None:
            sums += self._sums
        if self._shifted:
            sums += torch.stack(self._shifted).double().sum(dim=0)
        if self._moments:
            moments = torch.stack([m.double() for m in self._moments])  # [B, 2, C]
            counts = torch.tensor(
                [self._moment_counts, self._spread_weights], dtype=torch.float64,
                device=ref.device,
            )[:, :, None]
            n, weight = counts[0], counts[1]
            shift = moments[:, 0] - ref
            sums[0] += (n * shift).sum(dim=0)
            sums[1] += (weight * moments[:, 1] + n * shift.square()).sum(dim=0)
        self._sums = sums
        self._shifted, self._moments = [], []
        self._moment_counts, self._spread_weights = [], []


def running_stats(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """The ``(running_mean, running_var)`` buffers themselves (not copies)."""
    mean, var = bn.running_mean, bn.running_var
    assert isinstance(mean, Tensor), "a tracked BatchNorm has a running mean"
    assert isinstance(var, Tensor), "a tracked BatchNorm has a running variance"
    return mean, var


def store_statistics(bn: _BatchNorm, mean: Tensor, var: Tensor) -> None:
    """Write ``mean`` and ``var`` into ``bn``'s running buffers, in the buffers' dtype."""
    running_mean, running_var = running_stats(bn)
    with torch.no_grad():
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(var.to(running_var.dtype))


def read_batch_statistics(moments: ChannelMoments, bn: _BatchNorm, x: Tensor) -> None:
    """Add the batch ``x`` just normalised by ``bn`` in ``"update"`` mode (see
    :class:`ModeControl`) to ``moments``, from the statistics BatchNorm computed and stored
    itself: with ``momentum=1`` the stored mean and unbiased variance are exactly this batch's,
    so reading them costs nothing next to reducing ``x`` again."""
    moments.add_unbiased(x.numel() // x.shape[1], *running_stats(bn))


def check_finite(batch: int, inputs: Any, layers: Iterable[tuple[str, ChannelMoments]]) -> None:
    """``ValueError`` if batch number ``batch`` (model input ``inputs``) left nan or inf in the
    statistics of any of ``layers`` (``(name, moments)`` in forward order). The one-line message
    names the batch, the first such BatchNorm, and whether the data or the model is to blame."""
    layers = list(layers)
    if ChannelMoments.all_finite([moments for _, moments in layers]):
        return  # the usual case: one device sync for all the layers
    bad = list(dict.fromkeys(name for name, moments in layers if not moments.finite))
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    if all_finite(inputs):
        cause = (
            "the model input is finite, so the layers before it produce nan/inf "
            "(check the model's parameters and buffers)"
        )
    else:
        cause = "the model input of that batch holds nan/inf"
    raise ValueError(
        f"batch {batch} of the data gives nan/inf statistics at BatchNorm "
        f"{bad[0] or '<root>'!r}{more}: {cause}; the model's statistics were left unchanged"
    )


@contextmanager
def mode_control(model: nn.Module, bns: list[_BatchNorm]) -> Iterator[ModeControl]:
    """A :class:`ModeControl` for ``model`` whose flags are all put back on exit, error or not."""
    control = ModeControl(model, bns)
    try:
        yield control
    finally:
        control.restore()


class ModeControl:
    """Sets the train/eval flags a statistics pass needs, and :meth:`restore` puts back every
    flag it may touch: each module's ``training``, and each managed BatchNorm's ``momentum``
    and ``track_running_stats`` (use it through :func:`mode_control`).

    Flags are set attribute by attribute, never through ``model.train()``/``eval()``, so a model
    that overrides ``train()`` cannot silently leave a layer in the wrong mode.

    BatchNorm modes: ``"running"`` normalises with the stored statistics (eval); ``"batch"``
    normalises with batch statistics and stores nothing (train without side effects);
    ``"update"`` normalises with batch statistics and overwrites the stored ones with this
    batch's (``momentum=1``), so that a forward hook can read them.
    """

    def __init__(self, model: nn.Module, bns: list[_BatchNorm]) -> None:
        managed = {id(bn) for bn in bns}
        modules = list(model.modules())
        self._bns = bns
        self._others = [m for m in modules if id(m) not in managed]
        self._saved_flags = [(m, m.training) for m in modules]
        self._saved_bn = [(bn, bn.momentum, bn.track_running_stats) for bn in bns]

    def restore(self) -> None:
        """Put every saved flag back."""
        for module, training in self._saved_flags:
            object.__setattr__(module, "training", training)
        for bn, momentum, track in self._saved_bn:
            bn.momentum = momentum
            bn.track_running_stats = track

    def noise(self, on: bool) -> None:
        """Training flag of every module except the managed BatchNorms: ``on`` switches the
        stochastic layers (and any ``F.dropout(x, training=self.training)`` call) on."""
        for module in self._others:
            # object.__setattr__: Module.__setattr__'s parameter/buffer bookkeeping is
            # irrelevant for a flag and costs microseconds per module per forward.
            object.__setattr__(module, "training", on)

    def bn(self, mode: BnMode, bns: list[_BatchNorm] | None = None) -> None:
        """Put the given managed BatchNorms (all by default) in ``mode``."""
        for bn in self._bns if bns is None else bns:
            object.__setattr__(bn, "training", mode != "running")
            object.__setattr__(bn, "track_running_stats", mode != "batch")
            if mode == "update":
                object.__setattr__(bn, "momentum", 1.0)
