"""Heavy-tail exponent of a weight matrix's eigenvalue spectrum, as WeightWatcher fits it.

The eigenvalues λ = σ² of WᵀW (unnormalized) above a lower cut-off x_min are modelled as a
continuous power law p(λ) ∝ λ^(−α). For every candidate x_min (each eigenvalue in turn) α is
the maximum-likelihood estimate 1 + n / Σ log(λ_i / x_min) over the n eigenvalues ≥ x_min, and the
x_min kept is the one whose fit has the smallest Kolmogorov–Smirnov distance to the empirical
tail (Clauset, Shalizi & Newman 2009; the ``WWFit`` convention of weightwatcher 0.7).

Well-trained layers have α roughly between 2 and 6; a random (Marchenko–Pastur) matrix has no
power-law tail and fits to a large α.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Eigenvalues at or below this are treated as zero and left out of the fit (weightwatcher's EVALS_THRESH).
ZERO_EIGENVALUE = 1e-5


@dataclass
class PowerLawFit:
    """A power-law fit of a spectrum's tail.

    Attributes:
        alpha: the exponent α (NaN when there are fewer than 2 nonzero eigenvalues).
        xmin: the lower cut-off chosen by KS distance.
        ks_distance: Kolmogorov–Smirnov distance D of the chosen fit.
        num_tail: number of eigenvalues ≥ xmin (weightwatcher's ``num_pl_spikes``).
    """

    alpha: float
    xmin: float
    ks_distance: float
    num_tail: int


def fit_power_law(eigenvalues: torch.Tensor | np.ndarray) -> PowerLawFit:
    """Fit α of a power-law tail by maximum likelihood, x_min chosen by minimal KS distance.

    Args:
        eigenvalues: the spectrum (any order), e.g. squared singular values of a weight.

    Example:
        >>> generator = np.random.default_rng(0)
        >>> tail = (1 - generator.random(5000)) ** (-1 / 2.0)  # Pareto with α = 3
        >>> round(fit_power_law(tail).alpha, 1)
        3.0
    """
    values = np.asarray(eigenvalues, dtype=np.float64).ravel()
    values = np.sort(values[values > ZERO_EIGENVALUE])
    count = values.size
    if count < 2:
        return PowerLawFit(alpha=math.nan, xmin=math.nan, ks_distance=math.nan, num_tail=0)
    logs = np.log(values)
    # Σ_{j≥i} log λ_j for every start i, then α for every candidate x_min = λ_i (the last is excluded).
    tail_log_sums = np.cumsum(logs[::-1])[::-1][:-1]
    tail_sizes = np.arange(count, 1, -1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        alphas = 1.0 + tail_sizes / (tail_log_sums - tail_sizes * logs[:-1])
    distances = np.ones(count - 1)
    for i in range(count - 1):
        alpha = alphas[i]
        if not alpha > 1.0:  # also skips inf (all remaining eigenvalues equal)
            continue
        tail = values[i:]
        n = tail.size
        theoretical = 1.0 - (tail / values[i]) ** (1.0 - alpha)
        distances[i] = np.max(np.abs(theoretical - np.arange(n) / n))
    best = int(np.argmin(distances))
    return PowerLawFit(alpha=float(alphas[best]), xmin=float(values[best]), ks_distance=float(distances[best]), num_tail=int(count - best))


def submatrix_eigenvalues(weight: torch.Tensor, aspect_ratio: float = 1.0) -> torch.Tensor:
    """The eigenvalue spectrum averaged over submatrices of one fixed aspect ratio.

    The shape of a random matrix's spectrum, and so the fitted α, depends on the aspect ratio
    long/short of the matrix (Marchenko–Pastur). Cutting every matrix into non-overlapping blocks
    of the same aspect ratio (the remainder that does not fill a block is dropped) and averaging
    their sorted spectra makes α comparable across shapes.

    Args:
        weight: (out, in) matrix.
        aspect_ratio: long side / short side of each block, ≥ 1 (1: square blocks).

    Returns:
        The mean of the blocks' squared singular values, largest first, float64.

    Example:
        >>> submatrix_eigenvalues(torch.ones(2, 4)).round(decimals=12).tolist()  # two 2×2 blocks of ones: λ = 4, 0 (up to rounding)
        [4.0, 0.0]
    """
    assert aspect_ratio >= 1.0, f"aspect_ratio must be ≥ 1, got {aspect_ratio}"
    matrix = weight.detach().to(torch.float64)
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T  # (short, long)
    short, long = matrix.shape
    block_short = min(short, math.floor(long / aspect_ratio))
    block_long = max(1, math.floor(aspect_ratio * block_short))
    blocks = [
        matrix[row : row + block_short, column : column + block_long]
        for row in range(0, short - block_short + 1, block_short)
        for column in range(0, long - block_long + 1, block_long)
    ]
    return torch.linalg.svdvals(torch.stack(blocks)).square().mean(dim=0)
