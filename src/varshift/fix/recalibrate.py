"""Re-estimate BatchNorm statistics with dropout off: the remedy of Li et al. (CVPR 2019, §5) for
the variance shift, and of Wu & Johnson (2021, "PreciseBN") for stale moving averages.

A BatchNorm trained after a dropout layer stores the variance its input had *with* noise; at
test time the noise is off and the input variance is smaller (Li et al. 2019). Its moving
average also lags behind the weights (Wu & Johnson 2021). Running the trained model over data
with every stochastic layer in eval mode and every BatchNorm estimating population statistics
replaces both errors by the statistics the layer actually sees at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack, suppress
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from varshift.diagnose import bn_stats
from varshift.diagnose.batches import BatchStream, call_model, is_one_shot, model_device
from varshift.diagnose.bn_stats import ChannelMoments, ModeControl

__all__ = ["recalibrate_bn"]

ModelT = TypeVar("ModelT", bound=nn.Module)


def recalibrate_bn(
    model: ModelT,
    data: Iterable[Any],
    *,
    batches: int | None = None,
    samples: int | None = None,
    keep_noise: bool = False,
    exact: bool = False,
    input_fn: Callable[[Any], Any] | None = None,
    progress: bool = True,
) -> ModelT:
    """Replace every BatchNorm's ``running_mean``/``running_var`` by population estimates over
    ``data``, in place, and return ``model``.

    Args:
        model: a module with at least one BatchNorm keeping running statistics
            (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy forms once initialised). A
            ``torch.compile``'d model is recalibrated through the module it wraps, whose
            buffers it shares, and returned itself.
        data: batches as described in :mod:`varshift.diagnose.batches` (tensors, ``(x, y)``
            tuples, dicts; a bare tensor is one batch). Inputs are moved to the model's device.
            Streamed: memory does not grow with the number of batches, except for what
            ``exact=True`` keeps of a one-shot iterator.
        batches, samples: stop after this many batches / samples (the last batch is cut to
            give exactly ``samples``; no item beyond them is read from ``data``); ``None``
            reads all of ``data``.
        keep_noise: ``False`` (default) puts every module except the BatchNorms in eval mode,
            so noise layers and ``F.dropout(..., training=self.training)`` calls are off, as at
            inference. ``True`` leaves them in training mode, which is what
            :func:`torch.optim.swa_utils.update_bn` does (it calls ``model.train()``): the
            statistics then describe the noisy training-time input and keep the variance shift.
        exact: ``False`` runs one pass with every BatchNorm normalising by batch statistics, so
            each one sees its input as in training (minus the noise), as PreciseBN does; the
            statistics of a BatchNorm behind another one then depend on the batch size, as
            they do in training, through the batch statistics upstream.
            ``True`` makes every BatchNorm see its input exactly as in eval mode: BatchNorms are
            grouped by depth level (the longest chain of BatchNorms upstream, read from the
            autograd graph of one traced forward) and each level is estimated in its own pass
            with all shallower BatchNorms already using their new statistics. It costs one pass
            per level; the later passes stop the forward after the level's last BatchNorm. An
            iterator that cannot be read twice is kept in memory for the later passes, so it
            needs a ``batches`` or ``samples`` limit; a shuffling loader gives each pass other
            samples of the same population.
        input_fn: picks the model input from each item of ``data``.
        progress: show a tqdm bar on stderr when ``data`` has a length.

    Which statistics: per channel, every element of the BatchNorm input is one observation; the
    mean and the unbiased variance are pooled over all batches weighted by their number of
    observations, so the result does not depend on how ``data`` is split into batches (with
    ``momentum=None`` PyTorch averages per-batch variances with equal weights instead, and
    ignores the spread of the batch means). Batch statistics are read from the BatchNorm itself
    (a forward with ``momentum=1``) and merged in float64, so a pass costs what
    ``update_bn``'s does.

    Every module's ``training`` flag and every BatchNorm's ``momentum``, ``track_running_stats``
    and ``num_batches_tracked`` are restored afterwards. On any failure (the forward or ``data``
    raises, a batch gives nan/inf statistics, an interrupt) the old running statistics are
    restored too: the model is as it was. Runs under ``torch.no_grad`` by itself.

    Raises:
        TypeError: ``model`` is not a module or is a TorchScript module (pass the original);
            ``keep_noise`` is not a bool.
        ValueError: no BatchNorm with running statistics (or a lazy one not initialised yet),
            empty ``data``, ``batches`` or ``samples`` below 1, ``exact=True`` on a one-shot
            iterator without a limit, reading ``data`` raised (the message names the batch), a
            batch whose statistics hold nan/inf (bad data, or a model producing them). Each
            message is one line.
    """
    module = bn_stats.eager_module(model)
    if not isinstance(keep_noise, bool):
        raise TypeError(f"keep_noise must be a bool, got {keep_noise!r}")
    named = bn_stats.require_batch_norms(module, "recalibrate")
    if exact and batches is None and samples is None and is_one_shot(data):
        raise ValueError(
            "recalibrate_bn: data is a one-shot iterator (such as a generator) and exact=True "
            "reads it once per depth level, so it would be kept in memory without bound; pass "
            "batches= or samples=, exact=False, or a re-iterable (list, DataLoader)"
        )
    stream = BatchStream(
        data,
        batches=batches,
        samples=samples,
        input_fn=input_fn,
        device=model_device(module),
        progress=progress,
        desc="recalibrate_bn",
        keep="all" if exact else "never",
    )
    saved = [_SavedBuffers(bn) for _, bn in named]
    succeeded = False
    try:
        with torch.no_grad(), bn_stats.mode_control(module, [bn for _, bn in named]) as modes:
            _Estimator(module, named, stream, modes, noise=keep_noise).run(exact=bool(exact))
        succeeded = True
    finally:
        for entry in saved:
            entry.restore(statistics=not succeeded)
    return model


class _SavedBuffers:
    """A BatchNorm's buffers before recalibration: ``num_batches_tracked`` (which the
    estimation forwards increment) is always put back, the running statistics after a failure.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        self.bn = bn
        self.mean, self.var = (t.detach().clone() for t in bn_stats.running_stats(bn))
        counter = bn.num_batches_tracked
        self.counter = None if counter is None else counter.detach().clone()

    def restore(self, *, statistics: bool) -> None:
        if statistics:
            bn_stats.store_statistics(self.bn, self.mean, self.var)
        counter = self.bn.num_batches_tracked
        if counter is not None and self.counter is not None:
            with torch.no_grad():
                counter.copy_(self.counter)


