"""Shared math of the initializations: pick singular triplets, split them into balanced factors."""

from __future__ import annotations

import torch

from ..linalg import LowRankFactors
from ..linalg.randomized import randomized_svd


def singular_triplets(
    matrix: torch.Tensor, rank: int, largest: bool = True, svd: str = "exact", power_iterations: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest (or smallest) singular triplets ``(u, s, vh)`` of ``matrix``, in float64.

    Args:
        matrix: (m, n) matrix.
        rank: triplets to keep.
        largest: top triplets (True) or bottom triplets (False; exact SVD only).
        svd: ``"exact"`` or ``"randomized"``.
        power_iterations: for the randomized SVD.
        seed: for the randomized SVD.
    """
    if svd == "randomized":
        assert largest, "randomized SVD finds only the largest singular triplets"
        return randomized_svd(matrix, rank, power_iterations=power_iterations, seed=seed)
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    keep = slice(0, rank) if largest else slice(s.numel() - rank, s.numel())
    return u[:, keep], s[keep], vh[keep]


def balance(up: torch.Tensor, down: torch.Tensor) -> LowRankFactors:
    """Rescale each rank-1 term b_i a_iᵀ so that ‖b_i‖ = ‖a_i‖, leaving the product unchanged.

    For U Σ Vᵀ this is the usual (U√Σ, √Σ Vᵀ) split; balanced factors learn at similar speeds.
    """
    up_norm, down_norm = up.norm(dim=0), down.norm(dim=1)
    scale = torch.where((up_norm > 0) & (down_norm > 0), (down_norm / up_norm.clamp(min=1e-300)).sqrt(), torch.ones_like(up_norm))
    return LowRankFactors(up=up * scale, down=down / scale[:, None])
