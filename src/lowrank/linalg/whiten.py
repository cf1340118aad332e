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
    C = root·rootᵀ and C^{−1} = inverse_rootᵀ·inverse_root. A Cholesky root's inverse is formed on
    first use: spectra and allocation curves never need it, and for a 5632-wide MLP input it is
    254 MB in float64.
    """

    root: torch.Tensor
    inverse: torch.Tensor | None
    damping: float
    symmetric: bool = True

    @property
    def inverse_root(self) -> torch.Tensor:
        if self.inverse is None:  # L⁻¹ solved in place over the identity: no second n×n buffer
            identity = torch.eye(self.root.shape[0], dtype=self.root.dtype, device=self.root.device)
            self.inverse = torch.linalg.solve_triangular(self.root, identity, upper=False, out=identity)
        return self.inverse

    def unwhiten(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix @ inverse_root`` in the root's dtype: for a Cholesky root whose inverse is not
        formed yet, a triangular solve (X·L = matrix; r·n² flops, no n×n inverse held, and
        backward stable), else the product."""
        matrix = matrix.to(self.root.dtype)
        if self.inverse is None and not self.symmetric:
            return torch.linalg.solve_triangular(self.root, matrix, upper=False, left=False)
        return matrix @ self.inverse_root


def whitening(
    covariance: torch.Tensor,
    damp: float = 0.0,
    name: str = "",
    dtype: torch.dtype = torch.float64,
    symmetric: bool = True,
    damping: float | None = None,
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
            damped matrix (near-singular covariances get their damping from exact eigenvalues
            first; only an all-zero one, or one that float32 cannot factor even damped, takes
            the symmetric path).
        damping: the total damping an earlier Cholesky whitening of this very covariance (same
            ``damp`` and ``dtype``) found (its :attr:`Whitening.damping`): the Cholesky root is then
            formed directly, without the search for it, which for a near-singular covariance
            computes all its eigenvalues. Ignored by the symmetric root, whose eigendecomposition
            gives it for free.
    """
    if not symmetric:
        white = _cholesky_whitening(covariance, damp, dtype, name, damping)
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
        return Whitening(root=eye, inverse=eye, damping=float("inf"))
    damping = _damping(eigenvalues, damp, name)
    eigenvalues = eigenvalues.clamp(min=0) + damping
    del c  # a copy when the dtype changed: one n×n matrix fewer while the roots are formed
    root_values = eigenvalues.sqrt()
    root = _sandwich(eigenvectors, root_values)
    inverse_root = _sandwich(eigenvectors, root_values.reciprocal())
    return Whitening(root=root, inverse=inverse_root, damping=damping)


def _damping(eigenvalues: torch.Tensor, damp: float, name: str) -> float:
    """δ added to C's diagonal, from its eigenvalues (ascending): damp·mean(λ), raised to make
    λ_min + δ > SINGULAR_THRESHOLD·λ_max (and to lift a round-off negative λ_min) when needed."""
    largest = eigenvalues[-1].item()
    damping = damp * eigenvalues.clamp(min=0).mean().item()
    if eigenvalues[0].item() + damping <= SINGULAR_THRESHOLD * largest:
        damping = max(damping, SINGULAR_THRESHOLD * largest) + max(0.0, -eigenvalues[0].item())
        log.info(
            "whiten: %s has a rank-deficient input covariance (λ_min/λ_max = %.1e); damped by %.2e",
            name or "a layer",
            eigenvalues[0].item() / largest,
            damping,
        )
    return damping


_ROWS = 512  # rows of V·diag(d) formed at a time: no third n×n buffer (for a 5632-wide MLP input, 254 MB)


def _sandwich(vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """V·diag(d)·Vᵀ, built a block of rows at a time."""
    out = torch.empty_like(vectors)
    for start in range(0, vectors.shape[0], _ROWS):
        torch.mm(vectors[start : start + _ROWS] * values, vectors.T, out=out[start : start + _ROWS])
    return out


def _cholesky_whitening(
    covariance: torch.Tensor, damp: float, dtype: torch.dtype, name: str = "", known: float | None = None
) -> Whitening | None:
    """The Cholesky root of C + δ·I, δ as the symmetric path damps, or ``None`` when only that path will do.

    The symmetric path damps C when λ_min ≤ SINGULAR_THRESHOLD·λ_max. Both ends are first
    estimated from the factor of C + damp·mean(λ)·I (inverse and power iteration, O(n²) per step);
    a covariance within a factor of 100 of the threshold, or one whose factorization fails, gets its
    exact eigenvalues (``eigvalsh``: no eigenvectors, so O(n) workspace where ``eigh`` takes 2n²)
    and the damping the symmetric path would add, so the two roots always whiten the same damped
    matrix. ``None``: an all-zero covariance, or a damped one that still fails to factor (float32).
    ``known``: the damping this search found before for the same covariance; tried first.
    """
    c = covariance.to(dtype)
    n = c.shape[0]
    if known is not None:
        damped = c.clone() if c is covariance and known > 0 else c
        if known > 0:
            damped.diagonal().add_(known)
        root, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            return Whitening(root=root, inverse=None, damping=known, symmetric=False)
        del root, damped
    trace = c.diagonal().sum().item()
    if not trace > 0:
        return None
    damping = damp * trace / n
    if damping > 0:
        c = c.clone() if c is covariance else c
        c.diagonal().add_(damping)  # cholesky reads only the lower triangle, like eigh
    root, info = torch.linalg.cholesky_ex(c)
    if info.item() == 0:
        generator = torch.Generator().manual_seed(0)
        smallest, largest = torch.randn(n, 1, generator=generator, dtype=dtype).to(c.device), torch.randn(n, 1, generator=generator, dtype=dtype).to(c.device)
        for _ in range(_ITERATIONS):
            smallest = torch.cholesky_solve(smallest, root)
            smallest = smallest / smallest.norm()
            largest = root @ (root.T @ largest)
            largest = largest / largest.norm()
        # Rayleigh quotients xᵀCx = ‖Lᵀx‖²: the first approaches λ_min from above, the second λ_max from below.
        lambda_min, lambda_max = (root.T @ smallest).square().sum().item(), (root.T @ largest).square().sum().item()
        near_singular = lambda_min - damping <= 100 * SINGULAR_THRESHOLD * lambda_max
    if info.item() != 0 or near_singular:
        del root
        eigenvalues = torch.linalg.eigvalsh(c) - damping  # C's own (c holds C + damping·I)
        if not eigenvalues[-1].item() > 0:
            return None
        extra = _damping(eigenvalues, damp, name) - damping
        c = c.clone() if c is covariance else c
        c.diagonal().add_(extra)
        damping += extra
        root, info = torch.linalg.cholesky_ex(c)
        if info.item() != 0:
            return None
    return Whitening(root=root, inverse=None, damping=damping, symmetric=False)


_ITERATIONS = 20


def precision_dtypes(precision: str, weight_dtype: torch.dtype | None = None) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the covariance's root, dtype of the decomposition) for a method's ``precision``.

    ``"mixed"`` factors the covariance in float64 (Cholesky or eigh: once per input, and where an
    ill-conditioned XᵀX needs it) and runs the SVD of the whitened weight in float32, unless the
    weight itself is float64 (a float64 model keeps its precision).

    Example:
        >>> precision_dtypes("mixed")
        (torch.float64, torch.float32)
        >>> precision_dtypes("mixed", torch.float64)
        (torch.float64, torch.float64)
    """
    if precision == "mixed":
        return torch.float64, torch.float64 if weight_dtype == torch.float64 else torch.float32
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
    return LowRankFactors(up=factors.up, down=white.unwhiten(factors.down).to(dtype))


def output_error(weight: torch.Tensor, approximation: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖(W − W′)X‖²_F computed from C = XᵀX as tr(Δ C Δᵀ), in float64."""
    delta = weight.double() - approximation.double()
    return torch.einsum("oi,ij,oj->", delta, covariance.double(), delta).item()
