"""Keeping a subset of a layer's inputs: Nyström selection on their correlation, and the exact refit.

A gated MLP computes y = W_d·h with h = σ(W_g·x) ⊙ (W_u·x) ∈ Rⁿ (n intermediate neurons). Keeping only
the neurons in S (rows S of W_g and W_u) leaves h_S exactly as it was, so the best new down
projection B (out × |S|) is a least-squares fit over the calibration tokens,

    min_B Σ_t ‖W_d·h_t − B·h_{S,t}‖²,   at   B = W_d·C_{:S}·C_{SS}⁻¹,   C = Σ_t h_t h_tᵀ,

with residual tr(W_d·(C − C_{:S}·C_{SS}⁻¹·C_{S:})·W_dᵀ). The matrix C_{:S}·C_{SS}⁻¹·C_{S:} is the
Nyström approximation of C from the columns S, so the block's calibration output error is exactly
the W_d-weighted Nyström residual of C (MoDeGPT, Lin et al. 2024, type I). Which S to keep is a
column subset selection problem; MoDeGPT keeps the k largest ridge leverage scores of C,
τ_i = [C·(C + λI)⁻¹]_ii. Kept in a fixed order, the subsets are nested, and then one Cholesky
factorization of C in that order gives the residual of every k at once: with P C Pᵀ = L·Lᵀ,
C_{:S_k}·C_{S_kS_k}⁻¹·C_{S_k:} = L_{:,≤k}·L_{:,≤k}ᵀ (in the permuted coordinates), so the residual
at k is tr(W C Wᵀ) − Σ_{j≤k} ‖W·L_{:,j}‖².

Everything here runs in float64 on (n × n) correlations and is cast by the caller.
"""

from __future__ import annotations

import logging

import torch

from ..errors import LowrankError

log = logging.getLogger(__name__)

# A correlation of intermediate activations is often singular (dead neurons, more neurons than
# calibration tokens), and summed in float32 it can be slightly indefinite (eigenvalues down to about
# −1e-7 of the largest): its Cholesky factorization then needs a ridge. The first one tried, relative
# to the mean diagonal, is far below any error it could change; it grows 100-fold until the
# factorization succeeds (logged), and tests check the residuals against least squares without it.
SINGULAR_RIDGE = 1e-10


