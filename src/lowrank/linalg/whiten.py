"""Whitening by the input covariance: the data-aware low-rank optimum.

For a layer y = W x with calibration inputs X (tokens as columns) and C = X Xᵀ, the output error
of a replacement W′ is ‖(W − W′) X‖²_F = ‖(W − W′) C^{1/2}‖²_F. The rank-r minimizer is therefore
W′ = (W C^{1/2})_r C^{−1/2}, and its error is the sum of the discarded squared singular values of
W C^{1/2} (the SVD-LLM result).

Any root R with R Rᵀ = C serves: R = C^{1/2} Q for an orthogonal Q, so W R has the singular values
of W C^{1/2} and (W R)_r R^{−1} is the same W′. Two are offered: the symmetric root from an
eigendecomposition (the default; methods that select entries in whitened coordinates need it) and
the Cholesky factor (``symmetric=False``): n³/3 flops against an eigendecomposition's several n³,
which plain low-rank factorization and spectra use.
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
    """A root R of a (possibly damped) covariance C (R Rᵀ = C), its inverse, and the damping added.

    ``root`` is C^{1/2} itself when ``symmetric``, else the lower Cholesky factor. Either way
    C = root·rootᵀ and C^{−1} = inverse_rootᵀ·inverse_root.
    """

    root: torch.Tensor
    inverse_root: torch.Tensor
    damping: float
    symmetric: bool = True


def whitening(
    covariance: torch.Tensor, damp: float = 0.0, name: str = "", dtype: torch.dtype = torch.float64, symmetric: bool = True
) -> Whitening:
    """A square root and its inverse of a covariance, damped when needed.

    Never fails on a singular, indefinite (round-off) or all-zero covariance: it adds δ·I with
    δ = max(damp, SINGULAR_THRESHOLD)·mean(eigenvalues) when λ_min ≤ SINGULAR_THRESHOLD·λ_max,
    and logs one line saying so. An all-zero covariance (an input never seen) whitens to identity.

    Args:
        covariance: (in, in) symmetric positive semi-definite matrix, e.g. XᵀX.
        damp: extra damping, relative to the mean eigenvalue, applied always when > 0.
        name: layer name for the log line.
        dtype: precision of the eigendecomposition.
        symmetric: the symmetric root C^{1/2}; ``False``: the lower Cholesky factor of the same
            damped matrix. Near-singular covariances (λ_min within 100× of the damping threshold,
            estimated from the factor) and failed factorizations take the symmetric path instead.
    """
    if not symmetric:
        white = _cholesky_whitening(covariance, damp, dtype)
        if white is not None:
            return white
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


def _cholesky_whitening(covariance: torch.Tensor, damp: float, dtype: torch.dtype) -> Whitening | None:
    """The Cholesky root of C + damp·mean(λ)·I, or ``None`` when C needs the symmetric path's care.

    That path damps C when λ_min ≤ SINGULAR_THRESHOLD·λ_max. Both ends are estimated here from the
    factor (inverse and power iteration, O(n²) per step); a covariance within a factor of 100 of
    the threshold, or one whose factorization fails, goes the symmetric way, so the two roots
    always whiten the same damped matrix.
    """
    c = covariance.to(dtype)
    n = c.shape[0]
    trace = c.diagonal().sum().item()
    if not trace > 0:
        return None
    damping = damp * trace / n
    if damping > 0:
        c = c.clone() if c is covariance else c
        c.diagonal().add_(damping)  # cholesky reads only the lower triangle, like eigh
    root, info = torch.linalg.cholesky_ex(c)
    if info.item() != 0:
        return None
    generator = torch.Generator().manual_seed(0)
    smallest, largest = torch.randn(n, 1, generator=generator, dtype=dtype).to(c.device), torch.randn(n, 1, generator=generator, dtype=dtype).to(c.device)
    for _ in range(_ITERATIONS):
        smallest = torch.cholesky_solve(smallest, root)
        smallest = smallest / smallest.norm()
        largest = root @ (root.T @ largest)
        largest = largest / largest.norm()
    # Rayleigh quotients xᵀCx = ‖Lᵀx‖²: the first approaches λ_min from above, the second λ_max from below.
    lambda_min, lambda_max = (root.T @ smallest).square().sum().item(), (root.T @ largest).square().sum().item()
    if lambda_min - damping <= 100 * SINGULAR_THRESHOLD * lambda_max:
        return None
    inverse_root = torch.linalg.solve_triangular(root, torch.eye(n, dtype=dtype, device=c.device), upper=False)
    return Whitening(root=root, inverse_root=inverse_root, damping=damping, symmetric=False)


_ITERATIONS = 20


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the covariance's root, dtype of the decomposition) for a method's ``precision``.

    ``"mixed"`` factors the covariance in float64 (Cholesky or eigh: once per input, and where an
    ill-conditioned XᵀX needs it) and runs the SVD of the whitened weight in float32.

    Example:
        >>> precision_dtypes("mixed")
        (torch.float64, torch.float32)
    """
    if precision == "mixed":
        return torch.float64, torch.float32
    dtype = getattr(torch, precision)
    return dtype, dtype


def whitened_spectrum(weight: torch.Tensor, covariance: torch.Tensor, damp: float = 0.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of W·C^{1/2}, largest first. Dropping σ_i costs σ_i² of output error."""
    white = whitening(covariance, damp=damp, dtype=dtype, symmetric=False)
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
        dtype: precision of the SVD and of the factors (``white`` may be of higher precision).
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
    u, s, vh = torch.linalg.svd(weight.to(dtype) @ white.root.to(dtype), full_matrices=False)
    factors = split_singular_values(u[:, :rank], s[:rank], vh[:rank])
    # Unwhitened in the whitening's own precision, then rounded once: the inverse root of an
    # ill-conditioned covariance has large entries that a float32 product would cancel badly.
    inverse_root = white.inverse_root
    return LowRankFactors(up=factors.up, down=(factors.down.to(inverse_root.dtype) @ inverse_root).to(dtype))


def output_error(weight: torch.Tensor, approximation: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖(W − W′)X‖²_F computed from C = XᵀX as tr(Δ C Δᵀ), in float64."""
    delta = weight.double() - approximation.double()
    return torch.einsum("oi,ij,oj->", delta, covariance.double(), delta).item()
