"""Rank and norm measures of a matrix, computed from its singular values.

Pure functions on 1-D tensors of singular values (largest first, as ``torch.linalg.svdvals``
returns them). Nothing here knows about models.
"""

from __future__ import annotations

import math

import torch


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix in float64, largest first, whatever the weight's dtype.

    Example:
        >>> singular_values(torch.diag(torch.tensor([1.0, 3.0, 2.0]))).tolist()
        [3.0, 2.0, 1.0]
    """
    assert weight.ndim == 2, f"expected a matrix, got shape {tuple(weight.shape)}"
    return torch.linalg.svdvals(weight.detach().to(torch.float64))


def stable_rank(singular: torch.Tensor) -> float:
    """‖W‖²_F / ‖W‖²₂: how many directions carry the energy; 1 for rank one, n for an isometry.

    Example:
        >>> stable_rank(torch.tensor([2.0, 2.0, 0.0]))
        2.0
    """
    largest = singular[0].item() if singular.numel() else 0.0
    if largest == 0.0:
        return 0.0
    return (singular.double().square().sum() / largest**2).item()


def effective_rank(singular: torch.Tensor) -> float:
    """exp(entropy of σ/Σσ), the effective rank of Roy & Vetterli (2007); between 1 and the rank.

    Example:
        >>> round(effective_rank(torch.ones(5)), 6)
        5.0
    """
    total = singular.double().sum()
    if total.item() == 0.0:
        return 0.0
    p = singular.double() / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def energy_rank(singular: torch.Tensor, fraction: float) -> int:
    """The smallest rank whose best approximation keeps ``fraction`` of Σσ² (the Frobenius energy).

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0, 1.0]), 0.8)  # 9 / 11 ≥ 0.8
        1
    """
    assert 0.0 < fraction <= 1.0, f"fraction must be in (0, 1], got {fraction}"
    energy = singular.double().square()
    total = energy.sum().item()
    if total == 0.0:
        return 0
    cumulative = energy.cumsum(0) / total
    # The tolerance keeps fraction=1 from missing the last value to round-off.
    return min(int((cumulative < fraction - 1e-12).sum().item()) + 1, singular.numel())


def discarded_energy(singular: torch.Tensor, rank: int) -> float:
    """Σ_{i>rank} σ_i²: the squared Frobenius error of the best rank-``rank`` approximation."""
    return singular[rank:].double().square().sum().item()


def spectrum_metrics(singular: torch.Tensor) -> dict[str, float]:
    """Norms and rank measures of one matrix from its singular values.

    Returns a dict with ``spectral_norm`` (σ₁), ``nuclear_norm`` (Σσ), ``frobenius_norm``
    (√Σσ²), ``stable_rank``, ``effective_rank``, ``rank_90`` and ``rank_99`` (ranks keeping 90 % /
    99 % of Σσ²).

    Example:
        >>> spectrum_metrics(torch.tensor([3.0, 4.0]).sort(descending=True).values)["frobenius_norm"]
        5.0
    """
    singular = singular.double()
    return {
        "spectral_norm": singular[0].item() if singular.numel() else 0.0,
        "nuclear_norm": singular.sum().item(),
        "frobenius_norm": singular.square().sum().sqrt().item(),
        "stable_rank": stable_rank(singular),
        "effective_rank": effective_rank(singular),
        "rank_90": energy_rank(singular, 0.90),
        "rank_99": energy_rank(singular, 0.99),
    }