def _cholesky(matrix: torch.Tensor, name: str = "") -> torch.Tensor:
    """The lower Cholesky factor of a positive semi-definite ``matrix``, ridged if it is singular (see :data:`SINGULAR_RIDGE`)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    ridge, scale = SINGULAR_RIDGE, _mean_diagonal(matrix)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    while info.item() != 0:
        if ridge > 1e-2:
            raise LowrankError(f"{name or 'a correlation'} is not positive semi-definite (NaN or Inf statistics?); calibrate again")
        factor, info = torch.linalg.cholesky_ex(matrix + ridge * scale * eye)
        if info.item() == 0:
            log.info("%s: the correlation is singular; ridged by %.0e of its mean diagonal", name or "a layer", ridge)
        ridge *= 100
    return factor


def _mean_diagonal(correlation: torch.Tensor) -> float:
    mean = correlation.diagonal().mean().item()
    return mean if mean > 0 else 1.0


def ridge_leverage_scores(correlation: torch.Tensor, ridge: float) -> torch.Tensor:
    """τ_i = [C·(C + λI)⁻¹]_ii with λ = ``ridge``·tr(C)/n: how much of the ridge-regularized
    column space of C neuron i carries (Σ_i τ_i is the effective dimension at λ).

    Args:
        correlation: (n, n) symmetric positive semi-definite C.
        ridge: λ relative to the mean eigenvalue of C; > 0. Small values score every direction
            that C spans near 1, large values score by the diagonal (activation energy).

    Returns:
        (n,) float64 scores in [0, 1].

    Example:
        >>> c = torch.diag(torch.tensor([4.0, 1.0, 0.0]))
        >>> [round(score, 6) for score in ridge_leverage_scores(c, ridge=3 / 5).tolist()]  # λ = 1
        [0.8, 0.5, 0.0]
    """
    if not ridge > 0:
        raise LowrankError(f"the ridge of the leverage scores must be > 0, got {ridge}; e.g. 1e-2")
    c = correlation.double()
    lam = ridge * _mean_diagonal(c)
    # C·(C + λI)⁻¹ = I − λ·(C + λI)⁻¹, and diag((L·Lᵀ)⁻¹) is the squared column norms of L⁻¹: a
    # Cholesky factorization and a triangular inverse, about 4× faster than an eigendecomposition
    # (benchmarks/modegpt_plan.py), and C + λI is well conditioned by the ridge.
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c + lam * eye)
    if info.item() == 0:
        inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
        return (1.0 - lam * inverse.pow(2).sum(dim=0)).clamp(0.0, 1.0)
    eigenvalues, eigenvectors = torch.linalg.eigh(c)  # C + λI not positive definite (C far from PSD): the spectral form
    eigenvalues = eigenvalues.clamp(min=0)
    return (eigenvectors.pow(2) * (eigenvalues / (eigenvalues + lam))).sum(dim=1)


def leverage_order(correlation: torch.Tensor, ridge: float) -> torch.Tensor:
    """Neuron indices by decreasing ridge leverage score (ties by index): keep the first k.

    Example:
        >>> leverage_order(torch.diag(torch.tensor([1.0, 4.0, 0.0])), ridge=0.5).tolist()
        [1, 0, 2]
    """
    scores = ridge_leverage_scores(correlation, ridge)
    # A stable sort on the negated scores keeps equal scores in index order: the same order every run.
    return torch.sort(-scores, stable=True).indices


def nested_residuals(weight: torch.Tensor, correlation: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tr(W·(C − C_{:S_k}·C_{S_kS_k}⁻¹·C_{S_k:})·Wᵀ) for S_k = the first k of ``order``, k = 0 … n.

    The output error of the refit down projection when k neurons are kept, from one Cholesky
    factorization of C permuted into ``order`` (see the module docstring).

    Args:
        weight: (out, n) W (row-weighted already when the outputs matter unequally).
        correlation: (n, n) C = Σ h hᵀ.
        order: (n,) a permutation of range(n).

    Returns:
        (n + 1,) float64, non-increasing, ending at 0.

    Example:
        >>> c = torch.diag(torch.tensor([4.0, 1.0]))
        >>> nested_residuals(torch.eye(2), c, torch.tensor([0, 1])).tolist()
        [5.0, 1.0, 0.0]
    """
    w, c = weight.double(), correlation.double()
    factor = _cholesky(c[order][:, order])  # (n, n) lower
    captured = (w[:, order] @ factor).pow(2).sum(dim=0)  # ‖W·L_{:,j}‖² per kept neuron, in order
    total = (w @ c * w).sum()
    residuals = total - torch.cat([captured.new_zeros(1), captured.cumsum(0)])
    residuals[-1] = 0.0  # every neuron kept: exact, whatever the rounding of the sum
    return residuals.clamp(min=0)


