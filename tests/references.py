"""Reference computations shared by tests, written independently of lowrank (numpy only)."""

from __future__ import annotations

import numpy as np


def reduced_rank_optimum(outputs: np.ndarray, inputs: np.ndarray, rank: int) -> float:
    """min over rank-r W′ of ‖Y − X W′ᵀ‖²_F (tokens as rows): X W′ᵀ ranges over the rank-r matrices in
    X's column space, so the optimum is Y's projection onto that space truncated to rank r (Eckart–Young).

    Example:
        >>> x = np.eye(3); reduced_rank_optimum(np.diag([3.0, 2.0, 1.0]), x, 2)
        1.0
    """
    u, s, _ = np.linalg.svd(inputs, full_matrices=False)
    basis = u[:, s > s[0] * 1e-10]  # a rank-deficient X (e.g. LayerNorm outputs) has a smaller column space
    projected = basis @ (basis.T @ outputs)
    singular_values = np.linalg.svd(projected, compute_uv=False)
    return float(np.sum((outputs - projected) ** 2) + np.sum(singular_values[rank:] ** 2))


def truncated(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-r approximation of ``matrix`` in Frobenius norm (Eckart–Young)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vt[:rank]
