"""Two-sided weighted SVD: minimize ‖D (W − W′) C^{1/2}‖_F for a diagonal output weighting D.

With D = I this is the whitened SVD; with C = I it is Fisher-weighted SVD (FWSVD, Hsu et al. 2022);
with both, the error approximates the loss increase ½ Σ_t Δy_tᵀ F Δy_t under a diagonal Fisher
F = D² of the layer output. The rank-r minimizer is D⁻¹ (D W C^{1/2})_r C^{−1/2}.
"""

from __future__ import annotations

import torch

from .factors import LowRankFactors
from .svd import split_singular_values
from .whiten import Whitening


def row_weights(importance: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """√(importance + damp·mean): positive weights even for outputs that never got a gradient."""
    importance = importance.double().clamp(min=0)
    floor = damp * importance.mean().item() if importance.mean() > 0 else 1.0
    return (importance + floor).sqrt()


def weighted_svd(
    weight: torch.Tensor,
    rank: int,
    output_weights: torch.Tensor | None = None,
    white: Whitening | None = None,
    dtype: torch.dtype = torch.float64,
) -> LowRankFactors:
    """Rank-``rank`` factors minimizing ‖diag(output_weights)(W − W′)C^{1/2}‖_F.

    Args:
        weight: (out, in) matrix.
        rank: rank to keep.
        output_weights: positive (out,) weights, e.g. :func:`row_weights` of squared gradients.
        white: whitening of the input covariance (:func:`lowrank.linalg.whitening`), or ``None``.
        dtype: precision of the decomposition.

    Example:
        >>> w = torch.randn(8, 6)
        >>> f = weighted_svd(w, 6, output_weights=torch.rand(8) + 0.1)
        >>> torch.allclose(f.dense().float(), w, atol=1e-5)
        True
    """
    assert 1 <= rank <= min(weight.shape), f"rank {rank} out of range for shape {tuple(weight.shape)}"
    scaled = weight.to(dtype)
    if output_weights is not None:
        scaled = output_weights.to(dtype)[:, None] * scaled
    if white is not None:
        scaled = scaled @ white.root.to(dtype)
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    factors = split_singular_values(u[:, :rank], s[:rank], vh[:rank])
    up, down = factors.up, factors.down
    if output_weights is not None:
        up = up / output_weights.to(dtype)[:, None]
    if white is not None:  # in the whitening's precision, as whitened_svd does
        down = white.unwhiten(down).to(dtype)
    return LowRankFactors(up=up, down=down)


def weighted_energy(weight: torch.Tensor, output_weights: torch.Tensor | None = None, white: Whitening | None = None) -> torch.Tensor:
    """σ_i² of diag(output_weights)·W·C^{1/2}, largest first: dropping direction i costs σ_i² of weighted error.

    The squares come straight from the eigenvalues of the smaller Gram matrix A·Aᵀ or Aᵀ·A, in
    float64: one GEMM and a symmetric eigensolver instead of an SVD, whose bidiagonalization runs
    largely at matrix-vector speed. Each σ_i² then
    carries an absolute error of about ε₆₄·σ₁² (1e-16 of the largest), far below any difference an
    allocation weighs; small σ_i lose relative accuracy, which is why this serves error curves and
    not factors.

    Example:
        >>> a = torch.randn(7, 4, dtype=torch.float64)
        >>> torch.allclose(weighted_energy(a), torch.linalg.svdvals(a).pow(2))
        True
    """
    scaled = weight.double()
    if output_weights is not None:
        scaled = output_weights.double()[:, None] * scaled
    if white is not None:
        scaled = scaled @ white.root.double()
    gram = scaled @ scaled.T if scaled.shape[0] <= scaled.shape[1] else scaled.T @ scaled
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