def greedy_order(weight: torch.Tensor, correlation: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Neurons in the order a greedy pivoted Cholesky takes them: each step keeps the neuron that
    lowers the output error tr(W·R·Wᵀ) the most (R the Nyström residual of C so far).

    An alternative to ridge leverage scores that reads W (the leverage scores read only C); O(n³)
    over ``steps``, so slower. The remaining neurons follow in index order.

    Keeping neuron p lowers the error by ‖W·R_{:,p}‖² / R_pp and leaves R − f·fᵀ with f = R_{:,p}/√R_pp.
    R itself is never formed: its new column is C_{:,p} − F·F_{p,:}ᵀ from the factor columns F so far,
    and only W·R (out × n) and diag R are updated. Each step then reads n·k + 2·out·n numbers rather
    than rewriting the n × n residual: on SmolLM2's MLPs (n = 1536, out = 576) the same order in 20 s
    instead of 43 s, one thread on a busy machine (``benchmarks/modegpt_plan.py --parts greedy``).

    Args:
        weight: (out, n) W.
        correlation: (n, n) C.
        steps: how many neurons to choose greedily (default all).

    Example:
        >>> greedy_order(torch.tensor([[1.0, 3.0]]), torch.eye(2)).tolist()
        [1, 0]
    """
    w, c = weight.double(), correlation.double()
    n = c.shape[0]
    steps = n if steps is None else min(steps, n)
    weighted = w @ c  # W·R, kept up to date with R
    pivots = c.diagonal().clone()  # diag R
    factor = c.new_zeros(steps, n)  # row j: the j-th kept neuron's factor column f
    floor = SINGULAR_RIDGE * _mean_diagonal(c)
    chosen: list[int] = []
    available = torch.ones(n, dtype=torch.bool, device=c.device)
    for k in range(steps):
        gain = torch.linalg.vector_norm(weighted, dim=0).pow(2) / pivots.clamp(min=floor)
        gain = torch.where(available & (pivots > floor), gain, torch.full_like(gain, -1.0))
        pivot = int(torch.argmax(gain).item())
        if gain[pivot] < 0:  # the rest adds nothing C does not already span
            break
        column = c[pivot] - factor[:k, pivot] @ factor[:k]  # R_{:,p} (C symmetric: its row p)
        scale = column[pivot].clamp(min=floor).sqrt()
        factor[k] = column / scale
        weighted.addr_(weighted[:, pivot] / scale, factor[k], alpha=-1.0)  # W·R −= (W·f)·fᵀ, W·f = (W·R)_{:,p}/√R_pp
        pivots -= factor[k].pow(2)
        available[pivot] = False
        chosen.append(pivot)
    rest = [index for index in range(n) if available[index]]
    return torch.tensor(chosen + rest, dtype=torch.long)


def nystrom_refit(weight: torch.Tensor, correlation: torch.Tensor, kept: torch.Tensor, damp: float = 0.0, name: str = "") -> torch.Tensor:
    """B = W·C_{:S}·(C_{SS} + δI)⁻¹: the least-squares weight on the kept inputs S (see the module docstring).

    Args:
        weight: (out, n) W.
        correlation: (n, n) C.
        kept: (k,) indices S.
        damp: δ relative to the mean diagonal of C_{SS}; 0 damps only when C_{SS} is singular
            (from :data:`SINGULAR_RIDGE` up, logged).
        name: layer name for the log.

    Returns:
        (out, k) float64 B.

    Example:
        >>> c = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> round(nystrom_refit(torch.tensor([[1.0, 1.0]]), c, torch.tensor([0])).item(), 12)  # 1 + ½: the dropped neuron's share
        1.5
    """
    w, c = weight.double(), correlation.double()
    block = c[kept][:, kept]
    factor = _cholesky(block + damp * _mean_diagonal(block) * torch.eye(len(kept), dtype=c.dtype, device=c.device), name)
    right = w @ c[:, kept]  # (out, k) = W·C_{:S}
    return torch.cholesky_solve(right.T, factor).T


def selection_error(weight: torch.Tensor, correlation: torch.Tensor, kept: torch.Tensor, new_weight: torch.Tensor) -> float:
    """Σ_t ‖W·h_t − B·h_{S,t}‖² = tr(W C Wᵀ) − 2 tr(B·C_{S:}·Wᵀ) + tr(B·C_{SS}·Bᵀ): the calibration
    output error of replacing W by B on the kept inputs S.

    Example:
        >>> c = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> selection_error(torch.tensor([[1.0, 1.0]]), c, torch.tensor([0]), torch.tensor([[1.5]]))
        1.5
    """
    w, c, b = weight.double(), correlation.double(), new_weight.double()
    total = (w @ c * w).sum()
    cross = (b @ c[kept] * w).sum()
    kept_energy = (b @ c[kept][:, kept] * b).sum()
    return (total - 2 * cross + kept_energy).item()
