"""Orthogonal matching pursuit: sparse codes of many signals over one dictionary, batched."""

from __future__ import annotations

import torch

# Relative ridge on the selected atoms' Gram matrix, so that (nearly) dependent atoms never make
# the least-squares solve fail.
RIDGE = 1e-12


def orthogonal_matching_pursuit(signals: torch.Tensor, atoms: torch.Tensor, nonzeros: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code every row of ``signals`` as a combination of ``nonzeros`` rows of ``atoms``.

    Greedy, all signals at once: each step adds, per signal, the atom most correlated with its
    current residual, then refits all selected coefficients by least squares (so the residual stays
    orthogonal to the selected atoms). Works from the Gram matrix, never forming residuals.

    Args:
        signals: (N, d) rows to code.
        atoms: (k, d) dictionary rows (any norms; selection uses normalized correlation).
        nonzeros: atoms per signal, at most k.

    Returns:
        ``(indices, coefficients)``, both (N, nonzeros): signal i ≈ Σ_t coefficients[i, t]·atoms[indices[i, t]].

    Example:
        >>> atoms = torch.eye(4, dtype=torch.float64)
        >>> indices, coefficients = orthogonal_matching_pursuit(torch.tensor([[0.0, 3.0, 0.0, 1.0]], dtype=torch.float64), atoms, 2)
        >>> indices.tolist(), torch.allclose(coefficients, torch.tensor([[3.0, 1.0]], dtype=torch.float64))
        ([[1, 3]], True)
    """
    num_atoms = atoms.shape[0]
    assert 1 <= nonzeros <= num_atoms, f"nonzeros must be in 1..{num_atoms}, got {nonzeros}"
    gram = atoms @ atoms.T  # (k, k)
    correlation = signals @ atoms.T  # (N, k)
    norms = gram.diagonal().sqrt().clamp(min=torch.finfo(gram.dtype).tiny)
    ridge = RIDGE * gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny)
    tiny = torch.finfo(gram.dtype).tiny
    indices = torch.empty(signals.shape[0], 0, dtype=torch.long, device=signals.device)
    codes = torch.zeros_like(correlation)  # (N, k): the coefficients scattered to their atoms
    # Cholesky factor of the selected atoms' Gram matrix, grown by one row per step, so that each
    # least-squares refit costs two triangular solves instead of a fresh factorization.
    cholesky = torch.empty(signals.shape[0], 0, 0, dtype=gram.dtype, device=gram.device)
    for step in range(nonzeros):
        # Correlation of each atom with the current residual x − codes·D is D·x − codes·(D·Dᵀ).
        score = (correlation - codes @ gram).abs() / norms
        score.scatter_(1, indices, -1.0)  # never pick an atom twice
        new = score.argmax(dim=1)
        cross = gram[indices, new[:, None]].unsqueeze(-1)  # (N, t, 1): selected atoms · new atom
        below = torch.linalg.solve_triangular(cholesky, cross, upper=False)
        corner = (gram[new, new] + ridge - below.pow(2).sum(dim=(1, 2))).clamp(min=tiny).sqrt()
        grown = torch.zeros(signals.shape[0], step + 1, step + 1, dtype=gram.dtype, device=gram.device)
        grown[:, :step, :step] = cholesky
        grown[:, step, :step] = below.squeeze(-1)
        grown[:, step, step] = corner
        cholesky = grown
        indices = torch.cat([indices, new[:, None]], dim=1)
        coefficients = torch.cholesky_solve(correlation.gather(1, indices).unsqueeze(-1), cholesky).squeeze(-1)
        codes = torch.zeros_like(correlation).scatter_(1, indices, coefficients)
    return indices, coefficients
