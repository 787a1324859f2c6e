"""How the variance shift compounds with depth and fades with width, by simulation.

A stack of ``L`` untrained blocks ``[noise → linear(d, d) → BatchNorm → ReLU]`` is run twice on
the same inputs: once in training mode (noise on, each BN normalising with the statistics of the
batch) and once in evaluation mode (noise off, each BN normalising with the statistics it saw in
training, as running averages would after convergence). At BN ``l`` the ratio of the evaluation
variance of its input to the training variance is the shift the network actually suffers there.
Every layer after the first inherits the shrunken activations of the layers before it, so the
shift compounds with depth (Li et al., CVPR 2019, §3); when the weights lean towards the
direction the inputs share (``cos²θ`` fixed, ``ρ > 0``) it fades as the layers widen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from varshift.theory import montecarlo
from varshift.theory.checks import check_int
from varshift.theory.draws import aligned_weights, correlated_inputs
from varshift.theory.noise import noise_variance, sample_noise
from varshift.theory.shift import check_unit

__all__ = ["DepthProfile", "simulate_depth"]

FloatArray = npt.NDArray[np.float64]

_BN_EPS = 1e-5  # torch.nn.BatchNorm1d's default


@dataclass(frozen=True, eq=False)
class DepthProfile:
    """Variance shift at each BatchNorm of a noisy stack, with batch-means standard errors.

    Attributes:
        depth: number of blocks ``L``.
        width: units per layer ``d``.
        shift: ``(L,)`` compounded shift at BN ``l``: evaluation-mode variance of its input (all
            noise off, earlier BNs on their training statistics) over its training variance
            (all noise on); the mean over the ``d`` channels.
        shift_stderr: ``(L,)`` standard errors of ``shift``.
        local: ``(L,)`` the shift of layer ``l`` alone: noise off in that layer only, its inputs
            as in training; what :func:`~varshift.theory.variance_shift` predicts.
        local_stderr: ``(L,)`` standard errors of ``local``.
        samples: total number of samples.
        blocks: number of independent replicate blocks behind the standard errors.
    """

    depth: int
    width: int
    shift: FloatArray
    shift_stderr: FloatArray
    local: FloatArray
    local_stderr: FloatArray
    samples: int
    blocks: int


def _batch_norm(h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return (h - mean) / torch.sqrt(var + _BN_EPS)


def _ratios_in_block(
    x: Tensor, weights: list[Tensor], kind: str, generator: torch.Generator, params: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """Per-layer compounded and local shifts ``(L,)``, each the mean over channels, for one
    block ``x`` ``(n, d)`` playing the role of one large training batch."""
    train_in = eval_in = x
    compounded, local = [], []
    for w in weights:
        noise = sample_noise(kind, train_in, generator=generator, **params)
        h_train = (train_in * noise) @ w.T
        h_local = train_in @ w.T
        h_eval = eval_in @ w.T
        # Population (biased) variance, as BatchNorm normalises with; the ratio needs no Bessel.
        mean, var = h_train.mean(dim=0), h_train.var(dim=0, correction=0)
        compounded.append((h_eval.var(dim=0, correction=0) / var).mean())
        local.append((h_local.var(dim=0, correction=0) / var).mean())
        train_in = torch.relu(_batch_norm(h_train, mean, var))
        eval_in = torch.relu(_batch_norm(h_eval, mean, var))
    return torch.stack(compounded), torch.stack(local)


def _weighted_mean_and_stderr(values: Tensor, sizes: Tensor) -> tuple[FloatArray, FloatArray]:
    """Sample-weighted mean over replicate blocks ``(B, L)`` and its batch-means standard error.

    A block of ``nᵦ`` samples has ``Var ≈ s² / nᵦ``; weighting by ``nᵦ`` gives the overall mean
    ``Var = s² / N`` with ``s² = Σ nᵦ (rᵦ − r̄)² / (B − 1)``; equal blocks reduce it to the
    familiar ``sd / √B``.
    """
    weights = sizes / sizes.sum()
    mean = (weights[:, None] * values).sum(dim=0)
    spread = (sizes[:, None] * (values - mean).square()).sum(dim=0) / (len(sizes) - 1)
    stderr = torch.sqrt(spread / sizes.sum())
    return mean.numpy(), stderr.numpy()


def simulate_depth(
    *,
    depth: int,
    width: int,
    kind: str = "bernoulli",
    rho: float = 0.5,
    cos2: float | None = 0.1,
    samples: int = 8192,
    blocks: int = 8,
    seed: int = 0,
    **params: Any,
) -> DepthProfile:
    """Measure the variance shift at every BN of ``depth`` untrained noisy blocks.

    The stack is ``[noise → linear(width, width) → BN → ReLU] × depth`` with plain torch ops, no
    training, float64. Inputs ``(samples, width)`` are standard Gaussians with pairwise
    correlation ``rho``; every weight row is random with squared cosine ``cos2`` to the
    all-ones vector (``None``: ``N(0, 1)`` entries, for which ``cos²θ ≈ 1/d`` and width does
    not help). The defaults, ``rho=0.5`` and ``cos2=0.1``, are an illustrative setting where the
    inputs share half their variance and the weights lean towards what they share, as Li et
    al. argue trained weights do. BN has no affine parameters.

    The samples are split into ``blocks`` independent replicate blocks (sizes differing by at
    most one), each run as one training batch and then in evaluation mode with that batch's
    statistics as the running ones. The result is the sample-weighted mean over blocks, and the
    standard error comes from the spread between blocks (batch means), because the compounded
    ratio has no simple delta-method form.

    Args:
        depth: number of blocks ``L ≥ 1``.
        width: units per layer ``d ≥ 1``.
        kind, **params: noise kind and its parameters (``p`` or ``beta``).
        rho: correlation between the input units, in ``[−1/(d − 1), 1]``.
        cos2: ``cos²θ`` of every weight row, in ``[0, 1]`` (1 when ``d = 1``), or ``None``.
        samples: total samples, at least ``16 × blocks``; runs that would need more memory than
            :data:`varshift.theory.montecarlo.MAX_SIMULATION_BYTES` are refused.
        blocks: replicate blocks, ``≥ 2``.
        seed: seed of the one ``torch.Generator`` every draw comes from, ``≥ 0``.

    Returns:
        :class:`DepthProfile` with ``shift`` and ``local`` per layer, ``(depth,)`` each.
    """
    noise_variance(kind, **params)  # validates the kind and its parameters up front
    depth = check_int("depth", depth, low=1)
    d, cos2, correlation = check_unit(width, cos2, rho)
    blocks = check_int("blocks", blocks, low=2)
    samples = check_int("samples", samples, low=16 * blocks)
    seed = check_int("seed", seed, low=0)
    # The inputs with their draws and the activations of one block (about 4 copies of the
    # inputs at once), plus the weights.
    montecarlo.check_memory(
        "the inputs and weights", samples,
        per_sample=4 * d, fixed=depth * d * d, limit=montecarlo.MAX_SIMULATION_BYTES,
    )

    generator = torch.Generator().manual_seed(seed)
    weights = [aligned_weights(d, d, cos2=cos2, generator=generator) for _ in range(depth)]
    x = correlated_inputs(samples, d, mean=0.0, var=1.0, rho=correlation, generator=generator)
    compounded, local, sizes = [], [], []
    for block in torch.tensor_split(x, blocks):
        block_shift, block_local = _ratios_in_block(block, weights, kind, generator, params)
        compounded.append(block_shift)
        local.append(block_local)
        sizes.append(float(block.shape[0]))
    size_tensor = torch.tensor(sizes, dtype=torch.float64)
    shift, shift_stderr = _weighted_mean_and_stderr(torch.stack(compounded), size_tensor)
    local_mean, local_stderr = _weighted_mean_and_stderr(torch.stack(local), size_tensor)
    results = (shift, shift_stderr, local_mean, local_stderr)
    if not all(np.isfinite(values).all() for values in results):
        raise ValueError(
            "cos2 and rho must leave every unit some variance in training (the simulation gave "
            "a non-finite shift: a constant unit has zero variance; try another seed, more "
            f"samples or other cos2/rho), got cos2={cos2!r}, rho={rho!r}"
        )
    return DepthProfile(depth, d, shift, shift_stderr, local_mean, local_stderr, samples, blocks)
