"""Truncated singular value decomposition."""

from __future__ import annotations

import torch

from .factors import LowRankFactors


def split_singular_values(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRankFactors:
    """Balance Σ between the factors (U√Σ, √Σ Vᵀ) so neither factor's scale dominates.

    Balanced factors keep both matrices at similar magnitude, which matters when they are cast to
    low precision or fine-tuned later.
    """
    root = s.sqrt()
    return LowRankFactors(up=u * root, down=root[:, None] * vh)


def truncated_svd(weight: torch.Tensor, rank: int, dtype: torch.dtype = torch.float64) -> LowRankFactors:
    """The best rank-``rank`` approximation of ``weight`` in Frobenius norm (Eckart–Young).

    The squared error equals the sum of the discarded squared singular values.

    Args:
        weight: (out, in) matrix, any float dtype.
        rank: number of singular triplets to keep (1 ≤ rank ≤ min(out, in)).
        dtype: precision of the decomposition; factors come back in this dtype.

    Example:
        >>> w = torch.randn(8, 6)
        >>> f = truncated_svd(w, 6)
        >>> torch.allclose(f.dense().float(), w, atol=1e-5)
        True
    """
    assert weight.ndim == 2, f"expected a matrix, got shape {tuple(weight.shape)}"
    assert 1 <= rank <= min(weight.shape), f"rank {rank} out of range for shape {tuple(weight.shape)}"
    u, s, vh = torch.linalg.svd(weight.to(dtype), full_matrices=False)
    return split_singular_values(u[:, :rank], s[:rank], vh[:rank])