class _StopForwardError(Exception):
    """Raised from a hook once every BatchNorm of the level being estimated has run: the rest
    of the forward cannot change their statistics."""


class _Estimator:
    """The passes of one :func:`recalibrate_bn` call."""

    def __init__(
        self,
        model: nn.Module,
        named: list[tuple[str, _BatchNorm]],
        stream: BatchStream,
        modes: ModeControl,
        *,
        noise: bool,
    ) -> None:
        self.model = model
        self.names = [name for name, _ in named]
        self.bns = [bn for _, bn in named]
        self.stream = stream
        self.modes = modes
        self.noise = noise
        self.levels: list[int] | None = None
        self.calls: list[int] = []

    def run(self, *, exact: bool) -> None:
        everything = list(range(len(self.bns)))
        # The first pass estimates every BatchNorm with batch statistics upstream. That is the
        # whole answer unless exact; then it is still exact for level 0 (no BatchNorm upstream),
        # its first batch is traced to find the levels, and the later passes refine levels 1
        # and up. Writing every estimate now means a BatchNorm those passes miss
        # (data-dependent control flow) keeps it, not the last batch's statistics.
        self._write(self._pass(everything, stop_after=None, trace=exact))
        if not exact or self.levels is None:
            return
        levels = self.levels
        for level in range(1, max(levels) + 1):
            group = [i for i in everything if levels[i] == level]
            expected = sum(1 for i in self.calls if levels[i] == level)
            self._write(self._pass(group, stop_after=expected, trace=False))

    def _pass(
        self, group: list[int], *, stop_after: int | None, trace: bool
    ) -> dict[int, ChannelMoments]:
        moments = {i: ChannelMoments() for i in group}
        calls = [0]
        reading = [False]  # off during the trace forward, whose BatchNorms use running stats

        def reader(i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                if not reading[0]:
                    return
                bn_stats.read_batch_statistics(moments[i], self.bns[i], args[0])
                calls[0] += 1
                if stop_after is not None and calls[0] >= stop_after:
                    raise _StopForwardError

            return hook

        def set_modes() -> None:
            self.modes.noise(self.noise)
            self.modes.bn("running")
            self.modes.bn("update", [self.bns[i] for i in group])

        with ExitStack() as stack:
            for i in group:
                stack.callback(self.bns[i].register_forward_hook(reader(i)).remove)
            set_modes()
            for index, batch in enumerate(self.stream):
                if trace and index == 0:
                    self._trace(batch.inputs)
                    set_modes()
                reading[0] = True
                calls[0] = 0
                with suppress(_StopForwardError):
                    call_model(self.model, batch.inputs)
                reading[0] = False
                bn_stats.check_finite(
                    self.stream.index, batch.inputs, [(self.names[i], moments[i]) for i in group]
                )
        return moments

    def _trace(self, inputs: Any) -> None:
        """One eval-mode forward with gradients on, in which every BatchNorm output is made a
        fresh autograd leaf; walking back from each BatchNorm input to the leaves it reaches
        names the BatchNorms directly upstream of it. Level = 1 + the deepest upstream level."""
        levels = [-1] * len(self.bns)
        owner: dict[int, int] = {}
        leaves: list[Tensor] = []  # alive until the end, so that no id is reused

        def before(i: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                upstream = _upstream_leaves(args[0], owner)
                deepest = max((levels[j] for j in upstream), default=-1)
                levels[i] = max(levels[i], deepest + 1)
                self.calls.append(i)

            return hook

        def after(i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
                leaf = output.detach().requires_grad_(True)
                owner[id(leaf)] = i
                leaves.append(leaf)
                # A clone, so that an in-place op downstream (ReLU(inplace=True)) is not
                # applied to a leaf, which autograd refuses.
                return leaf.clone()

            return hook

        self.modes.noise(False)
        self.modes.bn("running")
        with ExitStack() as stack, torch.enable_grad():
            for i, bn in enumerate(self.bns):
                stack.callback(bn.register_forward_pre_hook(before(i)).remove)
                stack.callback(bn.register_forward_hook(after(i)).remove)
            call_model(self.model, inputs)
        self.levels = levels

    def _write(self, moments: dict[int, ChannelMoments]) -> None:
        for i, acc in moments.items():
            if acc.count == 0:
                continue  # never ran on this data: keep what it had
            bn_stats.store_statistics(self.bns[i], *acc.result())


def _upstream_leaves(x: Any, owner: dict[int, int]) -> set[int]:
    """Indexes of the BatchNorm leaves reachable backwards from ``x``'s autograd node."""
    found: set[int] = set()
    if not isinstance(x, Tensor) or x.grad_fn is None:
        return found
    stack: list[Any] = [x.grad_fn]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            index = owner.get(id(variable))
            if index is not None:
                found.add(index)
            continue
        stack.extend(parent for parent, _ in node.next_functions)
    return found
