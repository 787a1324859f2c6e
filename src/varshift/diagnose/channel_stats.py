"""Per-channel statistics of a noise layer's input, measured on ``example_inputs`` by the tracers
and used by :mod:`~varshift.diagnose.prediction`.

Every element of a channel (each sample, each spatial position) is one observation; variances
are population variances (``ddof = 0``) computed in float64 on one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["ChannelStats", "channel_stats"]

# Channels beyond these add cost (quadratic in their number) but little to an average.
_MAX_CORRELATED_CHANNELS = 512


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and (population, ``ddof = 0``) variance of one tensor, channels on dim 1
    (dim 0 for a 1-D tensor), each channel pooled over the batch and all spatial positions;
    ``samples`` observations per channel; ``rho`` the mean correlation between two different
    channels (``None`` for fewer than two channels that vary)."""

    mean: Tensor
    var: Tensor
    samples: int
    rho: float | None = None


def channel_stats(x: Tensor) -> ChannelStats:
    """Per-channel statistics of ``x`` (see :class:`ChannelStats`), as float64 CPU tensors."""
    data = x.detach().double()
    if data.dim() == 0:
        data = data.reshape(1, 1)
    elif data.dim() == 1:
        data = data.reshape(-1, 1)
    channels = data.transpose(0, 1).reshape(data.shape[1], -1)
    mean = channels.mean(dim=1)
    var = channels.var(dim=1, unbiased=False)
    rho = _mean_correlation(channels, mean, var)
    return ChannelStats(mean.cpu(), var.cpu(), int(channels.shape[1]), rho)


def _mean_correlation(channels: Tensor, mean: Tensor, var: Tensor) -> float | None:
    """Mean of the off-diagonal entries of the correlation matrix of the channels that vary."""
    live = (var > 0).nonzero().flatten()[:_MAX_CORRELATED_CHANNELS]
    if live.numel() < 2:
        return None
    centred = (channels[live] - mean[live, None]) / var[live, None].sqrt()
    corr = centred @ centred.T / channels.shape[1]
    k = live.numel()
    return float((corr.sum() - corr.diagonal().sum()) / (k * (k - 1)))
