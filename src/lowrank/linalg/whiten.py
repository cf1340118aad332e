"""Whitening by the input covariance: the data-aware low-rank optimum.

For a layer y = W x with calibration inputs X (tokens as columns) and C = X Xᵀ, the output error
of a replacement W′ is ‖(W − W′) X‖²_F = ‖(W − W′) C^{1/2}‖²_F. The rank-r minimizer is therefore
W′ = (W C^{1/2})_r C^{−1/2}, and its error is the sum of the discarded squared singular values of
W C^{1/2} (the SVD-LLM result, here with the symmetric square root from an eigendecomposition).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .factors import LowRankFactors
from .svd import split_singular_values

log = logging.getLogger(__name__)

# Below this eigenvalue ratio (λ_min / λ_max) the covariance counts as singular and is damped.
SINGULAR_THRESHOLD = 1e-10


@dataclass
class Whitening:
    """C^{1/2} and C^{−1/2} of a (possibly damped) covariance, and the damping that was added."""

    root: torch.Tensor
    inverse_root: torch.Tensor
    damping: float


def whitening(covariance: torch.Tensor, damp: float = 0.0, name: str = "", dtype: torch.dtype = torch.float64) -> Whitening:
    """Symmetric square root and inverse square root of a covariance, damped when needed.

    Never fails on a singular, indefinite (round-off) or all-zero covariance: it adds δ·I with
    δ = max(damp, SINGULAR_THRESHOLD)·mean(eigenvalues) when λ_min ≤ SINGULAR_THRESHOLD·λ_max,
    and logs one line saying so. An all-zero covariance (an input never seen) whitens to identity.

    Args:
        covariance: (in, in) symmetric positive semi-definite matrix, e.g. XᵀX.
        damp: extra damping, relative to the mean eigenvalue, applied always when > 0.
        name: layer name for the log line.
        dtype: precision of the eigendecomposition.
    """
    # eigh reads only the lower triangle, so the round-off asymmetry of XᵀX needs no averaging
    # (and no n×n copy: for a 7B MLP input that copy alone is 400 MB).
    c = covariance.to(dtype)
    eigenvalues, eigenvectors = torch.linalg.eigh(c)
    largest = eigenvalues[-1].item()
    if not largest > 0:
        log.info("whiten: %s has an all-zero input covariance; using plain SVD for it", name or "a layer")
        eye = torch.eye(c.shape[0], dtype=dtype, device=c.device)
        return Whitening(root=eye, inverse_root=eye, damping=float("inf"))
    mean = eigenvalues.clamp(min=0).mean().item()
    damping = damp * mean
    if eigenvalues[0].item() + damping <= SINGULAR_THRESHOLD * largest:
        damping = max(damping, SINGULAR_THRESHOLD * largest) + max(0.0, -eigenvalues[0].item())
        log.info(
            "whiten: %s has a rank-deficient input covariance (λ_min/λ_max = %.1e); damped by %.2e",
            name or "a layer",
            eigenvalues[0].item() / largest,
            damping,
        )
    eigenvalues = eigenvalues.clamp(min=0) + damping
    root_values = eigenvalues.sqrt()
    scaled = eigenvectors * root_values
    root = scaled @ eigenvectors.T
    inverse_root = torch.div(eigenvectors, root_values, out=scaled) @ eigenvectors.T  # reuses the buffer
    return Whitening(root=root, inverse_root=inverse_root, damping=damping)


def whitened_spectrum(weight: torch.Tensor, covariance: torch.Tensor, damp: float = 0.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of W·C^{1/2}, largest first. Dropping σ_i costs σ_i² of output error."""
    white = whitening(covariance, damp=damp, dtype=dtype)
    return torch.linalg.svdvals(weight.to(dtype) @ white.root)


def whitened_svd(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    rank: int,
    damp: float = 0.0,
    name: str = "",
    dtype: torch.dtype = torch.float64,
    white: Whitening | None = None,
) -> LowRankFactors:
    """The rank-``rank`` W′ minimizing ‖(W − W′)X‖_F, given C = XᵀX (sum over tokens).

    Args:
        weight: (out, in) matrix.
        covariance: (in, in) input second-moment matrix.
        rank: rank to keep.
        damp: relative damping of the covariance (see :func:`whitening`).
        name: layer name for log lines.
        dtype: precision of the decomposition.
        white: a precomputed :func:`whitening` of ``covariance`` (layers sharing an input reuse it).

    Example:
        >>> w, x = torch.randn(8, 6), torch.randn(100, 6)
        >>> f = whitened_svd(w, x.T @ x, rank=6)
        >>> torch.allclose(f.dense().float(), w, atol=1e-4)
        True
    """
    assert weight.ndim == 2 and covariance.shape == (weight.shape[1], weight.shape[1]), "covariance must be (in, in)"
    assert 1 <= rank <= min(weight.shape), f"rank {rank} out of range for shape {tuple(weight.shape)}"
    white = white if white is not None else whitening(covariance, damp=damp, name=name, dtype=dtype)
    u, s, vh = torch.linalg.svd(weight.to(dtype) @ white.root, full_matrices=False)
    factors = split_singular_values(u[:, :rank], s[:rank], vh[:rank])
    return LowRankFactors(up=factors.up, down=factors.down @ white.inverse_root)


def output_error(weight: torch.Tensor, approximation: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖(W − W′)X‖²_F computed from C = XᵀX as tr(Δ C Δᵀ), in float64."""
    delta = weight.double() - approximation.double()
    return torch.einsum("oi,ij,oj->", delta, covariance.double(), delta).item()
