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


def matrix_weights(importance: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """(F + damp·mean(diag F)·I)^{1/2}, symmetric: :func:`row_weights` for a full output Fisher F,
    so that ‖matrix_weights(F)·E‖² = tr(Eᵀ·F·E) (up to the damping) where row weights see only diag F.

    Example:
        >>> torch.allclose(matrix_weights(torch.diag(torch.tensor([4.0, 1.0])), 0.0), torch.diag(torch.tensor([2.0, 1.0])).double())
        True
    """
    f = importance.double()
    f = (f + f.T) / 2  # a sum of g gᵀ is symmetric up to rounding
    mean = f.diagonal().mean().item()
    floor = damp * mean if mean > 0 else 1.0
    values, vectors = torch.linalg.eigh(f)
    return (vectors * (values.clamp(min=0) + floor).sqrt()) @ vectors.T


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


def output_gram(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    output_weights: torch.Tensor | None = None,
    damping: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """D·W·(C + δ·I)·Wᵀ·D, the (out, out) Gram matrix of the weighted output D·W·X (C = XᵀX).

    Its eigenvalues are the σ_i² of D·W·(C + δ·I)^½ and its eigenvectors their left singular
    vectors, with no root of C: nothing is inverted, so a singular C needs no damping. Costs
    2·out·in² + 2·out²·in flops, the same as forming D·W·R and its Gram from a root R.

    Args:
        weight: (out, in) matrix.
        covariance: (in, in) XᵀX; only its lower triangle matters up to round-off.
        output_weights: positive (out,) weights D, or ``None``.
        damping: δ, e.g. ``damp`` · tr(C) / in (the relative damping of :func:`~lowrank.linalg.whitening`).
        dtype: precision of the products.

    Example:
        >>> w, x = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> torch.allclose(output_gram(w, x.T @ x), (w @ x.T) @ (w @ x.T).T)
        True
    """
    scaled = weight.to(dtype)
    if output_weights is not None:
        scaled = output_weights.to(dtype)[:, None] * scaled
    product = scaled @ covariance.to(dtype)
    if damping:
        product.add_(scaled, alpha=damping)
    gram = product @ scaled.T
    return (gram + gram.T) / 2  # C's round-off asymmetry (it sums float32 GEMMs) made this one asymmetric too


def output_side_svd(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    rank: int,
    output_weights: torch.Tensor | None = None,
    damping: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> LowRankFactors:
    """:func:`weighted_svd`'s optimum computed on the output side: no root of C, no damping needed.

    The rank-r minimizer of ‖D(W − W′)(C + δI)^½‖_F is W′ = D⁻¹·U_r·U_rᵀ·D·W, U_r the top
    eigenvectors of :func:`output_gram` (the truncated SVD of A = D·W·R is U_r·U_rᵀ·A for any root
    R, so R cancels). The factors are the ones the whitened SVD gives, U√Σ and √Σ⁻¹·Uᵀ·D·W
    (= √Σ·Vᵀ·R⁻¹), up to signs and round-off. Meant for out ≤ in and a covariance singular by
    construction (fewer calibration tokens than inputs): the whitened route needs a damping found
    from all in eigenvalues of C there (an O(in³) ``eigvalsh``), while this one is exact as it is.

    Args:
        weight: (out, in) matrix.
        covariance: (in, in) XᵀX.
        rank: rank to keep.
        output_weights: positive (out,) weights D, or ``None`` (plain whitened SVD).
        damping: δ added to C's diagonal (0: the calibration objective itself).
        dtype: precision of the Gram matrix, its eigendecomposition and the factors.

    Example:
        >>> w, x = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
        >>> f = output_side_svd(w, x.T @ x, 3)
        >>> torch.allclose(f.dense() @ x.T, w @ x.T)  # rank 3 = rank of X: exact on the data
        True
    """
    assert 1 <= rank <= min(weight.shape), f"rank {rank} out of range for shape {tuple(weight.shape)}"
    eigenvalues, vectors = torch.linalg.eigh(output_gram(weight, covariance, output_weights, damping, dtype))
    vectors = vectors[:, -rank:].flip(1)
    root = eigenvalues[-rank:].flip(0).clamp(min=0).sqrt().sqrt()  # √σ
    scaled = weight.to(dtype) if output_weights is None else output_weights.to(dtype)[:, None] * weight.to(dtype)
    # A direction with σ = 0 carries nothing on the data: its factors are zero, not 0/0.
    inverse = torch.where(root > 0, root.reciprocal(), torch.zeros_like(root))
    up, down = vectors * root, inverse[:, None] * (vectors.T @ scaled)
    if output_weights is not None:
        up = up / output_weights.to(dtype)[:, None]
    return LowRankFactors(up=up, down=down)


def weighted_energy(
    weight: torch.Tensor,
    output_weights: torch.Tensor | None = None,
    white: Whitening | None = None,
    covariance: torch.Tensor | None = None,
    damping: float = 0.0,
) -> torch.Tensor:
    """σ_i² of diag(output_weights)·W·C^{1/2}, largest first: dropping direction i costs σ_i² of weighted error.

    The squares come straight from the eigenvalues of the smaller Gram matrix A·Aᵀ or Aᵀ·A, in
    float64: one GEMM and a symmetric eigensolver instead of an SVD, whose bidiagonalization runs
    largely at matrix-vector speed. Each σ_i² then
    carries an absolute error of about ε₆₄·σ₁² (1e-16 of the largest), far below any difference an
    allocation weighs; small σ_i lose relative accuracy, which is why this serves error curves and
    not factors.

    C enters either as a root (``white``) or as ``covariance`` itself (plus ``damping``·I), which
    takes the output-side Gram (:func:`output_gram`) and needs no root: what a layer factored by
    :func:`output_side_svd` loses.

    Example:
        >>> a = torch.randn(7, 4, dtype=torch.float64)
        >>> torch.allclose(weighted_energy(a), torch.linalg.svdvals(a).pow(2))
        True
    """
    if covariance is not None:
        return torch.linalg.eigvalsh(output_gram(weight, covariance, output_weights, damping)).flip(0).clamp(min=0)
    scaled = weight.double()
    if output_weights is not None:
        scaled = output_weights.double()[:, None] * scaled
    if white is not None:
        scaled = scaled @ white.root.double()
    gram = scaled @ scaled.T if scaled.shape[0] <= scaled.shape[1] else scaled.T @ scaled
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
